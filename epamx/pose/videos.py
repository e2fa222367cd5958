"""Which videos ``epamx keypoints`` reads, what each is called (its frame_dir) and labelled, and the splits.

A video given as a file is called by its name without suffix; a folder is searched (recursively, sorted) for files
with a video suffix, each called by its path inside the folder without suffix (``wave/clip01``), so the annotation
file reads back with ``data.video_root=<folder>`` and ``data.video_suffix=<suffix>``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from epamx.errors import DataError, DataFileNotFound

__all__ = ["VIDEO_SUFFIXES", "Video", "find_videos", "labels_from_file", "labels_from_folders", "read_splits"]

PathLike = Union[str, os.PathLike]
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class Video:
    frame_dir: str      # the annotation's name for it
    path: str


def _frame_dir(path: Path) -> str:
    return path.as_posix()[: -len(path.suffix)] if path.suffix else path.as_posix()


def find_videos(inputs: Sequence[PathLike], suffixes: Sequence[str] = VIDEO_SUFFIXES) -> List[Video]:
    """The videos ``inputs`` (files, or folders searched for ``suffixes``) name, in order. Raises
    DataFileNotFound for an input that does not exist, DataError for a folder without videos or two videos of one
    name."""
    found: List[Video] = []
    lowered = tuple(s.lower() for s in suffixes)
    for given in map(Path, inputs):
        if given.is_file():
            found.append(Video(_frame_dir(Path(given.name)), os.fspath(given)))
        elif given.is_dir():
            inside = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in lowered)
            if not inside:
                raise DataError(f"{given}: no videos in this folder (looked for {', '.join(suffixes)})")
            found += [Video(_frame_dir(p.relative_to(given)), os.fspath(p)) for p in inside]
        else:
            raise DataFileNotFound(f"video or folder {given} does not exist")
    seen: Dict[str, str] = {}
    for video in found:
        if video.frame_dir in seen:
            raise DataError(f"two videos would have the name {video.frame_dir!r}: {seen[video.frame_dir]} and "
                            f"{video.path}; give their folder instead (names are then paths inside it), or rename one")
        seen[video.frame_dir] = video.path
    return found


def labels_from_folders(videos: Sequence[Video]) -> Tuple[Dict[str, int], List[str]]:
    """Each video's class is the name of the folder it is in; classes sorted by name -> ({frame_dir: label},
    class names)."""
    folder = {v.frame_dir: Path(v.path).parent.name for v in videos}
    classes = sorted(set(folder.values()))
    index = {name: i for i, name in enumerate(classes)}
    return {name: index[c] for name, c in folder.items()}, classes


def labels_from_file(path: PathLike, videos: Sequence[Video], classes: Optional[Sequence[str]] = None
                     ) -> Tuple[Dict[str, int], Optional[List[str]]]:
    """Labels from a text file of lines ``NAME LABEL`` (NAME: a video's name or file name; LABEL: a class index, or
    a class name). Class names are ``classes`` (a label map) when given, else the names used, sorted. Every video
    must have a label. Raises DataFileNotFound or DataError naming the file and the line."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise DataFileNotFound(f"labels file {source} does not exist")
    by_name = {v.frame_dir: v.frame_dir for v in videos}
    by_name.update({Path(v.path).name: v.frame_dir for v in videos})
    raw: Dict[str, str] = {}
    with open(source, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2:
                raise DataError(f"{source}:{number}: expected 'NAME LABEL', got {line.strip()!r}")
            if fields[0] in by_name:
                raw[by_name[fields[0]]] = fields[1]
    missing = [v.frame_dir for v in videos if v.frame_dir not in raw]
    if missing:
        raise DataError(f"{source}: no label for {len(missing)} videos, e.g. {missing[:3]}")
    if classes is None and all(label.isdigit() for label in raw.values()):
        return {name: int(label) for name, label in raw.items()}, None
    names = list(classes) if classes is not None else sorted(set(raw.values()))
    index = {c: i for i, c in enumerate(names)}
    labels = {}
    for name, label in raw.items():
        if label in index:
            labels[name] = index[label]
        elif label.isdigit() and int(label) < len(names):
            labels[name] = int(label)
        else:
            raise DataError(f"{source}: video {name!r} has label {label!r}, which is not one of the {len(names)} "
                            f"classes")
    return labels, names


def read_splits(specs: Sequence[str], videos: Sequence[Video]) -> Dict[str, List[str]]:
    """Splits from ``NAME=FILE`` specs (FILE: a video's name per line) plus 'all' (every video, in order). Raises
    DataError for a malformed spec or a name that is no video of this run."""
    splits = {"all": [v.frame_dir for v in videos]}
    known = set(splits["all"])
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise DataError(f"--split {spec!r}: expected NAME=FILE (FILE lists the split's videos, one per line)")
        if not os.path.isfile(file):
            raise DataFileNotFound(f"split file {file} (--split {name}) does not exist")
        with open(file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(f"{file}: split {name!r} names {len(unknown)} videos this run does not read, e.g. "
                            f"{unknown[:3]}")
        splits[name] = names
    return splits
