"""Reading media inputs without Beam: what the reader refuses before anything is decoded."""

from __future__ import annotations

import tarfile

from lwm_data import config as settings
from lwm_data.errors import Rejection
from lwm_data.pipelines.registry import STAGES
from lwm_data.vision.frames import MediaLimits
from lwm_data.vision.media import MediaItem, MediaReader, MediaSettings
from tests.media import make_image, make_noise_image, make_tar


def test_an_oversized_webdataset_member_is_refused_unread(tmp_path, monkeypatch):
    jpg = make_image(tmp_path / "a.jpg", width=160, height=120).read_bytes()
    heavy = make_noise_image(tmp_path / "b.png").read_bytes()  # about 58 KB
    shard = make_tar(
        tmp_path / "shard.tar",
        {"a.jpg": jpg, "a.txt": b"a photo", "b.png": heavy, "b.txt": b"noise", "c.jpg": jpg, "c.txt": b"again"},
    )
    extracted = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(
        tarfile.TarFile, "extractfile", lambda tar, member: extracted.append(member.name) or extract(tar, member)
    )
    reader = MediaReader(MediaSettings(str(shard), limits=MediaLimits(max_media_bytes=10_000)), lambda *_: None)
    a, b, c = reader(str(shard))
    assert isinstance(a, MediaItem) and isinstance(c, MediaItem) and a.media == jpg
    assert isinstance(b, Rejection) and (b.reason, b.source, b.locator) == ("too_large", str(shard), "b")
    assert b.detail.startswith(f"member b.png: {len(heavy):,} bytes, over --max-media-bytes 10,000")
    assert "b.png" not in extracted and "b.txt" in extracted


def test_every_media_stage_takes_the_limits():
    for stage in ("video", "image", "vision-codes"):
        flags = {flag for option in settings.options(STAGES[stage].config) for flag in option.cli_flags}
        assert {"--max-media-bytes", "--max-pixels"} <= flags, stage
