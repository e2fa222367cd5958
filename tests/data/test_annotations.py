"""PoseC3D annotation pickles: round trips in every layout and pickle protocol, validation errors that name the file
and the sample, and crafted pickles refused before they can run anything."""
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from epamx.data import AnnotationError, UnsafePickleError, dump_annotations, load_annotations, safe_load_pickle
from epamx.data.annotations import class_names_of, read_label_map
from epamx.errors import DataError, DataFileNotFound, EpamxError
from fakes import make_annotation, write_pickle


def _annotations(seed=0, count=5):
    rng = np.random.RandomState(seed)
    anns = [make_annotation(rng, f"S{seed:03d}P{i:03d}", int(rng.randint(0, 7)), persons=int(rng.randint(0, 4)),
                            frames=int(rng.randint(5, 14)), img_shape=(int(rng.randint(20, 90)),
                                                                       int(rng.randint(20, 90))))
            for i in range(count)]
    anns[1]["label"] = np.int64(anns[1]["label"])           # NumPy scalars as the pickles from mmcv hold them
    anns[2]["keypoint"] = anns[2]["keypoint"].astype(np.float64)
    del anns[3]["keypoint_score"]                           # absent scores mean 1
    return anns


def _assert_same(got, expected):
    assert [a["frame_dir"] for a in got] == [a["frame_dir"] for a in expected]
    for g, e in zip(got, expected):
        assert g["label"] == int(e["label"]) and type(g["label"]) is int
        assert g["total_frames"] == e["total_frames"] and g["img_shape"] == tuple(e["img_shape"])
        assert g["keypoint"].dtype == np.float32 and g["keypoint_score"].dtype == np.float32
        np.testing.assert_array_equal(g["keypoint"], e["keypoint"].astype(np.float32))
        score = e.get("keypoint_score", np.ones(e["keypoint"].shape[:-1], np.float32))
        np.testing.assert_array_equal(g["keypoint_score"], score)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_dict_with_split_round_trip(tmp_path, protocol):
    anns = _annotations(protocol)
    names = [a["frame_dir"] for a in anns]
    split = {"xsub_train": [names[4], names[0], names[2]], "xsub_val": [names[3], names[1]]}
    path = write_pickle(tmp_path / "ntu.pkl", {"split": split, "annotations": anns}, protocol)
    _assert_same(load_annotations(path, "xsub_train"), [anns[4], anns[0], anns[2]])
    _assert_same(load_annotations(path, "xsub_val", num_classes=7), [anns[3], anns[1]])
    _assert_same(load_annotations(path), anns)


@pytest.mark.parametrize("protocol", [2, 5])
def test_plain_list_with_a_user_split(tmp_path, protocol):
    anns = _annotations(10 + protocol)
    path = write_pickle(tmp_path / "list.pkl", anns, protocol)
    chosen = [anns[2]["frame_dir"], anns[0]["frame_dir"]]
    _assert_same(load_annotations(path, chosen), [anns[2], anns[0]])
    split_file = tmp_path / "val.txt"
    split_file.write_text("\n".join(chosen) + "\n\n")
    _assert_same(load_annotations(path, str(split_file)), [anns[2], anns[0]])
    _assert_same(load_annotations(path), anns)
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*plain list"):
        load_annotations(path, "xsub_val")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_clips_without_persons_round_trip(tmp_path, protocol):
    """An empty keypoint array pickles its (empty) bytes as a call to bytes() under protocol 2, mmcv's default."""
    anns = [make_annotation(np.random.RandomState(protocol), f"empty{i}", i, persons=0, frames=7 + i)
            for i in range(2)]
    assert anns[0]["keypoint"].shape == (0, 7, 17, 2)
    path = write_pickle(tmp_path / "empty.pkl", {"split": {"val": ["empty1"]}, "annotations": anns}, protocol)
    _assert_same(load_annotations(path), anns)
    _assert_same(load_annotations(path, "val"), anns[1:])


def test_bytes_is_admitted_only_empty(tmp_path):
    """bytes(n) would allocate n bytes: protocol 2's empty-bytes call is the only use the format has."""
    path = tmp_path / "big.pkl"
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x7f\x85R.")  # bytes(2**31 - 2**24)
    with pytest.raises(UnsafePickleError, match=re.escape(str(path))):
        safe_load_pickle(path)


def test_pickles_written_by_numpy_1(tmp_path):
    """NumPy 1.x names its pickling helpers numpy.core.*; protocol 2 spells globals as text, so rename them."""
    anns = _annotations(4)
    data = pickle.dumps({"split": {}, "annotations": anns}, protocol=2)
    assert b"numpy._core" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data.replace(b"numpy._core", b"numpy.core"))
    _assert_same(load_annotations(path), anns)


def test_dump_annotations_and_class_names(tmp_path):
    anns = _annotations(3)
    path = tmp_path / "out.pkl"
    dump_annotations(path, anns, {"train": [anns[0]["frame_dir"]]}, classes=["a", "b"])
    assert sorted(os.listdir(tmp_path)) == ["out.pkl"], "no temporary file left behind"
    _assert_same(load_annotations(path, "train"), anns[:1])
    assert class_names_of(path) == ["a", "b"]
    labels = tmp_path / "labels.txt"
    labels.write_text("drink\n\nwave\n")
    assert read_label_map(labels) == ["drink", "wave"]


def test_a_failed_dump_leaves_the_old_file(tmp_path):
    anns = _annotations(4)
    path = tmp_path / "out.pkl"
    dump_annotations(path, anns, {"train": [anns[0]["frame_dir"]]})
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        dump_annotations(path, [dict(anns[0], extra=lambda: None)], {})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out.pkl"]


def _broken(mutation):
    ann = make_annotation(np.random.RandomState(5), "S017C003P020R002A060", 3, persons=2, frames=9)
    mutation(ann)
    return ann


def _pop(key):
    return lambda a: a.pop(key)


def _set(key, value):
    return lambda a: a.__setitem__(key, value(a) if callable(value) else value)


BAD = {
    "missing keypoint": (_pop("keypoint"), "missing key 'keypoint'"),
    "missing label": (_pop("label"), "missing key 'label'"),
    "missing img_shape": (lambda a: (a.pop("img_shape"), a.pop("original_shape")), "img_shape"),
    "keypoint 3-d": (_set("keypoint", lambda a: a["keypoint"][..., 0]), r"'keypoint' must be .*\(2, 9, 17\)"),
    "keypoint xyz": (_set("keypoint", lambda a: np.zeros((2, 9, 17, 3), np.float32)), "'keypoint' must be"),
    "keypoint strings": (_set("keypoint", lambda a: a["keypoint"].astype(str)), "'keypoint' must be"),
    "score shape": (_set("keypoint_score", lambda a: a["keypoint_score"][:, :8]), r"'keypoint_score' .*\(2, 8, 17\)"),
    "negative label": (_set("label", -1), "'label' must be an int >= 0"),
    "text label": (_set("label", "drink"), "'label' must be an int >= 0"),
    "bool label": (_set("label", True), "'label' must be an int >= 0"),
    "frame count": (_set("total_frames", 10), "'keypoint' has 9 frames but 'total_frames' is 10"),
    "zero frames": (_set("total_frames", 0), "'total_frames' must be an int >= 1"),
    "bad img_shape": (_set("img_shape", (0, 64)), "'img_shape' must be positive"),
    "infinite img_shape": (_set("img_shape", (float("inf"), 64)), re.escape("'img_shape' must be (h, w), got (inf")),
    "text img_shape": (_set("img_shape", "48"), re.escape("'img_shape' must be (h, w), got '48'")),
    "huge img_shape": (_set("img_shape", (2 ** 70, 64)), "'img_shape' must be positive \\(and below 2\\*\\*31\\)"),
    "complex keypoints": (_set("keypoint", lambda a: a["keypoint"] * 1j), "'keypoint' must be a real .*complex"),
    "ragged keypoints": (_set("keypoint", lambda a: [a["keypoint"][0].tolist(), [[1.0, 2.0]]]),
                         "'keypoint' is not an array"),
    "complex scores": (_set("keypoint_score", lambda a: a["keypoint_score"] + 0j), "'keypoint_score' must be a real"),
    "huge frame count": (lambda a: a.update(keypoint=np.zeros((0, 0, 17, 2), np.float32), keypoint_score=None,
                                            total_frames=2 ** 70), "'total_frames' must be an int >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_annotations_name_the_file_and_the_sample(tmp_path, case):
    mutation, message = BAD[case]
    good = make_annotation(np.random.RandomState(6), "S001C001P001R001A001", 0, frames=9)
    path = write_pickle(tmp_path / "bad.pkl", {"split": {}, "annotations": [good, _broken(mutation)]})
    with pytest.raises(AnnotationError, match=message) as info:
        load_annotations(path)
    assert str(path) in str(info.value)
    assert "annotation 1" in str(info.value) and "S017C003P020R002A060" in str(info.value)


def test_the_joint_count_is_checked(tmp_path):
    good = make_annotation(np.random.RandomState(6), "S001C001P001R001A001", 0, frames=9)
    five = make_annotation(np.random.RandomState(7), "S017C003P020R002A060", 1, frames=9, joints=5)
    path = write_pickle(tmp_path / "five.pkl", {"split": {"all": ["S001C001P001R001A001"]},
                                                "annotations": [good, five]})
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: annotation 1 ('S017C003P020R002A060'): 'keypoint' "
                                                        "has 5 joints per person, but the skeleton has 17")):
        load_annotations(path, num_joints=17)
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*'S017C003P020R002A060' has 5 joints per "
                       "person, but 'S001C001P001R001A001' has 17: every annotation .* same skeleton"):
        load_annotations(path)
    assert len(load_annotations(path, "all", num_joints=None)) == 1, "only the split's annotations must agree"
    assert len(load_annotations(path, [five["frame_dir"]])) == 1


def test_split_lists_of_the_wrong_type(tmp_path):
    anns = _annotations(9)
    for value in (None, 3, {"a": 1}):
        path = write_pickle(tmp_path / "split.pkl", {"split": {"train": value}, "annotations": anns})
        with pytest.raises(AnnotationError, match=re.escape(f"{path}: split 'train' must be a list of frame_dirs")):
            load_annotations(path, "train")


def test_an_entry_without_frame_dir_is_named_by_position(tmp_path):
    ann = _broken(_pop("frame_dir"))
    path = write_pickle(tmp_path / "bad.pkl", [ann])
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: annotation 0: missing key 'frame_dir'")):
        load_annotations(path)


def test_split_errors(tmp_path):
    anns = _annotations(7)
    path = write_pickle(tmp_path / "ntu.pkl", {"split": {"xsub_train": [anns[0]["frame_dir"]], "xsub_val": []},
                                                "annotations": anns})
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: no split 'xview_val'; the file has "
                                                        "['xsub_train', 'xsub_val']")):
        load_annotations(path, "xview_val")
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*with no annotation.*'nowhere'"):
        load_annotations(path, ["nowhere"])
    no_split = write_pickle(tmp_path / "nosplit.pkl", {"annotations": anns})
    with pytest.raises(AnnotationError, match="no 'split' dict"):
        load_annotations(no_split, "xsub_train")
    wrong = write_pickle(tmp_path / "wrong.pkl", {"annots": anns})
    with pytest.raises(AnnotationError, match=re.escape(str(wrong)) + ".*'annotations'"):
        load_annotations(wrong)


def test_labels_beyond_the_model_are_refused(tmp_path):
    anns = _annotations(8)
    anns[3]["label"] = 60
    path = write_pickle(tmp_path / "ntu.pkl", anns)
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + f".*'{anns[3]['frame_dir']}' has label 60, "
                                              "but the model has 60 classes"):
        load_annotations(path, num_classes=60)
    assert len(load_annotations(path, num_classes=61)) == len(anns)


class _ShellPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def create_marker(path):
    with open(path, "w") as f:
        f.write("the pickle ran code")


class _FunctionPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return create_marker, (str(self.marker),)


@pytest.mark.parametrize("payload,refused", [(_ShellPayload, "posix.system"),
                                             (_FunctionPayload, "test_annotations.create_marker")])
@pytest.mark.parametrize("where", ["top", "inside an annotation"])
def test_pickles_carrying_code_are_refused_before_it_runs(tmp_path, payload, refused, where):
    marker = tmp_path / "marker"
    evil = payload(marker)
    anns = _annotations(9)
    if where == "top":
        data = evil
    else:
        anns[1]["keypoint_score"] = evil
        data = {"split": {}, "annotations": anns}
    path = write_pickle(tmp_path / "evil.pkl", data)
    for load in (lambda: load_annotations(path), lambda: safe_load_pickle(path)):
        with pytest.raises(UnsafePickleError, match=re.escape(f"{path}: refused to load {refused}")):
            load()
        assert not marker.exists()
    # The payload is real: plain pickle runs it.
    if payload is _ShellPayload:
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_the_payload_does_not_run_in_a_fresh_interpreter(tmp_path):
    """Nothing imported beforehand (the test module's function is not importable there either)."""
    marker = tmp_path / "marker"
    path = write_pickle(tmp_path / "evil.pkl", {"annotations": [_ShellPayload(marker)]}, protocol=2)
    code = ("import sys; from epamx.data import load_annotations, UnsafePickleError\n"
            "try:\n    load_annotations(sys.argv[1])\nexcept UnsafePickleError as e:\n    print('refused', e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.stdout.startswith("refused"), result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_truncated_and_garbage_pickles(tmp_path, protocol):
    path = write_pickle(tmp_path / "ntu.pkl", {"split": {}, "annotations": _annotations(protocol)}, protocol)
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(AnnotationError, match=re.escape(str(path)) + ": not a readable annotation pickle") as info:
            load_annotations(path)
        assert info.value.__cause__ is not None, "the unpickler's error is kept"
    path.write_bytes(b"")
    with pytest.raises(AnnotationError, match=re.escape(str(path))):
        load_annotations(path)
    path.write_bytes(np.random.RandomState(protocol).bytes(999))
    with pytest.raises((AnnotationError, UnsafePickleError), match=re.escape(str(path))):
        load_annotations(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataFileNotFound, match=re.escape(str(tmp_path / "none.pkl"))):
        load_annotations(tmp_path / "none.pkl")
    with pytest.raises(DataFileNotFound, match=re.escape(str(tmp_path / "labels.txt"))):
        read_label_map(tmp_path / "labels.txt")
    (tmp_path / "labels.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(AnnotationError, match=re.escape(str(tmp_path / "labels.txt")) + ".*not UTF-8"):
        read_label_map(tmp_path / "labels.txt")


def test_the_errors_are_data_errors():
    assert issubclass(AnnotationError, DataError) and issubclass(DataFileNotFound, FileNotFoundError)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError) and issubclass(UnsafePickleError, AnnotationError)
    from epamx.data import DecodeError, SampleError
    from epamx.data.annotations import AnnotationError as same
    assert same is AnnotationError and issubclass(DecodeError, DataError) and issubclass(SampleError, DataError)
    assert all(issubclass(e, EpamxError) for e in (AnnotationError, UnsafePickleError, DecodeError, SampleError))
