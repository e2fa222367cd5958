"""From a video to an action: `predict --video` with a keypoints file or with the estimator, and the same clip given as
an annotation entry of its raw video, give the same frames and the same logits; bad input is one line."""
import functools
import json

import numpy as np
import pytest
import torch

from epamx import inference
from epamx.cli import main
from epamx.config import load_config
from epamx.data import SampleError, load_annotations, read_video
from epamx.data.annotations import dump_annotations
from epamx.data.transforms import crop_resize_frames
from epamx.inference.inputs import build_batch_transform, clip_batch
from epamx.models import build_model
from epamx.models.streams import stream_logits
from pose_fakes import CLASSES, TABLE_ENV, TINY, TableEstimator, raw_video, tiny_checkpoint, write_table
from testkit import one_thread


@pytest.fixture
def clip(tmp_path, monkeypatch):
    """A raw 48x64 video, its keypoints as a file (.npz) and as an annotation entry, the estimator that finds them,
    and a tiny EPAM-Net checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EPAMX_DEBUG", raising=False)
    (tmp_path / "raw").mkdir()
    video = tmp_path / "raw" / "person.mp4"
    kp, scores = raw_video(video, seed=3, frames=12)
    keypoints = tmp_path / "person.npz"
    np.savez(keypoints, keypoint=kp, keypoint_score=scores)
    ann = {"frame_dir": "person", "label": 1, "img_shape": (48, 64), "original_shape": (48, 64), "total_frames": 12,
           "keypoint": kp, "keypoint_score": scores}
    dump_annotations(tmp_path / "ann.pkl", [ann], {"all": ["person"]}, CLASSES)
    table = write_table(tmp_path / "table.npz", {str(video): (kp, scores)})
    monkeypatch.setenv(TABLE_ENV, str(table))
    with one_thread():
        yield {"video": video, "keypoints": keypoints, "ann": tmp_path / "ann.pkl", "table": str(table),
               "checkpoint": tiny_checkpoint(tmp_path / "final.pt"), "root": tmp_path / "raw"}


def logits(model, cfg, dataset):
    transform = build_batch_transform(cfg, "epamnet", torch.device("cpu"))
    batch, (imgs, heatmaps, _) = clip_batch(transform, dataset, [0], torch.device("cpu"))
    with torch.no_grad():
        return batch, stream_logits(model, imgs, heatmaps)


def test_one_answer_per_clip_whichever_way_it_is_given(clip):
    cfg = load_config("embedded", TINY)
    torch.manual_seed(0)
    model = build_model("epamnet", len(CLASSES), 17).eval()
    given = {
        "--video --keypoints": inference.clips(cfg, CLASSES, "epamnet", video=str(clip["video"]),
                                               keypoints=str(clip["keypoints"])),
        "--video (estimated)": inference.clips(cfg, CLASSES, "epamnet", video=str(clip["video"]),
                                               estimator=functools.partial(TableEstimator, clip["table"])),
        # data.rgb_precropped = true (the configs' default): the raw frames are found out and cropped all the same
        "--ann --sample": inference.clips(cfg, CLASSES, "epamnet", ann_file=str(clip["ann"]), samples=["person"],
                                          video_root=str(clip["root"])),
        "--ann, rgb_precropped=false": inference.clips(load_config("embedded", TINY + ["data.rgb_precropped=false"]),
                                                       CLASSES, "epamnet", ann_file=str(clip["ann"]),
                                                       samples=["person"], video_root=str(clip["root"])),
    }
    assert cfg.data.rgb_precropped
    results = {how: logits(model, cfg, dataset) for how, dataset in given.items()}
    (first_batch, first), *others = results.values()
    assert first_batch["imgs"].shape == (1, 2, 32, 32, 3)
    # --precropped on raw frames cannot squash them either
    said_cropped = inference.clips(cfg, CLASSES, "epamnet", video=str(clip["video"]),
                                   keypoints=str(clip["keypoints"]), precropped=True)
    assert torch.equal(said_cropped[0]["imgs"], first_batch["imgs"][0])
    whole = crop_resize_frames(read_video(clip["video"], [1, 7]), (0, 0, 64, 48), 32)  # the squash it was before
    assert not np.array_equal(whole, first_batch["imgs"][0].numpy())
    for batch, out in others:
        assert torch.equal(batch["imgs"], first_batch["imgs"])
        assert torch.equal(batch["keypoint"], first_batch["keypoint"])
        for stream in ("rgb", "pose"):
            assert torch.equal(out[stream], first[stream])


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_from_the_command_line(clip, capsys):
    run = ["predict", "--checkpoint", clip["checkpoint"], "--config", "embedded", *TINY, "--json"]
    answers = []
    for args in (["--video", clip["video"], "--keypoints", clip["keypoints"]],
                 ["--video", clip["video"], "--estimator", "pose_fakes:TableEstimator"],
                 ["--ann", clip["ann"], "--video-root", clip["root"], "--sample", "person"]):
        rc, out, err = cli(capsys, *run, *args)
        assert rc == 0, err
        (answer,) = json.loads(out)["clips"]
        assert answer["person_detected"] is True
        answers.append((answer["top"], answer["streams"]))
    assert answers[0] == answers[1] == answers[2]


def test_a_video_with_nobody_still_gets_an_answer_flagged(clip, capsys, tmp_path):
    nobody = tmp_path / "nobody.mp4"
    raw_video(nobody, seed=8, frames=9)  # not in the estimator's table: nobody found in any frame
    args = ["predict", "--checkpoint", clip["checkpoint"], "--config", "embedded", *TINY, "--video", nobody,
            "--estimator", "pose_fakes:TableEstimator", "--top-k", 2]
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    assert out.startswith("nobody: ") and out.rstrip().endswith("(no person detected)")
    rc, out, err = cli(capsys, *args, "--json")
    (answer,) = json.loads(out)["clips"]
    assert answer["person_detected"] is False and len(answer["top"]) == 2


def one_line(rc, err, *needles):
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("epamx predict: error: "), err
    assert all(str(n) in err for n in needles), err


def test_bad_input_is_one_line_naming_the_file(clip, capsys, tmp_path):
    run = ["predict", "--checkpoint", clip["checkpoint"], "--config", "embedded", *TINY]
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for video in (text, empty):
        for extra in (["--keypoints", clip["keypoints"]], ["--estimator", "pose_fakes:TableEstimator"]):
            rc, _, err = cli(capsys, *run, "--video", video, *extra)
            one_line(rc, err, video)
    short = tmp_path / "short.npz"
    data = dict(np.load(clip["keypoints"]))
    np.savez(short, keypoint=data["keypoint"][:, :7], keypoint_score=data["keypoint_score"][:, :7])
    rc, _, err = cli(capsys, *run, "--video", clip["video"], "--keypoints", short)
    one_line(rc, err, short, "7 frames", "12")
    rc, _, err = cli(capsys, *run, "--keypoints", short)
    one_line(rc, err, "--keypoints with --video")


def test_frames_that_are_not_the_annotations_image_are_refused(clip, tmp_path):
    """A non-square video whose shape is not the annotation's image: its keypoints cannot place the crop; cropping
    would squash it, so the sample is refused, named."""
    (ann,) = load_annotations(clip["ann"])
    ann = {**ann, "img_shape": (64, 64), "original_shape": (64, 64)}
    dump_annotations(tmp_path / "square.pkl", [ann], {"all": ["person"]}, CLASSES)
    dataset = inference.clips(load_config("embedded", TINY), CLASSES, "epamnet", ann_file=str(tmp_path / "square.pkl"),
                              samples=["person"], video_root=str(clip["root"]))
    with pytest.raises(SampleError, match=r"person.*48x64.*64x64"):
        dataset[0]
