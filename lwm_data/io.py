"""A stage's output directory, on any Beam filesystem (local, gs://, ...):

    DIR/part-00000-of-00004.parquet ...   rows in the stage's schema (lwm_data.schemas)
    DIR/manifest.json                     stage, config, tokenizer sha256, counts, files
    DIR/errors/part-*.jsonl               dead letters: one JSON object per bad input record

Counts in a manifest should balance: counts.in == counts.out + sum(counts.filtered) +
counts.dead_lettered; `counts.balanced` says whether they do (`lwm-data validate` checks it).
Helpers here read and write those pieces; Beam code lives in `pipelines/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

MANIFEST = "manifest.json"
SHARD_PREFIX = "part"
SHARD_SUFFIX = ".parquet"
ERRORS_DIR = "errors"
RECORD_EXCERPT_CHARS = 1000


@dataclass
class DeadLetter:
    """One bad input record: where it came from and why it was rejected."""

    stage: str
    reason: str  # a short machine-readable class, e.g. "invalid_json"
    source: str  # input file (or upstream id)
    locator: str = ""  # line number, byte offset, row, or chunk id within source
    detail: str = ""  # human-readable explanation
    record: str = ""  # excerpt of the offending record

    def to_json(self) -> str:
        fields = asdict(self)
        fields["record"] = fields["record"][:RECORD_EXCERPT_CHARS]
        line = json.dumps(fields, ensure_ascii=False)
        try:
            line.encode()
        except UnicodeEncodeError:  # lone surrogates (from JSON input): escape them, or no sink can write it
            line = json.dumps(fields)
        return line


@dataclass
class Counts:
    """Input records and what became of them."""

    input: int = 0
    output: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    dead_lettered: dict[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.input == self.output + sum(self.filtered.values()) + sum(self.dead_lettered.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "in": self.input,
            "out": self.output,
            "filtered": dict(sorted(self.filtered.items())),
            "filtered_total": sum(self.filtered.values()),
            "dead_lettered": sum(self.dead_lettered.values()),
            "dead_lettered_by_reason": dict(sorted(self.dead_lettered.items())),
            "balanced": self.balanced,
        }


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def shard_pattern(output_dir: str) -> str:
    return join(output_dir, f"{SHARD_PREFIX}-*{SHARD_SUFFIX}")


def list_files(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def list_shards(output_dir: str) -> list[str]:
    return list_files(shard_pattern(output_dir))


def list_error_files(output_dir: str) -> list[str]:
    return list_files(join(output_dir, ERRORS_DIR, "*.jsonl"))


def shard_rows(path: str) -> int:
    with FileSystems.open(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_table(output_dir: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a stage's output, shards in name order."""
    tables = [read_shard(path, columns) for path in list_shards(output_dir)]
    return pa.concat_tables(tables) if tables else pa.table({})


def read_shard(path: str, columns: list[str] | None = None) -> pa.Table:
    with FileSystems.open(path) as f:
        return pq.read_table(f, columns=columns)


def iter_batches(output_dir: str, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    for path in list_shards(output_dir):
        with FileSystems.open(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def read_dead_letters(output_dir: str) -> list[dict[str, Any]]:
    letters = []
    for path in list_error_files(output_dir):
        with FileSystems.open(path) as f:
            # split the bytes: str.splitlines would also split at U+2028, U+0085, ... inside a letter
            letters.extend(json.loads(line) for line in f.read().splitlines() if line.strip())
    return letters


def write_json(path: str, obj: Any) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode() + b"\n")


def read_json(path: str) -> Any:
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def read_manifest(output_dir: str) -> dict[str, Any]:
    return read_json(join(output_dir, MANIFEST))


def describe_files(output_dir: str) -> list[dict[str, Any]]:
    """Shards and error files with their row counts, paths relative to the output directory."""
    base = output_dir.rstrip("/") + "/"
    files = [{"path": p.removeprefix(base), "rows": shard_rows(p)} for p in list_shards(output_dir)]
    for path in list_error_files(output_dir):
        with FileSystems.open(path) as f:
            rows = sum(1 for line in f.read().splitlines() if line.strip())
        files.append({"path": path.removeprefix(base), "rows": rows})
    return files


def __getattr__(name: str) -> Any:
    """`io.PackedDataset`: the PyTorch reader of packed shards (lwm_data.torch_data), imported on
    first use so that importing io does not import torch."""
    if name == "PackedDataset":
        from lwm_data.torch_data import PackedDataset

        return PackedDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
