"""The vision stages as Beam jobs, on media made here: every input form, every kind of bad item
dead-lettered with its reason and counted, codes kept and re-assembled, decoded back to pictures,
exported to LWM JSONL and imported back, packed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.cli.validate import validate
from lwm_data.examples import IMAGE_CHAT, IMAGE_TEXT, VIDEO_CHAT, VIDEO_TEXT, examples_from_table
from lwm_data.pipelines.registry import STAGES
from tests.media import make_image, make_noise_image, make_tar, make_video

pytestmark = pytest.mark.slow
FAST = {"random_config": "reduced", "batch_size": 8, "max_frames": 6, "max_dead_fraction": 1.0}  # bad media on purpose


def run(stage: str, **values) -> dict:
    options = {o.name for o in settings.options(STAGES[stage].config)}
    given = {k: v for k, v in {**FAST, **values}.items() if k in options}
    return STAGES[stage].run(settings.build(STAGES[stage].config, given), None)


def dead_letter_reasons(directory: Path) -> Counter:
    return Counter(letter["reason"] for letter in outputs.read_dead_letters(str(directory)))


def examples(directory: Path) -> dict:
    return {e.example_id: e for e in examples_from_table(outputs.read_table(str(directory)))}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Good media with sidecar captions, and one of each kind of bad item."""
    d = tmp_path_factory.mktemp("media")
    make_video(d / "clip.mp4", frames=20)
    make_video(d / "portrait.mp4", frames=3, width=240, height=426)
    make_video(d / "still.mp4", frames=1)
    make_image(d / "photo.png", mode="RGBA")
    for name in ("clip", "portrait", "still", "photo", "empty", "text", "codec", "cut", "corrupt"):
        (d / f"{name}.txt").write_text(f"The {name}: a red square on blue.")
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("not a video at all\n" * 10)
    (d / "codec.mp4").write_bytes((d / "clip.mp4").read_bytes().replace(b"avc1", b"zzz9"))
    cut = make_video(d / "cut.mp4", frames=30, faststart=True)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    make_image(d / "uncaptioned.jpg")
    (d / "notes.pdf").write_bytes(b"%PDF-1.4")
    return d


@pytest.fixture(scope="module")
def video_run(folder, tmp_path_factory) -> tuple[dict, Path, Path]:
    out = tmp_path_factory.mktemp("video")
    manifest = run(
        "video", input=str(folder), output=str(out / "examples"), keep_codes=str(out / "codes"), direction="both"
    )
    return manifest, out / "examples", out / "codes"


def test_folder_job_counts_and_dead_letters(video_run):
    manifest, examples_dir, _ = video_run
    counts = manifest["counts"]
    assert counts["balanced"] and counts["in"] == 11 and counts["out"] == 4
    assert dead_letter_reasons(examples_dir) == {
        "empty_file": 1,
        "undecodable_video": 2,
        "unsupported_codec": 1,
        "undecodable_image": 1,
        "missing_caption": 1,
        "unsupported_media_type": 1,
    }
    assert counts["dead_lettered_by_reason"] == dict(dead_letter_reasons(examples_dir))
    assert manifest["stats"]["examples"] == 8 and manifest["stats"]["frames"] == 6 + 3 + 1 + 1
    assert manifest["vqgan"]["random_weights"] is True
    assert sum(validate(str(examples_dir)).values()) == 0


def test_folder_job_examples(video_run, folder):
    _, examples_dir, _ = video_run
    by_id = examples(examples_dir)
    clip = by_id[f"{folder}/clip.mp4#understand"]
    assert clip.kind == VIDEO_TEXT and clip.vision_mask.sum() == 6 * 257
    assert clip.meta["reader"] == "decord" and clip.meta["frame_indices"] == np.linspace(0, 19, 6).astype(int).tolist()
    assert by_id[f"{folder}/still.mp4#generate"].kind == IMAGE_TEXT
    assert by_id[f"{folder}/photo.png#understand"].meta["reader"] == "pil"
    assert "The clip: a red square on blue." in clip.text


def test_kept_codes_reassemble_without_reencoding(video_run, tmp_path):
    _, examples_dir, codes_dir = video_run
    codes_manifest = outputs.read_manifest(str(codes_dir))
    assert codes_manifest["stage"] == "vision-codes" and codes_manifest["counts"]["balanced"]
    assert codes_manifest["counts"]["out"] == 4 and sum(validate(str(codes_dir)).values()) == 0
    assert outputs.read_table(str(codes_dir)).schema.field("codes").type == pa.list_(pa.uint16())
    manifest = run("vision-sequences", input=str(codes_dir), output=str(tmp_path / "seq"), direction="understand")
    assert manifest["counts"]["out"] == 4 and manifest["vqgan"] == codes_manifest["vqgan"]
    original = examples(examples_dir)
    for example_id, example in examples(tmp_path / "seq").items():
        np.testing.assert_array_equal(example.tokens, original[example_id].tokens)


def test_vision_decode_writes_pictures(video_run, tmp_path):
    from typer.testing import CliRunner

    from lwm_data.cli.main import app

    _, examples_dir, codes_dir = video_run
    result = CliRunner().invoke(
        app, ["vision-decode", "--input", str(codes_dir), "--output", str(tmp_path / "png"), "--limit", "0"]
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "png").rglob("frame_*.png"))) == 6 + 3 + 1 + 1
    result = CliRunner().invoke(
        app, ["vision-decode", "--input", str(examples_dir), "--output", str(tmp_path / "mp4"), "--mp4"]
    )
    assert result.exit_code == 0, result.output
    import av

    clip = next(p for p in (tmp_path / "mp4").glob("*clip*understand*.mp4"))
    with av.open(str(clip)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6


def test_export_to_lwm_then_import_lwm(video_run, tmp_path):
    from lwm_data.pipelines import export_lwm

    _, examples_dir, _ = video_run
    counts = export_lwm.export(str(examples_dir), str(tmp_path / "lwm.jsonl"))
    assert counts.output == 8 and not counts.dead_lettered
    lines = [json.loads(line) for line in (tmp_path / "lwm.jsonl").read_text().splitlines()]
    assert all(any(k.startswith("vision") for k in line) for line in lines)
    run("import-lwm", input=str(tmp_path / "lwm.jsonl"), output=str(tmp_path / "imported"))
    original = examples(examples_dir)
    imported = {e.meta["line"]: e for e in examples(tmp_path / "imported").values()}
    for number, line in enumerate(lines, 1):
        np.testing.assert_array_equal(imported[number].tokens, original[line["id"]].tokens)
        np.testing.assert_array_equal(imported[number].loss_weights, original[line["id"]].loss_weights)
        np.testing.assert_array_equal(imported[number].vision_mask, original[line["id"]].vision_mask)


def test_vision_examples_pack_whole(video_run, tmp_path):
    _, examples_dir, _ = video_run
    manifest = run("pack", input=(str(examples_dir),), output=str(tmp_path / "packed"), seq_len=2048)
    assert manifest["counts"]["balanced"] and manifest["counts"]["out"] > 0
    table = outputs.read_table(str(tmp_path / "packed"))
    assert all(start == 0 for starts in table["piece_starts"].to_pylist() for start in starts)  # never split
    assert sum(validate(str(tmp_path / "packed")).values()) == 0


def test_webdataset_shards_in_the_image_stage(tmp_path):
    media = tmp_path / "m"
    media.mkdir()
    jpg, png = make_image(media / "a.jpg").read_bytes(), make_image(media / "b.png", mode="P").read_bytes()
    mp4 = make_video(media / "c.mp4", frames=2).read_bytes()
    shard = make_tar(
        tmp_path / "shard-00000.tar",
        {
            "000/a.jpg": jpg,
            "000/a.txt": b"a photo",
            "000/b.png": png,
            "000/b.json": json.dumps({"caption": "a drawing", "url": "http://x"}).encode(),
            "000/c.mp4": mp4,
            "000/c.txt": b"a clip",
            "000/d.jpg": jpg,
        },
    )
    manifest = run("image", input=str(shard), output=str(tmp_path / "out"))
    assert manifest["counts"]["balanced"] and manifest["counts"]["out"] == 2
    assert dead_letter_reasons(tmp_path / "out") == {"not_an_image": 1, "missing_caption": 1}
    by_id = examples(tmp_path / "out")
    assert {e.kind for e in by_id.values()} == {IMAGE_TEXT}
    assert "a drawing" in by_id[f"{shard}#000/b#understand"].text


def test_manifests_with_llava_conversations(tmp_path):
    make_video(tmp_path / "v.mp4", frames=4)
    make_image(tmp_path / "i.jpg")
    rows = [
        {
            "id": "1",
            "video": "v.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat moves?"},
                {"from": "gpt", "value": "A square."},
                {"from": "human", "value": "Which way?"},
                {"from": "gpt", "value": "Right."},
            ],
        },
        {
            "id": "2",
            "image": "i.jpg",
            "conversations": [{"from": "human", "value": "Describe <image>"}, {"from": "gpt", "value": "Blue."}],
        },
        {
            "id": "3",
            "image": "i.jpg",
            "conversations": [{"from": "gpt", "value": "wrong order"}, {"from": "human", "value": "?"}],
        },
        {
            "id": "4",
            "image": "gone.jpg",
            "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}],
        },
        {"id": "5", "caption": "no path"},
    ]
    (tmp_path / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    manifest = run("video", input=str(tmp_path / "llava.jsonl"), output=str(tmp_path / "out"))
    assert manifest["counts"]["balanced"] and manifest["counts"]["in"] == 6 and manifest["counts"]["out"] == 2
    assert dead_letter_reasons(tmp_path / "out") == {
        "bad_conversation": 1,
        "missing_file": 1,
        "missing_media_path": 1,
        "invalid_json": 1,
    }
    kinds = {e.meta["input"]["id"]: e.kind for e in examples(tmp_path / "out").values()}
    assert kinds == {"1": VIDEO_CHAT, "2": IMAGE_CHAT}


BOUNDS = {"max_media_bytes": 10_000, "max_pixels": 50_000}  # the good media: 160x120, under 3 KB


def test_media_over_the_limits_are_dead_lettered(tmp_path):
    """A manifest's file over --max-media-bytes, an image and a video over --max-pixels: dead-lettered
    before decoding, the rest encoded."""
    make_image(tmp_path / "ok.jpg", width=160, height=120)
    make_video(tmp_path / "ok.mp4", frames=3, width=160, height=120)
    make_noise_image(tmp_path / "heavy.png")  # about 58 KB
    make_image(tmp_path / "wide.png", width=400, height=300)
    make_video(tmp_path / "wide.mp4", frames=2, width=320, height=240)
    names = ("ok.jpg", "ok.mp4", "heavy.png", "wide.png", "wide.mp4")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": n, "caption": n}) + "\n" for n in names))
    manifest = run("video", input=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"), **BOUNDS)
    counts = manifest["counts"]
    assert counts["balanced"] and counts["in"] == 5 and counts["out"] == 2
    letters = outputs.read_dead_letters(str(tmp_path / "out"))
    assert {Path(letter["source"]).name: letter["reason"] for letter in letters} == {
        "heavy.png": "too_large",
        "wide.png": "too_many_pixels",
        "wide.mp4": "too_many_pixels",
    }
    assert sorted(e.kind for e in examples(tmp_path / "out").values()) == [IMAGE_TEXT, VIDEO_TEXT]


def test_an_oversized_webdataset_member_is_dead_lettered(tmp_path):
    shard = make_tar(
        tmp_path / "shard-00000.tar",
        {
            "a.jpg": make_image(tmp_path / "a.jpg", width=160, height=120).read_bytes(),
            "a.txt": b"a photo",
            "b.png": make_noise_image(tmp_path / "b.png").read_bytes(),
            "b.txt": b"noise",
            "c.mp4": make_video(tmp_path / "c.mp4", frames=3, width=160, height=120).read_bytes(),
            "c.txt": b"a clip",
        },
    )
    manifest = run("vision-codes", input=str(shard), output=str(tmp_path / "out"), **BOUNDS)
    assert manifest["counts"]["balanced"] and manifest["counts"]["out"] == 2
    letters = outputs.read_dead_letters(str(tmp_path / "out"))
    assert [(letter["reason"], letter["locator"]) for letter in letters] == [("too_large", "b")]


@pytest.mark.parametrize("form", ["csv", "parquet"])
def test_csv_and_parquet_manifests(tmp_path, form):
    make_image(tmp_path / "i.png")
    make_video(tmp_path / "v.mp4", frames=3)
    table = pa.table({"path": ["i.png", "v.mp4"], "caption": ["an image", "a video"]})
    path = tmp_path / f"m.{form}"
    if form == "csv":
        path.write_text("path,caption\ni.png,an image\nv.mp4,a video\n")
    else:
        pq.write_table(table, path)
    manifest = run("video", input=str(path), output=str(tmp_path / "out"))
    assert manifest["counts"]["out"] == 2 and manifest["counts"]["balanced"]
    assert sorted(e.kind for e in examples(tmp_path / "out").values()) == [IMAGE_TEXT, VIDEO_TEXT]


def test_media_on_a_beam_filesystem(tmp_path):
    """Manifest and media on memfs:// (no local paths): media are copied to local temp files to decode."""
    from apache_beam.io.filesystems import FileSystems

    import tests.memfs  # noqa: F401 - registers memfs://

    for name, data in {
        "v.mp4": make_video(tmp_path / "v.mp4", frames=3).read_bytes(),
        "m.jsonl": json.dumps({"path": "v.mp4", "caption": "remote"}).encode(),
    }.items():
        with FileSystems.create(f"memfs://bucket/media/{name}") as out:
            out.write(data)
    manifest = run("video", input="memfs://bucket/media/m.jsonl", output=str(tmp_path / "out"))
    assert manifest["counts"]["out"] == 1


def test_gpu_resource_hint_on_the_vqgan_step():
    """On Dataflow, `--accelerator` puts only the VQ-GAN step on GPU workers (a Beam resource hint)."""
    import apache_beam as beam

    from lwm_data.pipelines.media import EncodeMedia, FrameSampling
    from lwm_data.tokenizers.vision import VQGANSettings

    accelerator = "type:nvidia-l4;count:1;install-nvidia-driver"
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([]) | EncodeMedia(FrameSampling(), VQGANSettings(accelerator=accelerator), "video")
    proto = pipeline.to_runner_api()
    hinted = {
        t.unique_name
        for t in proto.components.transforms.values()
        if any(
            accelerator.encode() in v for v in proto.components.environments[t.environment_id].resource_hints.values()
        )
        if t.environment_id
    }
    assert hinted and all("VQGAN" in name for name in hinted)


def test_cli_runs_the_video_stage(tmp_path):
    from typer.testing import CliRunner

    from lwm_data.cli.main import app

    make_video(tmp_path / "v.mp4", frames=3)
    (tmp_path / "v.txt").write_text("a clip")
    result = CliRunner().invoke(
        app,
        [
            "video",
            "--input",
            str(tmp_path / "*.mp4"),
            "--output",
            str(tmp_path / "out"),
            "--random-config",
            "reduced",
            "--max-frames",
            "2",
            "--direction",
            "generate",
            "--direct_num_workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert outputs.read_manifest(str(tmp_path / "out"))["counts"]["out"] == 1
    result = CliRunner().invoke(app, ["video", "--input", "x", "--output", "y", "--direction", "sideways"])
    assert result.exit_code == 2 and "--direction" in result.output
