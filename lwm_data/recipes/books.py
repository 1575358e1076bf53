"""`run books`: books to packed long-context rows in ONE Beam pipeline, composed from the stage transforms:

    book files --Chunk--+--> QA --+--> Chat --+
                        |         |           +--(shard paths)--> Pack
                        +---------+--> Text --+

Every stage writes its own output directory with its own balanced manifest (each stage counts in
its own namespace). Pack reads its inputs back by path, so chat's and text's written shards are
its input: that boundary is materialised inside the job. Nothing is committed until the whole
job has succeeded.

Each stage reads the output of the stage before it: `wiring` says so, once, and `lwm-data run`
(lwm_data.recipes.run) fills every stage's input options from it.
"""

from __future__ import annotations

from typing import Any

from lwm_data.pipelines import chat, chunk, pack, qa, text
from lwm_data.pipelines.common import Job
from lwm_data.recipes.common import Upstream, finish_with_pack
from lwm_data.schemas import CHUNK_SCHEMA, EXAMPLE_SCHEMA, QA_SCHEMA
from lwm_data.tokenizers import load_tokenizer

STAGES = (chunk.STAGE, qa.STAGE, chat.STAGE, text.STAGE, pack.STAGE)  # in order: the TOML tables


def wiring(outputs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each stage's input options, from the other stages' output directories."""
    return {
        qa.STAGE: {"input": outputs[chunk.STAGE]},
        chat.STAGE: {"chunks": outputs[chunk.STAGE], "qa": outputs[qa.STAGE]},
        text.STAGE: {"input": outputs[chunk.STAGE]},
        pack.STAGE: {"input": [outputs[chat.STAGE], outputs[text.STAGE]]},
    }


def job(configs: dict[str, Any], beam_args: list[str] | None = None, keep_intermediate: bool = True) -> Job:
    """The whole text pipeline as one job, from the stages' configs (inputs wired); `.run()` it for the
    stages' manifests (pack's last).

    Without `keep_intermediate` only pack's output is written: chat's and text's shards go to a
    scratch directory deleted when the job ends, every stage's dead letters go to pack's `errors/`,
    and pack's manifest holds every stage's counts (`pipeline`)."""
    chunk_config = configs[chunk.STAGE]
    tokenizer = load_tokenizer(chunk_config.tokenizer).entry
    job = Job(beam_args)
    chunks = job.pipeline | "Chunk" >> chunk.Chunk(chunk_config, tokenizer)
    pairs = chunks.rows | "QA" >> qa.QA(configs[qa.STAGE])
    chats = {"chunks": chunks.rows, "qa": pairs.rows} | "Chat" >> chat.Chat(configs[chat.STAGE], tokenizer)
    texts = chunks.rows | "Text" >> text.Text(tokenizer)
    upstream = [
        Upstream(chunk.STAGE, chunk_config, chunks, CHUNK_SCHEMA),
        Upstream(qa.STAGE, configs[qa.STAGE], pairs, QA_SCHEMA),
        Upstream(chat.STAGE, configs[chat.STAGE], chats, EXAMPLE_SCHEMA),
        Upstream(text.STAGE, configs[text.STAGE], texts, EXAMPLE_SCHEMA),
    ]
    examples = {chat.STAGE, text.STAGE}  # what pack reads, by path
    return finish_with_pack(job, "books", upstream, examples, configs[pack.STAGE], tokenizer, keep_intermediate)
