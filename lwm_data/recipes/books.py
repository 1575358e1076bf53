"""Books to packed long-context rows in ONE Beam pipeline, composed from the stage transforms:

    books --ReadBooks--> Chunk --+--> QA --+--> Chat --+
                                 |         |           +--(shard paths)--> Pack
                                 +---------+--> Text --+

Every stage writes its own output directory with its own balanced manifest (each stage counts in
its own namespace). Pack reads its inputs back by path, so chat's and text's written shards are
its input: that boundary is materialised inside the job. Nothing is committed until the whole
job has succeeded.

The stages' configs say where each output goes; their input fields are ignored here except to be
recorded, and should name the upstream directories (`books_configs` fills them in).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lwm_data.pipelines import chat, chunk, pack, qa, text
from lwm_data.pipelines.common import Job, StageOutput, merge_errors
from lwm_data.schemas import CHUNK_SCHEMA, EXAMPLE_SCHEMA, QA_SCHEMA
from lwm_data.tokenizers import load_tokenizer


@dataclass(frozen=True)
class BooksConfigs:
    chunk: chunk.ChunkConfig
    qa: qa.QAConfig
    chat: chat.ChatStageConfig
    text: text.TextConfig
    pack: pack.PackConfig


def books_configs(
    chunk_config: chunk.ChunkConfig, qa_config: qa.QAConfig, chat_config: chat.ChatStageConfig,
    text_config: text.TextConfig, pack_config: pack.PackConfig,
) -> BooksConfigs:
    """The stage configs with every input pointing at the output of the stage it reads."""
    chunks = chunk_config.output
    qa_config = replace(qa_config, input=chunks)
    return BooksConfigs(
        chunk_config, qa_config, replace(chat_config, chunks=chunks, qa=qa_config.output),
        replace(text_config, input=chunks), replace(pack_config, input=(chat_config.output, text_config.output)),
    )


def books_job(configs: BooksConfigs, beam_args: list[str] | None = None, keep_intermediate: bool = True) -> Job:
    """The whole text pipeline as one job; `.run()` it for the stages' manifests (pack's last).

    Without `keep_intermediate` only pack's output is written: chat's and text's shards go to a
    scratch directory deleted when the job ends, every stage's dead letters go to pack's `errors/`,
    and pack's manifest holds every stage's counts (`pipeline`)."""
    tokenizer = load_tokenizer(configs.chunk.tokenizer).entry
    job = Job(beam_args)
    books = job.pipeline | "ReadBooks" >> chunk.read_book_files(configs.chunk.input, configs.chunk.max_record_bytes)
    chunks = books.records | "Chunk" >> chunk.Chunk(configs.chunk, tokenizer)
    pairs = chunks.rows | "QA" >> qa.QA(configs.qa)
    chats = {"chunks": chunks.rows, "qa": pairs.rows} | "Chat" >> chat.Chat(configs.chat, tokenizer)
    texts = chunks.rows | "Text" >> text.Text(tokenizer)
    upstream = [
        pack.Upstream(chunk.STAGE, configs.chunk, StageOutput(chunks.rows, merge_errors(books.errors, chunks.errors)), CHUNK_SCHEMA),
        pack.Upstream(qa.STAGE, configs.qa, pairs, QA_SCHEMA),
        pack.Upstream(chat.STAGE, configs.chat, chats, EXAMPLE_SCHEMA),
        pack.Upstream(text.STAGE, configs.text, texts, EXAMPLE_SCHEMA),
    ]
    examples = {chat.STAGE, text.STAGE}  # what pack reads, by path
    return pack.finish_with_pack(job, "books", upstream, examples, configs.pack, tokenizer, keep_intermediate)
