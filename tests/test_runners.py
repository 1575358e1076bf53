"""Runner portability: `lwm-data run books` and `run video` write the same rows, dead letters and
balanced counts in-process (FnApiRunner), on the multi-process direct runner, and on the portable
runner (the path Flink, Spark and Dataflow v2 take) against Beam's own local job service, started
here. Beam's order of rows across shards is the runner's, so rows are compared as sets."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.errors import ConfigError
from lwm_data.pipelines.common import beam_flags, check_beam_args, make_pipeline, runner_key
from lwm_data.testing.books import generate_books, write_books_jsonl
from tests.media import make_video
from tests.test_run_pipeline import books_toml

REPO = Path(__file__).resolve().parents[1]
MULTI_PROCESS = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]


@pytest.fixture(scope="module")
def job_service(tmp_path_factory) -> Iterator[str]:
    """Beam's local job service in a subprocess on a free port (it writes the port it got); its endpoint."""
    folder = tmp_path_factory.mktemp("job-service")
    port_file, log = folder / "port", folder / "log"
    command = ["-m", "apache_beam.runners.portability.local_job_service_main", "--port=0", f"--port_file={port_file}"]
    with open(log, "wb") as out:
        service = subprocess.Popen([sys.executable, *command], stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(1200):
            if port_file.exists() or service.poll() is not None:
                break
            time.sleep(0.1)
        if not port_file.exists():
            pytest.fail(f"the job service did not start:\n{log.read_text()}")
        yield f"localhost:{port_file.read_text()}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Two books and a line that is no JSON; a clip and an empty video: each pipeline has a dead letter."""
    folder = tmp_path_factory.mktemp("inputs")
    books = write_books_jsonl(folder / "books.jsonl", generate_books(2, 6000, seed=7), with_facts=True)
    with open(books, "a") as f:
        f.write("{not json\n")
    media = folder / "media"
    media.mkdir()
    make_video(media / "a.mp4", frames=4)
    (media / "a.txt").write_text("a clip")
    (media / "b.mp4").write_bytes(b"")
    (media / "b.txt").write_text("an empty file")
    return {"books": books, "video": media}


@pytest.mark.parametrize(
    "runner, key",
    [
        (None, None),
        ("direct", "directrunner"),
        ("DirectRunner", "directrunner"),
        ("apache_beam.runners.direct.direct_runner.DirectRunner", "directrunner"),
        ("portable", "portablerunner"),
        ("FlinkRunner", "flinkrunner"),
    ],
)
def test_runners_are_named_as_beam_resolves_them(runner, key):
    assert runner_key([] if runner is None else ["--runner", runner]) == key


def test_direct_runner_by_any_name_runs_in_fn_api_runner_and_dask_is_refused():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    assert isinstance(make_pipeline(["--runner", "direct"]).runner, FnApiRunner)  # not Prism, which downloads
    with pytest.raises(ConfigError, match="Dask runner implements no metrics"):
        make_pipeline(["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner"])


def test_beam_options_are_checked_by_the_flags_beam_parses():
    check_beam_args(["--extra_package", "dist/x.whl", "--no_use_public_ips", "--experiments=use_runner_v2"], [])
    with pytest.raises(ConfigError, match="did you mean --direct_num_workers"):  # Beam would ignore it
        check_beam_args(["--direct-num-workers", "2"], [])


def test_the_readmes_runner_commands_use_real_beam_flags():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running on Beam runners") : readme.index("## Benchmarks")]
    flags = set(re.findall(r"--[a-z]+_[a-z_]+", section))  # Beam's spelling; lwm-data's own flags use - and .
    assert {"--flink_job_server_jar", "--spark_job_server_jar", "--extra_package"} <= flags
    assert flags <= beam_flags()


def video_toml(path: Path, media: Path, output: Path) -> Path:
    path.write_text(f"""
output = "{output}"
[video]
input = "{media}"
random_config = "reduced"
max_frames = 2
[pack]
seq_len = 1024
""")
    return path


def run_pipeline(name: str, inputs: dict[str, Path], root: Path, beam_args: list[str]) -> dict[str, dict]:
    """`lwm-data run NAME` into `root` (books: only pack's output; video: every stage's), and what it wrote."""
    root.mkdir()
    if name == "books":
        args = ["--config", str(books_toml(root / "run.toml", inputs["books"], root / "out"))]
    else:
        args = ["--config", str(video_toml(root / "run.toml", inputs["video"], root / "out")), "--keep-intermediate"]
    result = CliRunner().invoke(app, ["run", name, *args, *beam_args])
    assert result.exit_code == 0, result.output
    return {directory.name: written(directory) for directory in sorted((root / "out").iterdir())}


def written(directory: Path) -> dict:
    """An output as runners must agree on it: rows (as a set), dead letters, and the manifest's counts
    (balanced), stats and packing, with every stage's counts for a whole pipeline's pack."""
    manifest = outputs.read_manifest(str(directory))
    stages = manifest.get("pipeline", {}).get("stages", {})
    assert all(counts["balanced"] for counts in [manifest["counts"], *stages.values()])
    return {
        "rows": sorted(map(repr, outputs.read_table(str(directory)).to_pylist())),
        "dead_letters": sorted(map(repr, outputs.read_dead_letters(str(directory)))),
        "stages": stages,
        **{key: manifest.get(key) for key in ("counts", "stats", "packing")},
    }


@pytest.fixture(scope="module")
def in_process(inputs, tmp_path_factory) -> dict[str, dict[str, dict]]:
    return {name: run_pipeline(name, inputs, tmp_path_factory.mktemp(name) / "in-process", []) for name in inputs}


@pytest.mark.slow
def test_what_the_runners_are_compared_on(in_process):
    books, video = in_process["books"], in_process["video"]
    assert list(books) == ["pack"] and list(video) == ["pack", "video"]
    assert books["pack"]["rows"] and video["pack"]["rows"] and video["video"]["rows"]
    assert books["pack"]["stages"]["chunk"]["dead_lettered_by_reason"] == {"invalid_json": 1}
    assert video["video"]["counts"]["dead_lettered_by_reason"] == {"empty_file": 1}
    assert len(books["pack"]["dead_letters"]) == len(video["video"]["dead_letters"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["books", "video"])
def test_multi_process_direct_runner_writes_what_in_process_does(in_process, inputs, tmp_path, name):
    assert run_pipeline(name, inputs, tmp_path / "multi", MULTI_PROCESS) == in_process[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["books", "video"])
def test_portable_runner_writes_what_in_process_does(in_process, inputs, job_service, tmp_path, name):
    portable = ["--runner", "PortableRunner", f"--job_endpoint={job_service}", "--environment_type=LOOPBACK"]
    assert run_pipeline(name, inputs, tmp_path / "portable", portable) == in_process[name]
