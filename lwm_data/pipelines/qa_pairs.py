"""Chunks -> question-answer pairs per chunk, from an LLM server or the offline cloze backend.

    chunk shards --ReadFromParquet--> ToRequest (+ dead letters) --RunInference(QAModelHandler)-->
        ToRow (+ dead letters) --BatchRows--> Parquet shards of QA_SCHEMA

RunInference batches chunks by tokens (prompt + max_tokens), and `QAModelHandler` sends a batch's
requests concurrently through `lwm_data.llm.ChatClient` (at most `concurrency` in flight per worker),
re-asking a chunk whose reply is invalid up to `max_asks` requests in all.

Counts: `in` = chunks read, `out` = chunks with pairs; dead-lettered: empty_chunk, no_cloze_sentence,
and per chunk the last failure (truncated, unparsable, bad_shape, empty_reply, no_valid_pairs,
http_<status>, unreachable, bad_response). Stats: pairs, requests, retries, recoveries, reasks,
cache_hits, prompt_tokens, completion_tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from lwm_data import io
from lwm_data.llm import (
    ChatClient,
    ClientConfig,
    Endpoint,
    EventLoopThread,
    RequestFailed,
    ResponseCache,
    SamplingParams,
    VLLMServer,
)
from lwm_data.pipelines.common import StageOutputs, count, dead_letter, run_stage, upstream_tokenizer
from lwm_data.qa import (
    CLOZE_MODEL,
    CLOZE_PROMPT_VERSION,
    DEFAULT_PROMPT_VERSION,
    PROMPTS,
    PairLimits,
    PromptTemplate,
    QAPair,
    cache_key,
    cloze_pairs,
    judge_reply,
    prompt_from_json,
    reply_schema,
    response_format,
)
from lwm_data.schemas import QA_SCHEMA

STAGE = "qa"
BACKENDS = ("cloze", "openai", "vllm")
ROWS_PER_TABLE = 4096


@dataclass(frozen=True)
class QAConfig:
    input: str  # a chunk stage's output directory, or a glob of its shards
    output: str
    backend: str = "cloze"
    model: str | None = None  # served model name (openai), model path or name (vllm)
    endpoint: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    pairs_per_chunk: int = 3
    concurrency: int = 8
    cache: str | None = None  # response cache directory, any Beam filesystem
    prompt_version: str = DEFAULT_PROMPT_VERSION
    prompt_file: str | None = None  # JSON {"version", "system", "user"}; overrides prompt_version
    max_asks: int = 3  # requests per chunk, re-asks included
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None  # per-request seed (re-asks use seed + 1, ...); None: the server's
    timeout_s: float = 120.0
    max_retries: int = 4
    max_recoveries: int = 2
    server_wait_s: float = 600.0
    batch_tokens: int = 1_000_000  # RunInference batch size, in prompt + max_tokens tokens
    limits: PairLimits = field(default_factory=PairLimits)
    vllm_args: tuple[str, ...] = ()
    vllm_python: str | None = None
    vllm_state_dir: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.backend != "cloze" and not self.model:
            raise ValueError(f"the {self.backend} backend needs a model")
        if self.backend == "openai" and not self.endpoint:
            raise ValueError("the openai backend needs an endpoint URL")
        if self.max_asks < 1 or self.concurrency < 1 or self.pairs_per_chunk < 1:
            raise ValueError("max_asks, concurrency and pairs_per_chunk must be at least 1")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.max_tokens, self.seed)


@dataclass(frozen=True)
class ChunkRequest:
    book_id: str
    chunk_index: int
    text: str
    num_tokens: int


@dataclass(frozen=True)
class ChunkAnswer:
    """Valid pairs, or the reason the chunk gets none."""

    pairs: list[QAPair]
    reason: str = ""
    detail: str = ""


def load_prompt(config: QAConfig) -> PromptTemplate:
    if config.prompt_file:
        with FileSystems.open(config.prompt_file) as f:
            return prompt_from_json(f.read().decode())
    return PROMPTS[config.prompt_version]


def output_identity(config: QAConfig) -> tuple[str, str]:
    """(model, prompt_version) as written in every output row."""
    if config.backend == "cloze":
        return CLOZE_MODEL, CLOZE_PROMPT_VERSION
    return config.model, load_prompt(config).version


class ClozeWriter:
    """The offline backend: fill-in-the-blank pairs from the chunk's own sentences."""

    def __init__(self, config: QAConfig):
        self.num_pairs = config.pairs_per_chunk
        self.limits = config.limits

    def answer_batch(self, chunks: Sequence[ChunkRequest]) -> tuple[list[ChunkAnswer], Counter]:
        return [self.answer(c) for c in chunks], Counter()

    def answer(self, chunk: ChunkRequest) -> ChunkAnswer:
        pairs = cloze_pairs(chunk.text, self.num_pairs, self.limits)
        if not pairs:
            return ChunkAnswer([], "no_cloze_sentence", "no sentence with a number or name to blank")
        return ChunkAnswer(pairs)


class LLMWriter:
    """Asks an OpenAI-compatible server for pairs, re-asking invalid replies, a batch at a time."""

    def __init__(self, config: QAConfig, server):
        self.config = config
        self.template = load_prompt(config)
        self.schema = reply_schema(config.pairs_per_chunk, config.limits)
        self.format = response_format(self.schema)
        self.loop = EventLoopThread()
        client_config = ClientConfig(
            model=config.model, concurrency=config.concurrency, timeout_s=config.timeout_s,
            max_retries=config.max_retries, max_recoveries=config.max_recoveries,
        )
        cache = ResponseCache(config.cache) if config.cache else None
        self.client = ChatClient(client_config, server, cache)

    def answer_batch(self, chunks: Sequence[ChunkRequest]) -> tuple[list[ChunkAnswer], Counter]:
        async def batch() -> tuple[list[ChunkAnswer], Counter]:
            answers = await asyncio.gather(*(self.answer(c) for c in chunks))
            return list(answers), self.client.usage.take()

        return self.loop.run(batch())

    def request_key(self, chunk: ChunkRequest, sampling: SamplingParams, ask: int) -> str:
        params = {**sampling.to_dict(), "ask": ask, "pairs_per_chunk": self.config.pairs_per_chunk, "schema": self.schema}
        return cache_key(self.config.model, self.template.version, chunk.text, params)

    async def answer(self, chunk: ChunkRequest) -> ChunkAnswer:
        messages = self.template.messages(chunk.text, self.config.pairs_per_chunk)
        for ask in range(self.config.max_asks):
            if ask:
                self.client.usage["reasks"] += 1
            sampling = self.config.sampling.for_attempt(ask)
            try:
                completion = await self.client.complete(messages, sampling, self.format, self.request_key(chunk, sampling, ask))
            except RequestFailed as e:
                return ChunkAnswer([], e.reason, e.detail)
            verdict = judge_reply(completion.content, completion.finish_reason, self.config.limits)
            if verdict.ok:
                return ChunkAnswer(verdict.pairs)
        return ChunkAnswer([], verdict.reason, f"{self.config.max_asks} asks; last: {verdict.detail}")


def request_tokens(chunk: ChunkRequest, max_tokens: int) -> int:
    """A chunk's weight in a batch: what it costs the server, prompt and reply."""
    return chunk.num_tokens + max_tokens


class QAModelHandler(ModelHandler[ChunkRequest, ChunkAnswer, Any]):
    """RunInference handler: the "model" is a writer (LLM client or cloze); batches sized by tokens."""

    def __init__(self, config: QAConfig):
        weight = partial(request_tokens, max_tokens=config.max_tokens)
        super().__init__(min_batch_size=config.batch_tokens, max_batch_size=config.batch_tokens, element_size_fn=weight)
        self.config = config

    def load_model(self) -> ClozeWriter | LLMWriter:
        config = self.config
        if config.backend == "cloze":
            return ClozeWriter(config)
        if config.backend == "openai":
            return LLMWriter(config, Endpoint(config.endpoint, wait_s=config.server_wait_s))
        server = VLLMServer(config.model, config.vllm_args, config.vllm_python, config.vllm_state_dir)
        server.acquire()
        return LLMWriter(config, server)

    def run_inference(self, batch: Sequence[ChunkRequest], model, inference_args: dict | None = None) -> Iterable[PredictionResult]:
        answers, usage = model.answer_batch(batch)
        for name, value in usage.items():
            count(name, value)
        return [PredictionResult(chunk, answer) for chunk, answer in zip(batch, answers)]

    def get_metrics_namespace(self) -> str:
        return "lwm_data_qa"


class ToRequest(beam.DoFn):
    def process(self, row: dict) -> Iterable:
        count("in")
        text = row.get("text") or ""
        if not text.strip():
            yield dead_letter(STAGE, "empty_chunk", row.get("book_id"), row.get("chunk_index"), "chunk has no text")
            return
        yield ChunkRequest(row["book_id"], row["chunk_index"], text, row.get("num_tokens") or len(text) // 4)


class ToRow(beam.DoFn):
    def __init__(self, model: str, backend: str, prompt_version: str):
        self.identity = {"model": model, "backend": backend, "prompt_version": prompt_version}

    def process(self, result: PredictionResult) -> Iterable:
        chunk, answer = result.example, result.inference
        if not answer.pairs:
            yield dead_letter(STAGE, answer.reason, chunk.book_id, chunk.chunk_index, answer.detail, chunk.text)
            return
        count("out")
        count("pairs", len(answer.pairs))
        yield {
            "book_id": chunk.book_id,
            "chunk_index": chunk.chunk_index,
            "pairs": [p.to_dict() for p in answer.pairs],
            **self.identity,
        }


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QA_SCHEMA)


def input_pattern(path: str) -> str:
    """A directory means its Parquet shards; anything else is a glob already."""
    is_glob = any(c in path for c in "*?[")
    return path if is_glob or path.endswith(".parquet") else io.shard_pattern(path)


def build(pipeline: beam.Pipeline, config: QAConfig) -> StageOutputs:
    model, prompt_version = output_identity(config)
    requests = (
        pipeline
        | "ReadChunks" >> beam.io.ReadFromParquet(input_pattern(config.input), columns=["book_id", "chunk_index", "text", "num_tokens"])
        | "ToRequest" >> beam.ParDo(ToRequest()).with_outputs("errors", main="chunks")
    )
    answered = (
        requests.chunks
        | "AskForPairs" >> RunInference(QAModelHandler(config))
        | "ToRow" >> beam.ParDo(ToRow(model, config.backend, prompt_version)).with_outputs("errors", main="rows")
    )
    tables = (
        answered.rows
        | "BatchRows" >> beam.BatchElements(min_batch_size=ROWS_PER_TABLE, max_batch_size=ROWS_PER_TABLE)
        | "ToTable" >> beam.Map(rows_to_table)
    )
    return StageOutputs(tables, [requests.errors, answered.errors])


def run(config: QAConfig, beam_args: list[str] | None = None) -> dict:
    """Run the QA job; returns its manifest."""
    tokenizer = upstream_tokenizer([config.input])  # the chunk stage's, when input is its directory
    return run_stage(
        STAGE, config.output, QA_SCHEMA, lambda p: build(p, config), dataclasses.asdict(config), beam_args, tokenizer
    )
