"""Labelled video datasets, read and checked before anything is streamed.

Two layouts:

* **annotations**: a folder with ``annotations.csv`` (header ``path,label``; paths relative to
  the folder). The class order is ``labels.txt`` beside it when there is one, else the order in
  which labels first appear.
* **Something-Something v2**: a folder with the labels JSON (``something-something-v2-labels.json``
  or ``labels.json``: class name to index) and a list JSON (``something-something-v2-validation.json``,
  ``validation.json``, ``something-something-v2-test.json``... or the file given as ``--dataset``
  itself): entries with ``id`` and ``template`` (``"Putting [something] on [something]"``: the
  class is the template without brackets) or, without a template, ``label`` (a class name). The
  videos are ``ID.webm`` (or ``.mp4``) in ``20bn-something-something-v2/``, ``videos/`` or the
  folder itself.

Every problem is one ``UserError`` naming the first offender: a missing file, a label the
dataset's own class list does not have, an entry without an id, a video PyAV cannot open.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

SSV2_LABELS = ("something-something-v2-labels.json", "labels.json")
SSV2_LISTS = ("something-something-v2-validation.json", "validation.json",
              "something-something-v2-test.json", "test.json",
              "something-something-v2-train.json", "train.json")
SSV2_VIDEO_DIRS = ("20bn-something-something-v2", "videos", ".")
VIDEO_SUFFIXES = (".webm", ".mp4")


@dataclass(frozen=True)
class Clip:
    path: Path   # the video file
    label: str
    name: str    # as the dataset names it: the relative path, or the SSv2 id


@dataclass(frozen=True)
class Dataset:
    root: Path
    layout: str                 # "annotations" | "something-something-v2"
    labels: tuple[str, ...]     # the dataset's classes, in its order
    clips: tuple[Clip, ...]

    def to_json(self) -> dict:
        return {"path": str(self.root), "layout": self.layout, "clips": len(self.clips),
                "labels": len(self.labels)}


def load_dataset(spec: str | Path) -> Dataset:
    """The dataset at ``spec`` (a folder, or an SSv2 list JSON), files checked to exist."""
    p = Path(spec)
    if not p.exists():
        raise UserError(f"--dataset {p} does not exist; give a folder with annotations.csv or "
                        "the Something-Something v2 layout")
    if p.is_file():
        if p.suffix == ".json":
            return _ssv2(p.parent, p)
        if p.name == "annotations.csv":
            return _annotations(p.parent)
        raise UserError(f"--dataset {p} is neither a folder, annotations.csv nor an SSv2 list "
                        "JSON")
    if (p / "annotations.csv").is_file():
        return _annotations(p)
    if _first_file(p, SSV2_LABELS):
        return _ssv2(p, None)
    raise UserError(f"--dataset {p} has neither annotations.csv nor a Something-Something v2 "
                    f"labels JSON ({' or '.join(SSV2_LABELS)})")


def _annotations(root: Path) -> Dataset:
    path = root / "annotations.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = list(enumerate(reader, start=2))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc})") from None
    if header[:2] != ["path", "label"]:
        raise UserError(f"{path} line 1 is {','.join(header)!r}; the header must be 'path,label'")
    clips, order = [], []
    for line, row in rows:
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"{path} line {line} is {','.join(row)!r}; each line is PATH,LABEL")
        rel, label = row[0].strip(), row[1].strip()
        video = root / rel
        if not video.is_file():
            raise UserError(f"{path} line {line}: video {rel} does not exist in {root}")
        clips.append(Clip(video, label, rel))
        if label not in order:
            order.append(label)
    if not clips:
        raise UserError(f"{path} lists no clips")
    labels_txt = root / "labels.txt"
    if labels_txt.is_file():
        listed = [ln.strip() for ln in labels_txt.read_text(encoding="utf-8").splitlines()
                  if ln.strip()]
        unknown = next((c for c in clips if c.label not in listed), None)
        if unknown is not None:
            raise UserError(f"{path}: clip {unknown.name} has label {unknown.label!r}, which "
                            f"{labels_txt} does not list (valid: {_some(listed)})")
        order = listed
    return Dataset(root, "annotations", tuple(order), tuple(clips))


def _first_file(root: Path, names) -> Path | None:
    """The first of ``names`` that is a file in ``root``."""
    return next((root / n for n in names if (root / n).is_file()), None)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None


def _ssv2(root: Path, list_file: Path | None) -> Dataset:
    labels_file = _first_file(root, SSV2_LABELS)
    if labels_file is None:
        raise UserError(f"{root} has no Something-Something v2 labels JSON "
                        f"({' or '.join(SSV2_LABELS)})")
    raw = _load_json(labels_file)
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{labels_file} must map class names to indices, e.g. "
                        '{"Putting something on something": "0"}')
    try:
        order = [name for name, _ in sorted(raw.items(), key=lambda kv: int(kv[1]))]
    except (TypeError, ValueError):
        raise UserError(f"{labels_file}: the indices must be integers (as numbers or "
                        "strings)") from None
    if list_file is None:
        list_file = _first_file(root, SSV2_LISTS)
        if list_file is None:
            raise UserError(f"{root} has no Something-Something v2 list JSON (one of "
                            f"{', '.join(SSV2_LISTS)}); or give the list file as --dataset")
    entries = _load_json(list_file)
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{list_file} must be a non-empty list of entries with 'id' and "
                        "'template' (or 'label')")
    known = set(order)
    clips = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "id" not in e:
            raise UserError(f"{list_file} entry {i} has no 'id': {str(e)[:80]}")
        vid = str(e["id"])
        if "template" in e:
            label = str(e["template"]).replace("[", "").replace("]", "")
        elif "label" in e:
            label = str(e["label"])
        else:
            raise UserError(f"{list_file} entry {i} (id {vid}) has neither 'template' nor "
                            "'label'")
        if label not in known:
            raise UserError(f"{list_file} entry {i} (id {vid}) has class {label!r}, which "
                            f"{labels_file.name} does not list (valid: {_some(order)})")
        video = _ssv2_video(root, vid)
        if video is None:
            raise UserError(f"{list_file} entry {i}: video {vid}.webm (or .mp4) does not exist "
                            f"in {root} ({', '.join(SSV2_VIDEO_DIRS)})")
        clips.append(Clip(video, label, vid))
    return Dataset(root, "something-something-v2", tuple(order), tuple(clips))


def _ssv2_video(root: Path, vid: str) -> Path | None:
    for d in SSV2_VIDEO_DIRS:
        for suffix in VIDEO_SUFFIXES:
            p = root / d / f"{vid}{suffix}"
            if p.is_file():
                return p
    return None


def _some(names, n: int = 8) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


def check_videos(clips) -> dict[str, int | None]:
    """Every clip (``Clip``s, e.g. a dataset's ``clips``) opens in PyAV and has a video stream;
    else the first that does not is the error. Returns each clip's frame count as its container
    declares it (the stream's frame count, else its duration times its frame rate; None when
    neither is known)."""
    try:
        import av
    except ImportError:
        raise UserError("evaluate needs PyAV to read videos: pip install av") from None
    declared = {}
    for clip in clips:
        try:
            with av.open(str(clip.path)) as container:
                stream = container.streams.video[0] if container.streams.video else None
                if stream is not None:
                    declared[clip.name] = _declared_frames(container, stream)
        except (av.error.FFmpegError, UnicodeDecodeError, OSError) as exc:
            raise UserError(f"--dataset clip {clip.name} ({clip.path}) is not a video PyAV can "
                            f"open ({str(exc).splitlines()[0][:120]})") from None
        if stream is None:
            raise UserError(f"--dataset clip {clip.name} ({clip.path}) has no video stream")
    return declared


def _declared_frames(container, stream) -> int | None:
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.base_rate
    if container.duration and rate:
        return int(round(container.duration / 1e6 * float(rate)))
    return None
