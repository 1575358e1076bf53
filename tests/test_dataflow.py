"""The whole-pipeline jobs translated for Google Cloud Dataflow, without submitting them (`--dry_run`,
no credentials, no network): the steps are there, the GPU step carries its resource hint, and no
path of this machine leaks into the job (tokenizer and model paths stay on the job's filesystem)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient", reason="apache-beam[gcp] is not installed")

from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402

import tests.memfs  # noqa: E402,F401 - registers memfs://, standing in for gs:// where files must exist
from lwm_data.recipes import run  # noqa: E402
from lwm_data.tokenizers import default_tokenizer_path  # noqa: E402
from lwm_data.tokenizers.vision import VQGAN  # noqa: E402

DATAFLOW = [
    "--runner=DataflowRunner",
    "--project=test-project",
    "--region=us-central1",
    "--temp_location=gs://bucket/tmp",
    "--no_auth",
    "--dry_run=True",
    "--sdk_location=container",
]
GPU = "type:nvidia-l4;count:1;install-nvidia-driver"


def translated(pipeline: str, document: dict, job_name: str):
    configs = run.stage_configs(run.PIPELINES[pipeline], document)
    job = run.PIPELINES[pipeline].job(configs, [*DATAFLOW, f"--job_name={job_name}"], False)
    return job.pipeline.run().job.proto_pipeline  # dry run: translated, not submitted


def local_paths() -> list[bytes]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [p.encode() for p in (here, os.path.dirname(default_tokenizer_path()), "/tmp/")]


def assert_no_local_path(proto) -> None:
    for transform in proto.components.transforms.values():
        payload = transform.SerializeToString()
        for path in local_paths():
            assert path not in payload, f"{transform.unique_name} holds {path!r}"


def upload(local_path: str, remote: str) -> str:
    with open(local_path, "rb") as source, FileSystems.create(remote) as out:
        out.write(source.read())
    return remote


def inputs(directory: str, name: str) -> str:
    """A glob matching one (empty) file: jobs check at launch that their input globs match."""
    with FileSystems.create(f"{directory}/{name}", compression_type=CompressionTypes.UNCOMPRESSED):
        pass
    return f"{directory}/*{name[name.index('.') :]}"


def gpu_steps(proto) -> set[str]:
    return {
        t.unique_name
        for t in proto.components.transforms.values()
        if t.environment_id
        and GPU.encode() in b"".join(proto.components.environments[t.environment_id].resource_hints.values())
    }


def test_books_job_for_dataflow_puts_qa_on_gpu_workers():
    tokenizer = upload(default_tokenizer_path(), "memfs://models/tokenizer.model")
    proto = translated(
        "books",
        {
            "output": "gs://bucket/out",
            "chunk": {"input": inputs("memfs://books", "a.jsonl.zst"), "tokenizer": tokenizer},
            "qa": {"backend": "vllm", "model": "/opt/models/qa", "accelerator": GPU},
            "chat": {"tokenizer": tokenizer},
            "text": {"tokenizer": tokenizer},
            "pack": {"seq_len": 32768},
        },
        "lwm-books",
    )
    top = {t.unique_name for t in proto.components.transforms.values() if "/" not in t.unique_name}
    assert {"Chunk", "QA", "Chat", "Text", "Pack", "Write[pack]", "Scratch[chat]", "Scratch[text]"} <= top
    hinted = gpu_steps(proto)
    assert hinted and all(name.startswith("QA/AskForPairs") for name in hinted)  # only the model step asks for a GPU
    assert_no_local_path(proto)


def test_video_job_for_dataflow_puts_the_vqgan_on_gpu_workers(tmp_path):
    VQGAN.random(reduced=True).model.save_pretrained(tmp_path)
    for name in os.listdir(tmp_path):
        upload(str(tmp_path / name), f"memfs://models/vqgan/vqvae/{name}")
    proto = translated(
        "video",
        {
            "output": "gs://bucket/video",
            "video": {
                "input": inputs("memfs://webvid", "00000.tar"),
                "vqgan": "memfs://models/vqgan",
                "vqgan_subfolder": "vqvae",
                "device": "cuda",
                "accelerator": GPU,
                "batch_size": 64,
            },
            "pack": {"seq_len": 8192},
        },
        "lwm-video",
    )
    hinted = gpu_steps(proto)
    assert hinted and all("VQGAN" in name for name in hinted)  # only the VQ-GAN step asks for a GPU
    assert_no_local_path(proto)
