"""Vision inputs -> `MediaItem`s: one image or video with its caption or conversation.

Three input forms, told apart by the `--input` glob (`input_form`):

    manifest    `.jsonl` (`.gz`/`.zst` too), `.json` (one JSON array, as LLaVA-Instruct ships), `.csv`,
                `.parquet`: rows with `path` (or LLaVA's `image` / `video`) and `caption`, or
                `conversations` (LLaVA form). Relative paths are resolved against `media_root`
                (default: the manifest's own directory). Any Beam filesystem.
    webdataset  `.tar` shards as img2dataset / video2dataset write them: members `KEY.jpg|png|mp4|...`
                beside `KEY.txt` (the caption) or `KEY.json` (`caption` or `text` key).
    folder      media files (any other glob, or a directory), each with an optional sidecar caption
                `NAME.txt` beside it; sidecars are read with their media, not as items.

Bad items are Rejections (the job dead-letters them): missing_media_path, unsupported_media_type,
missing_caption (no caption and no conversation, unless uncaptioned items are allowed), too_large (a
WebDataset sample with a member over `--max-media-bytes`, by its tar header: the member is skipped,
never read), and the reading errors of lwm_data.reading. Files named by a manifest or matched in a
folder are size-checked where they are opened to decode (lwm_data.vision.frames.MediaLimits).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow.parquet as pq

from lwm_data import files
from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection, excerpt
from lwm_data.reading import READ_ERRORS, json_object, read_lines
from lwm_data.vision.frames import FRAME_PATHS, Media, MediaLimits, media_type

MANIFEST_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".csv", ".parquet")
CAPTION_SUFFIXES = (".txt", ".json")
PATH_KEYS = ("path", "image", "video")


@dataclass(frozen=True)
class MediaSettings:
    input: str = setting(
        help="Media: a manifest (.jsonl/.json/.csv/.parquet), WebDataset .tar shards, or a folder/glob of files."
    )
    media_root: str | None = setting(None, "Base of relative paths in a manifest (default: the manifest's directory).")
    caption_key: str = setting("caption", "Manifest column / WebDataset JSON key holding the caption.")
    allow_uncaptioned: bool = setting(
        False, "Keep items without a caption as vision-only examples (else dead-lettered)."
    )
    frames: str = setting(
        "lwm",
        "Frame path: lwm (LWM's own pixels: full-resolution decode, Pillow resize and crop) or fast "
        "(scaled in the decoder, draft JPEGs: cheaper, not LWM's codes).",
    )
    limits: MediaLimits = nested(MediaLimits)

    def __post_init__(self):
        if self.frames not in FRAME_PATHS:
            raise ConfigError(f"--frames must be one of {', '.join(FRAME_PATHS)}, not {self.frames!r}")

    @property
    def form(self) -> str:
        return input_form(self.input)

    @property
    def pattern(self) -> str:
        """The glob to match: a bare directory means every file in it."""
        if self.form == "folder" and not any(c in self.input for c in "*?[") and _is_dir(self.input):
            return self.input.rstrip("/") + "/*"
        return self.input


def input_form(pattern: str) -> str:
    name = pattern.lower()
    if name.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    return "webdataset" if name.endswith(".tar") else "folder"


def _is_dir(path: str) -> bool:
    return os.path.isdir(path) if "://" not in path else path.endswith("/")


@dataclass
class MediaItem:
    item_id: str  # unique over the input: manifest#L<line>, TAR#KEY, or the file's path
    source: str  # where the media is, for people (dead letters, `source` column)
    media: Media  # what the decoders open: a path, or a tar member's bytes
    media_type: str  # "image" | "video"
    caption: str | None = None
    conversations: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class MediaReader:
    """Step: one matched input file -> its MediaItems (and Rejections), per the input's form."""

    def __init__(self, settings: MediaSettings, count):
        self.settings = settings
        self.count = count

    def __call__(self, path: str) -> Iterator[MediaItem | Rejection]:
        read = {"manifest": self._manifest, "webdataset": self._tar, "folder": self._file}[self.settings.form]
        for item in read(path):
            self.count("in")
            yield item if isinstance(item, Rejection) else self._checked(item)

    def _checked(self, item: MediaItem) -> MediaItem | Rejection:
        if item.caption is not None and not item.caption.strip():
            item.caption = None
        if item.caption is None and item.conversations is None and not self.settings.allow_uncaptioned:
            return Rejection("missing_caption", "no caption and no conversation (--allow-uncaptioned keeps it)").at(
                item.source, item.item_id
            )
        return item

    # ---- folder ----

    def _file(self, path: str) -> Iterator[MediaItem | Rejection]:
        if path.lower().endswith(CAPTION_SUFFIXES):
            return  # a sidecar caption, read with its media
        kind = media_type(path)
        if kind is None:
            yield Rejection("unsupported_media_type", f"not an image or video extension: {os.path.basename(path)}").at(
                path, path
            )
            return
        caption = None
        sidecar = os.path.splitext(path)[0] + ".txt"
        if files.exists(sidecar):
            with files.open(sidecar) as f:
                caption = f.read().decode("utf-8", "replace").strip()
        yield MediaItem(path, path, path, kind, caption)

    # ---- manifests ----

    def _manifest(self, path: str) -> Iterator[MediaItem | Rejection]:
        root = self.settings.media_root or posixpath.dirname(path)
        for line_number, row in _manifest_rows(path):
            locator = f"line {line_number}"
            if isinstance(row, Rejection):
                yield row.at(path, locator)
                continue
            media = next((row[k] for k in PATH_KEYS if isinstance(row.get(k), str) and row[k]), None)
            if media is None:
                yield Rejection("missing_media_path", f"no {'/'.join(PATH_KEYS)} key").at(
                    path, locator, json.dumps(row)[:500]
                )
                continue
            if not (media.startswith("/") or "://" in media):
                media = files.join(root, media)
            kind = "video" if "video" in row and "image" not in row else media_type(media)
            if kind is None:
                yield Rejection("unsupported_media_type", f"not an image or video extension: {media}").at(path, locator)
                continue
            caption = row.get(self.settings.caption_key)
            conversations = row.get("conversations")
            extra = {k: v for k, v in row.items() if k in ("id", "url") and v is not None}
            yield MediaItem(
                f"{path}#L{line_number}",
                media,
                media,
                kind,
                caption if isinstance(caption, str) else None,
                conversations if conversations is not None else None,
                {"input": extra} if extra else {},
            )

    # ---- WebDataset ----

    def _tar(self, path: str) -> Iterator[MediaItem | Rejection]:
        try:
            with files.open(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for key, members in _samples(tar, self.settings.limits):
                    yield self._sample(path, key, members)
        except (tarfile.TarError, *READ_ERRORS) as error:
            yield Rejection("unreadable_file", excerpt(str(error))).at(path, "tar")

    def _sample(self, path: str, key: str, members: dict[str, bytes | Rejection]) -> MediaItem | Rejection:
        source = f"{path}#{key}"
        for ext, data in members.items():
            if isinstance(data, Rejection):  # a member too large to read
                return replace(data, detail=f"member {key}.{ext}: {data.detail}").at(path, key)
        media = next(((ext, data) for ext, data in members.items() if media_type("x." + ext)), None)
        if media is None:
            return Rejection("unsupported_media_type", f"no image or video member among {sorted(members)}").at(
                path, key
            )
        caption = None
        if "txt" in members:
            caption = members["txt"].decode("utf-8", "replace").strip()
        elif "json" in members:
            try:
                record = json_object(members["json"])
            except Rejection as rejection:
                return rejection.at(path, key)
            value = record.get(self.settings.caption_key, record.get("text"))
            caption = value if isinstance(value, str) else None
        ext, data = media
        return MediaItem(source, source, data, media_type("x." + ext), caption, None, {"input": {"key": key}})


def _samples(tar: tarfile.TarFile, limits: MediaLimits) -> Iterator[tuple[str, dict[str, bytes | Rejection]]]:
    """WebDataset samples: consecutive members sharing a key (the path up to the basename's first dot),
    each member's bytes, or why they were not read (`_member`)."""
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        directory, name = posixpath.split(member.name)
        if "." not in name or name.startswith("."):
            continue
        stem, ext = name.split(".", 1)
        member_key = posixpath.join(directory, stem)
        if member_key != key and key is not None:
            yield key, members
            members = {}
        key = member_key
        members[ext.lower()] = _member(tar, member, limits)
    if key is not None:
        yield key, members


def _member(tar: tarfile.TarFile, member: tarfile.TarInfo, limits: MediaLimits) -> bytes | Rejection:
    """A member's bytes, or a Rejection when its header gives a size `limits` refuse (then nothing is read)."""
    try:
        limits.check_bytes(member.size)
    except Rejection as rejection:
        return rejection
    return tar.extractfile(member).read()


def _manifest_rows(path: str) -> Iterator[tuple[int, dict | Rejection]]:
    """(1-based row number, row dict or why it cannot be read) of a manifest of any supported form."""
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        for item in read_lines(path):
            if isinstance(item, Rejection):
                yield 0, item
                continue
            number, line = item
            try:
                yield number, json_object(line)
            except Rejection as rejection:
                yield number, rejection
        return
    try:
        with files.open(path) as f:
            data = f.read()
        if name.endswith(".json"):
            rows = json.loads(data)
            if not isinstance(rows, list):
                raise ValueError("a .json manifest holds one JSON array of records")
        elif name.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
        else:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except (ValueError, UnicodeDecodeError, *READ_ERRORS) as error:
        yield 0, Rejection("unreadable_file", excerpt(str(error)))
        return
    for number, row in enumerate(rows, 1):
        yield number, row if isinstance(row, dict) else Rejection("invalid_json", "a manifest row is not an object")
