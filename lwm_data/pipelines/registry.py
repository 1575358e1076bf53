"""The registry: every stage, named once.

A stage is a command, a manifest `stage`, an output schema, the checks `lwm-data validate` runs on
it, the collector `lwm-data stats` uses, its settings dataclass (the command's options and TOML keys
derive from it), its stand-alone job, and its Beam transform. The CLI, `validate`, `stats` and the
README's stage table follow from this list; adding a stage is its core (text/, vision/), one module
in pipelines/ and one entry here.

How a stage is written: a config dataclass of `setting(...)` fields (lwm_data.config); a composite
`PTransform` from its input records to a `StageOutput` (rows + dead letters), its per-record work in
steps run by `route` (lwm_data.pipelines.common); and `run(config, beam_args)`, the stand-alone job
(`Read | Stage | WriteStage`, then `run_stage` counts and commits). Whole pipelines
(lwm_data.recipes) compose the transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa

from lwm_data import checks, stats
from lwm_data.checks import GlobalCheck, TableCheck
from lwm_data.errors import UserError
from lwm_data.pipelines import (
    chat,
    chunk,
    eval_run,
    evalset,
    image,
    import_lwm,
    needle,
    pack,
    qa,
    text,
    video,
    vision_codes,
    vision_sequences,
)
from lwm_data.pipelines.media import EncodeMedia
from lwm_data.schemas import (
    CHUNK_SCHEMA,
    CODES_SCHEMA,
    EVALSET_SCHEMA,
    EXAMPLE_SCHEMA,
    NEEDLE_SCHEMA,
    PACKED_SCHEMA,
    QA_SCHEMA,
    RESPONSES_SCHEMA,
)


@dataclass(frozen=True)
class Stage:
    name: str  # the command, and the manifest's `stage`
    help: str  # one line: the command's help
    reads: str  # for the README's stage table
    writes: str
    schema: pa.Schema
    config: type  # its settings: command options and TOML keys derive from it
    run: Callable[[Any, list[str] | None], dict]  # the stand-alone job: (config, Beam args) -> manifest
    transform: type[beam.PTransform] | None  # its Beam transform (None: a plain-Python stage)
    row_checks: tuple[TableCheck, ...] = ()
    global_checks: tuple[GlobalCheck, ...] = ()
    stats: Callable[[str, stats.DatasetStats], None] = stats.row_stats

    @property
    def takes_beam_options(self) -> bool:
        return self.transform is not None


_EXAMPLE_CHECKS = (checks.check_example_rows,)
_MEDIA = "media: manifest (JSONL/JSON/CSV/Parquet), WebDataset `.tar`, folder"

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "chunk",
            "Books -> ~1K-token chunks.",
            "books: JSONL (`.gz`/`.zst`), Parquet, `.txt`",
            "chunks (`CHUNK_SCHEMA`)",
            CHUNK_SCHEMA,
            chunk.ChunkConfig,
            chunk.run,
            chunk.Chunk,
            (checks.check_chunk_rows,),
            (
                GlobalCheck(
                    ("book_id", "chunk_index", "num_chunks", "char_start", "char_end"), checks.check_chunk_books
                ),
            ),
            stats.chunk_stats,
        ),
        Stage(
            "qa",
            "Chunks -> question-answer pairs per chunk (an LLM server, or the offline cloze backend).",
            "chunks",
            "QA pairs per chunk (`QA_SCHEMA`)",
            QA_SCHEMA,
            qa.QAConfig,
            qa.run,
            qa.QA,
            (checks.check_qa_rows,),
            (GlobalCheck(("book_id", "chunk_index"), checks.check_qa_chunks),),
        ),
        Stage(
            "chat",
            "Chunks + QA -> long-context chat examples (LWM's chat form), one or more context lengths.",
            "chunks + QA",
            "chat examples (`EXAMPLE_SCHEMA`)",
            EXAMPLE_SCHEMA,
            chat.ChatStageConfig,
            chat.run,
            chat.Chat,
            _EXAMPLE_CHECKS,
            (),
            stats.example_stats,
        ),
        Stage(
            "text",
            "Chunks -> one plain-text example per book (BOS + its chunks), for packing.",
            "chunks",
            "text examples (`EXAMPLE_SCHEMA`)",
            EXAMPLE_SCHEMA,
            text.TextConfig,
            text.run,
            text.Text,
            _EXAMPLE_CHECKS,
            (),
            stats.example_stats,
        ),
        Stage(
            "import-lwm",
            "LWM JSONL -> unpacked examples, tokenized exactly as LWM's processors do.",
            "LWM JSONL",
            "examples (`EXAMPLE_SCHEMA`)",
            EXAMPLE_SCHEMA,
            import_lwm.ImportConfig,
            import_lwm.run,
            import_lwm.ImportLwm,
            _EXAMPLE_CHECKS,
            (),
            stats.example_stats,
        ),
        Stage(
            "video",
            "Videos (and images) -> VQ-GAN tokens in LWM's vision layout, with captions or LLaVA conversations.",
            _MEDIA,
            "vision examples (`EXAMPLE_SCHEMA`)",
            EXAMPLE_SCHEMA,
            video.VideoConfig,
            video.run,
            EncodeMedia,
            _EXAMPLE_CHECKS,
            (),
            stats.example_stats,
        ),
        Stage(
            "image",
            "Images -> VQ-GAN tokens in LWM's vision layout, with captions or LLaVA conversations.",
            _MEDIA,
            "vision examples (`EXAMPLE_SCHEMA`)",
            EXAMPLE_SCHEMA,
            image.ImageConfig,
            image.run,
            EncodeMedia,
            _EXAMPLE_CHECKS,
            (),
            stats.example_stats,
        ),
        Stage(
            "vision-codes",
            "Images and videos -> frame-level VQ-GAN codes, to assemble sequences from later.",
            _MEDIA,
            "codes per item (`CODES_SCHEMA`)",
            CODES_SCHEMA,
            vision_codes.VisionCodesConfig,
            vision_codes.run,
            EncodeMedia,
            (checks.check_codes_rows,),
        ),
        Stage(
            "vision-sequences",
            "Frame-level codes -> vision examples (any template or direction, no re-encoding).",
            "codes",
            "vision examples (`EXAMPLE_SCHEMA`)",
            EXAMPLE_SCHEMA,
            vision_sequences.SequencesConfig,
            vision_sequences.run,
            vision_sequences.Sequences,
            _EXAMPLE_CHECKS,
            (),
            stats.example_stats,
        ),
        Stage(
            "pack",
            "Examples -> fixed-length packed rows with segment ids.",
            "examples",
            "packed rows (`PACKED_SCHEMA`)",
            PACKED_SCHEMA,
            pack.PackConfig,
            pack.run,
            pack.Pack,
            (checks.check_packed_rows,),
            (GlobalCheck(("num_pad_tokens", "segment_lengths"), checks.check_packed_row_lengths),),
            stats.packed_stats,
        ),
        Stage(
            "needle",
            "Needle-in-a-haystack eval set (LWM's protocol).",
            "books",
            "needle eval prompts (`NEEDLE_SCHEMA`)",
            NEEDLE_SCHEMA,
            needle.NeedleStageConfig,
            needle.run,
            None,
        ),
        Stage(
            "evalset",
            "Long-context eval set: RULER's task families on your books at exact lengths (packable as eval data).",
            "books or chunks (+ QA for `book_qa`)",
            "eval prompts and answers (`EVALSET_SCHEMA`)",
            EVALSET_SCHEMA,
            evalset.EvalsetStageConfig,
            evalset.run,
            None,
            (checks.check_example_rows, checks.check_evalset_rows),
            (),
            stats.example_stats,
        ),
        Stage(
            "eval-run",
            "Eval set -> a model's responses to its prompts, from an OpenAI-compatible server.",
            "eval set",
            "responses (`RESPONSES_SCHEMA`)",
            RESPONSES_SCHEMA,
            eval_run.EvalRunConfig,
            eval_run.run,
            eval_run.EvalRun,
        ),
    )
}


class UnknownStage(UserError):
    """A manifest names a stage this version does not know."""


def stage_of(manifest: dict) -> Stage:
    """The registered stage that wrote an output, from its manifest."""
    name = manifest.get("stage")
    if name not in STAGES:
        raise UnknownStage(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    return STAGES[name]


def markdown_table() -> str:
    """The README's stage table."""
    lines = ["| command | reads | writes |", "| --- | --- | --- |"]
    lines += [f"| `lwm-data {s.name}` | {s.reads} | {s.writes} |" for s in STAGES.values()]
    return "\n".join(lines)
