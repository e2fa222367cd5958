"""The training config: shipped configs, strict keys with suggestions, typed values, overrides, TOML round trip."""
import dataclasses
import tomllib

import pytest

from epamx.config import (
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    available_configs,
    config_from_dict,
    load_config,
    parse_override,
    to_toml,
)

AUTHORS = ["ntu60_xsub", "ntu60_xview", "ntu120_xsub", "ntu120_xset", "pku_mmd", "toyota_cs"]


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["embedded"] + AUTHORS)
def test_every_shipped_config_loads_and_round_trips(name):
    assert name in available_configs()
    config = load_config(name)
    assert config.train.out_dir == f"runs/{name}"
    assert config_from_dict(tomllib.loads(to_toml(config))) == config


def test_embedded_is_the_default_and_runs_the_whole_protocol():
    config = load_config()
    assert config.data.dataset == "embedded"
    assert config.train.mode == "all"
    assert config.data.frame_size == 4 * config.data.heatmap_size


@pytest.mark.parametrize("name", AUTHORS)
def test_shipped_configs_follow_the_authors_recipe(name):
    config = load_config(name)
    optim, train, model = config.optim, config.train, config.model
    assert (optim.lr_per_16, optim.momentum, optim.weight_decay, optim.clip_grad) == (0.001, 0.9, 3e-4, 40.0)
    assert (train.epochs, train.batch_size, train.mode) == (10, 12, "all")
    assert model.sync_bn and model.pose_channels == 17 and model.dropout == 0.5
    assert (config.data.clip_len, config.data.rgb_every, config.data.frame_size, config.data.heatmap_size) == (
        48, 3, 224, 56)
    assert config.data.sigma == 0.6 and config.data.flip_prob == 0.5
    assert model.num_classes == {"ntu60": 60, "ntu120": 120, "pku": 51, "toyota": 31}[name.split("_")[0]]
    assert train.metric == ("mean_class_accuracy" if name.startswith("toyota") else "top1")


def test_load_by_path_names_the_out_dir_after_the_file(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 3\n", "my_run.toml")
    config = load_config(path)
    assert config.train.epochs == 3 and config.train.out_dir == "runs/my_run"
    assert config.optim == Config().optim  # everything else at its default


def test_unknown_key_names_key_table_file_and_suggestion(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'lr'" in message and "[optim]" in message and str(path) in message and "'lr_per_16'" in message


def test_unknown_table_and_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian' in the top level; did you mean 'train'"):
        load_config(write(tmp_path, "[trian]\nepochs = 1\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'sed' in \[data.embedded\]; did you mean 'seed'"):
        load_config(write(tmp_path, "[data.embedded]\nsed = 1\n"))


def test_unknown_key_without_close_match_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'zzzz' in \[model\]; valid keys: num_classes"):
        load_config(write(tmp_path, "[model]\nzzzz = 1\n"))


@pytest.mark.parametrize("text, key", [
    ('[train]\nepochs = "ten"\n', "train.epochs must be an integer"),
    ("[train]\nepochs = 2.5\n", "train.epochs must be an integer"),
    ("[model]\nfused = 1\n", "model.fused must be true or false"),
    ("[train]\nbatch_size = true\n", "train.batch_size must be an integer"),
    ('[train]\ninit_from = "a.pt"\n', "train.init_from must be a list of a string"),
    ("[data]\nsigma = \"wide\"\n", "data.sigma must be a number"),
    ("[model]\nchannels_last = 3\n", "model.channels_last must be true or false or a string"),
    ('[train]\nmode = "both"\n', "train.mode must be one of"),
    ('[train]\namp = "fp8"\n', "train.amp must be one of"),
    ("[train]\nepochs = 0\n", "train.epochs must be > 0"),
    ("[optim]\nweight_decay = -1.0\n", "optim.weight_decay must be >= 0"),
    ("[optim]\nmin_lr = nan\n", "optim.min_lr must be finite"),
    ("data = 3\n", "[data] must be a table"),
])
def test_wrong_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value)


def test_int_is_accepted_for_a_float():
    config = config_from_dict({"optim": {"clip_grad": 20}})
    assert config.optim.clip_grad == 20.0 and isinstance(config.optim.clip_grad, float)


def test_overrides_are_applied_before_validation(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 3\n")
    config = load_config(path, ["train.epochs=5", "optim.lr_per_16=2e-3", "train.init_from=['a.pt', 'b.pt']",
                                "train.out_dir=runs/with space", "data.embedded.seed=7", "model.fused=false",
                                'data.ann_file="x=y.pkl"'])
    assert config.train.epochs == 5 and config.optim.lr_per_16 == 0.002
    assert config.train.init_from == ["a.pt", "b.pt"]
    assert config.train.out_dir == "runs/with space"  # a bare string
    assert config.data.embedded.seed == 7 and config.model.fused is False
    assert config.data.ann_file == "x=y.pkl"


def test_override_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'epoch' in \[train\]; did you mean 'epochs'"):
        load_config("embedded", ["train.epoch=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("embedded", ["train.epochs"])
    with pytest.raises(ConfigError, match="is a table"):
        load_config("embedded", ["data.embedded=3"])
    with pytest.raises(ConfigError, match="is a value, not a table"):
        load_config("embedded", ["train.epochs.x=3"])
    with pytest.raises(ConfigError, match=r"with overrides train.epochs=many\): train.epochs must be an integer"):
        load_config("embedded", ["train.epochs=many"])


def test_parse_override_values():
    assert parse_override("a.b=3") == (("a", "b"), 3)
    assert parse_override("a.b = true") == (("a", "b"), True)
    assert parse_override("a.b=hello") == (("a", "b"), "hello")
    assert parse_override("a.b=[1, 2]") == (("a", "b"), [1, 2])


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="neither a file nor one of the shipped configs"):
        load_config("ntu61_xsub")


def test_round_trip_of_unusual_values(tmp_path):
    config = Config(model=ModelConfig(num_classes=7, channels_last=False, dropout=0.25),
                    train=TrainConfig(out_dir='runs/"quoted"\\back\tslash', init_from=["ä.pt", "b c.pt"],
                                      mode="rgb"))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, eps=1e-12, sigma=0.7))
    text = to_toml(config)
    assert config_from_dict(tomllib.loads(text)) == config
    path = write(tmp_path, text)
    assert load_config(path) == config


def test_configs_are_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3


# ---- per-stage recipes ([stages.<stage>]; a key left out takes [train]'s or [optim]'s) ---------------------------

STAGES = ("pose", "rgb", "epamnet")


def test_a_stage_takes_the_shared_settings_by_default():
    config = config_from_dict({"train": {"epochs": 4, "batch_size": 8, "amp": "off"},
                               "optim": {"lr_per_16": 0.01, "weight_decay": 1e-4, "nesterov": True}})
    for s in STAGES:
        recipe = config.stage(s)
        assert (recipe.mode, recipe.pipeline, recipe.epochs, recipe.batch_size, recipe.lr_per_16) == \
            (s, "multimodal", 4, 8, 0.01)
        assert (recipe.weight_decay, recipe.nesterov, recipe.amp, recipe.momentum) == (1e-4, True, "off", 0.9)


def test_a_stage_table_overrides_only_its_stage():
    config = config_from_dict({"train": {"epochs": 4}, "optim": {"lr_per_16": 0.01},
                               "stages": {"rgb": {"epochs": 7, "pipeline": "rgb_only", "batch_size": 3}}},
                              ["stages.epamnet.lr_per_16=0.002", "stages.pose.epochs=1", "stages.pose.lr_per_16=3",
                               "stages.pose.pipeline=pose_only", "stages.pose.amp=bf16"])
    assert [config.stage(s).epochs for s in STAGES] == [1, 7, 4]
    assert [config.stage(s).lr_per_16 for s in STAGES] == [3.0, 0.01, 0.002]
    assert [config.stage(s).pipeline for s in STAGES] == ["pose_only", "rgb_only", "multimodal"]
    assert [config.stage(s).batch_size for s in STAGES] == [12, 3, 12]
    assert [config.stage(s).amp for s in STAGES] == ["bf16", "auto", "auto"]


def test_the_old_per_stage_keys_move_to_their_stage_with_a_warning():
    with pytest.warns(FutureWarning) as warned:
        config = config_from_dict({"train": {"epochs": 4, "pose_epochs": 6, "rgb_epochs": 0},
                                   "optim": {"lr_per_16": 0.04, "epamnet_lr_per_16": 0.02}},
                                  ["train.epamnet_epochs=2", "optim.rgb_lr_per_16=0.5"])
    messages = " | ".join(str(w.message) for w in warned)
    assert "train.pose_epochs is now stages.pose.epochs" in messages
    assert "optim.rgb_lr_per_16 is now stages.rgb.lr_per_16" in messages
    assert [config.stage(s).epochs for s in STAGES] == [6, 4, 2]      # rgb_epochs = 0 meant "not set"
    assert [config.stage(s).lr_per_16 for s in STAGES] == [0.04, 0.5, 0.02]
    with pytest.warns(FutureWarning):  # an old 0 override still means "the shared value"
        config = config_from_dict({"stages": {"pose": {"epochs": 9}}}, ["train.pose_epochs=0"])
    assert config.stage("pose").epochs == config.train.epochs
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="train.pose_epochs = 3 contradicts "
                                                                        "stages.pose.epochs = 5"):
        config_from_dict({"train": {"pose_epochs": 3}, "stages": {"pose": {"epochs": 5}}})


def test_the_shipped_stage_settings():
    embedded = load_config("embedded")  # tuned to train from scratch in minutes: every stage set on its own
    assert all(embedded.stages.__dict__[s].epochs and embedded.stage(s).lr_per_16 > 0.001 for s in STAGES)
    for name in AUTHORS:  # the paper's recipe per stage (sources in the config's comments)
        config = load_config(name)
        pose, rgb, epamnet = (config.stage(s) for s in STAGES)
        assert (pose.pipeline, pose.epochs, pose.batch_size, pose.lr_per_16) == ("pose_only", 240, 32, 0.025)
        assert (rgb.pipeline, rgb.epochs, rgb.batch_size, rgb.lr_per_16) == ("rgb_only", 205, 12, 0.025)
        assert (epamnet.pipeline, epamnet.epochs, epamnet.batch_size, epamnet.lr_per_16) == \
            ("multimodal", 10, 12, 0.001)
        assert {pose.amp, rgb.amp, epamnet.amp} == {"off"}                  # float32, as the authors
        assert {pose.weight_decay, rgb.weight_decay, epamnet.weight_decay} == {3e-4}
        assert config.data.keypoint_flip == "authors"


@pytest.mark.parametrize("override, message", [
    ("stages.pose.epochs=0", "stages.pose.epochs must be > 0"),
    ("stages.epamnet.epochs=1.5", "stages.epamnet.epochs must be an integer"),
    ("stages.rgb.lr_per_16=-0.1", "stages.rgb.lr_per_16 must be > 0"),
    ("stages.rgb.weight_decay=-1", "stages.rgb.weight_decay must be >= 0"),
    ("stages.epamnet.lr_per_16=inf", "stages.epamnet.lr_per_16 must be finite"),
    ("stages.rgb.epoch=2", "unknown key 'epoch' in [stages.rgb]; did you mean 'epochs'"),
    ("stages.fused.epochs=2", "unknown key 'fused' in [stages]"),
    ("stages.pose.pipeline=pose", "stages.pose.pipeline must be one of \"multimodal\", \"pose_only\", \"rgb_only\""),
    ("stages.pose.amp=bf32", "stages.pose.amp must be one of"),
    ("data.keypoint_flip=left", "data.keypoint_flip must be one of \"mirror\", \"authors\", got \"left\""),
    # settings that contradict each other
    ("stages.epamnet.pipeline=pose_only", "stages.epamnet.pipeline = 'pose_only': pipeline 'pose_only' feeds only "
                                          "the pose stream, not rgb, which the epamnet stage reads"),
    ("stages.pose.pipeline=rgb_only", "stages.pose.pipeline = 'rgb_only': pipeline 'rgb_only' feeds only the rgb "
                                      "stream, not pose"),
    ("data.clip_len=13", "data.clip_len = 13 must be a multiple of data.rgb_every = 3"),
    ("data.frame_size=60", "data.frame_size = 60 must be 4 x data.heatmap_size = 16 for the EPAM-Net stage"),
])
def test_bad_stage_settings(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("embedded", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_contradictions_only_count_for_the_stages_that_run():
    config = load_config("embedded", ["train.mode=pose", "stages.epamnet.pipeline=pose_only", "data.frame_size=60"])
    assert config.stage("pose").pipeline == "multimodal"


def test_stage_settings_round_trip(tmp_path):
    config = load_config("ntu60_xsub", ["stages.rgb.epochs=3", "stages.pose.lr_per_16=0.125", "stages.rgb.nesterov=true"])
    text = to_toml(config)
    assert "[stages.rgb]\npipeline = \"rgb_only\"\nepochs = 3\n" in text and "lr_per_16 = 0.125" in text
    assert "momentum" not in text.split("[stages.pose]")[1]  # unset keys are left out, so they keep inheriting
    assert load_config(write(tmp_path, text)) == config


def test_the_stage_s_old_name_is_read_as_an_alias_with_a_warning():
    """The EPAM-Net stage was called "fused" (a word that now means only the C++ kernels): old configs still load."""
    with pytest.warns(FutureWarning, match="train.fused_epochs is now stages.epamnet.epochs"):
        config = config_from_dict({"train": {"mode": "all", "fused_epochs": 3}})
    assert config.stage("epamnet").epochs == 3
    with pytest.warns(FutureWarning) as warned:
        config = config_from_dict({"train": {"mode": "fused"}}, ["optim.fused_lr_per_16=0.5"])
    messages = [str(w.message) for w in warned]
    assert any("train.mode = 'fused' is now 'epamnet'" in m for m in messages), messages
    assert any("optim.fused_lr_per_16 is now stages.epamnet.lr_per_16" in m for m in messages), messages
    assert config.train.mode == "epamnet" and config.stage("epamnet").lr_per_16 == 0.5


@pytest.mark.parametrize("value", ["runs/a b", 'quote " and \\ back', "tab\tline\nünï", ["a.pt", "b c.pt"], 3, True])
def test_override_writes_a_value_parse_override_reads_back(value):
    from epamx.config import override, parse_override

    assert parse_override(override("train.out_dir", value)) == (("train", "out_dir"), value)
