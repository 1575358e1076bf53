"""Chunks -> question-answer pairs per chunk, from an LLM server or the offline cloze backend.

    chunk tables --ToRequests--> ChunkRequest per chunk (+ dead letters)
        --RunInference(QAModelHandler)--> pairs or a Rejection per chunk
        --ToRows (+ dead letters)--> BatchRows --> QA_SCHEMA tables

RunInference batches chunks by tokens (prompt + max_tokens), and `QAModelHandler` sends a batch's
requests concurrently through `lwm_data.text.llm.ChatClient` (at most `concurrency` in flight per worker),
re-asking a chunk whose reply is invalid up to `max_asks` requests in all. Beam's own model sharing
(`share_model_across_processes`) is not used for the vllm backend: `VLLMServer` also restarts a
server that dies and lets later jobs on the machine reuse it.

The reply's structured output carries as many of the validator's rules as the grammar can say
(`--constraints`, see `lwm_data.text.qa.reply_schema`); a server that refuses that schema (HTTP 400/422
about it) is asked with the next weaker one for the rest of the run (stat constraint_fallbacks).
Every pair is stored with its grounding score; pairs under `--min-grounding` are dropped.

Counts: `in` = chunks read, `out` = chunks with pairs; filtered: ungrounded (no pair reached
min_grounding); dead-lettered: empty_chunk, no_cloze_sentence, and per chunk the last failure
(truncated, unparsable, bad_shape, empty_reply, no_valid_pairs, http_<status>, unreachable,
bad_response). Stats: pairs, pairs_ungrounded, requests, retries, recoveries, reasks, cache_hits,
constraint_fallbacks, invalid_<reason> (replies judged invalid, by reason), prompt_tokens,
completion_tokens.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.parquetio import ReadAllFromParquetBatched
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from lwm_data import files
from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection, WrongInput
from lwm_data.outputs import DeadLetterPolicy, committed_shards, read_manifest
from lwm_data.pipelines.common import (
    ERRORS,
    Counters,
    ReadStage,
    StageOutput,
    merge_errors,
    route,
    run_stage,
    upstream_tokenizer,
)
from lwm_data.pipelines.tally import IN_FLIGHT, TALLY
from lwm_data.schemas import QA_SCHEMA
from lwm_data.text.llm import (
    ChatClient,
    ClientConfig,
    Completion,
    Endpoint,
    EventLoopThread,
    ResponseCache,
    SamplingParams,
    VLLMServer,
)
from lwm_data.text.qa import (
    CLOZE_MODEL,
    CLOZE_PROMPT_VERSION,
    CONSTRAINTS,
    DEFAULT_PROMPT_VERSION,
    PROMPTS,
    PairLimits,
    PromptTemplate,
    QAPair,
    cache_key,
    cloze_pairs,
    judge_reply,
    prompt_from_json,
    refuses_constraints,
    reply_schema,
    response_format,
    scored,
)

log = logging.getLogger(__name__)
STAGE = "qa"
BACKENDS = ("cloze", "openai", "vllm")
ROWS_PER_TABLE = 4096
CHUNK_COLUMNS = ["book_id", "chunk_index", "text", "num_tokens"]


def shell_words(text: str) -> tuple[str, ...]:
    return tuple(shlex.split(text))


@dataclass(frozen=True)
class QAConfig:
    input: str = setting(help="A chunk stage's output directory, or a glob of shards (committed ones only are read).")
    output: str = setting(help="Output directory.")
    backend: str = setting("cloze", "vllm (start a local server), openai (--endpoint) or cloze (offline).")
    model: str | None = setting(None, "Model path or name (vllm), served model name (openai).")
    endpoint: str | None = setting(None, "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    pairs_per_chunk: int = setting(3, "Pairs asked for per chunk.")
    cache: str | None = setting(None, "Response cache directory (any Beam filesystem): reruns reuse answers.")
    prompt_version: str = setting(DEFAULT_PROMPT_VERSION, f"Built-in prompt: {', '.join(PROMPTS)}.")
    prompt_file: str | None = setting(
        None, 'JSON prompt template {"version", "system", "user"}; overrides --prompt-version.'
    )
    max_asks: int = setting(3, "Requests per chunk, re-asks of invalid replies included.")
    constraints: str = setting(
        "full",
        "Structured output: full (pair count, one '?' ending each question, lengths; for guidance), "
        "folded (the same for xgrammar), lengths, json (any JSON object) or none. A server refusing one gets the next.",
    )
    min_grounding: float = setting(
        0.0,
        "Drop pairs whose grounding (share of the answer's content words found in the chunk) is "
        "lower; a chunk left without pairs is filtered as ungrounded.",
    )
    server_wait: float = setting(600.0, "Seconds to wait for an --endpoint server that does not answer.")
    batch_tokens: int = setting(1_000_000, "RunInference batch size, in prompt + max_tokens tokens.")
    accelerator: str | None = setting(
        None,
        "Beam resource hint for the QA step (its vllm server), e.g. 'type:nvidia-l4;count:1;install-nvidia-driver'.",
    )
    vllm_args: tuple[str, ...] = setting(
        (), "Extra arguments for the vLLM server, one string (vllm backend).", parse=shell_words
    )
    vllm_python: str | None = setting(None, "Python with vLLM installed (default: $LWM_VLLM_PYTHON or this one).")
    vllm_state_dir: str | None = setting(None, "Where machine-wide vLLM server state lives (default: the temp dir).")
    sampling: SamplingParams = nested(SamplingParams)
    client: ClientConfig = nested(ClientConfig)
    limits: PairLimits = nested(PairLimits)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.backend != "cloze" and not self.model:
            raise ConfigError(f"the {self.backend} backend needs --model")
        if self.backend == "openai" and not self.endpoint:
            raise ConfigError("the openai backend needs an --endpoint URL")
        if self.max_asks < 1 or self.client.concurrency < 1 or self.pairs_per_chunk < 1:
            raise ConfigError("max_asks, concurrency and pairs_per_chunk must be at least 1")
        if self.constraints not in CONSTRAINTS:
            raise ConfigError(f"constraints must be one of {CONSTRAINTS}, not {self.constraints!r}")
        if not 0.0 <= self.min_grounding <= 1.0:
            raise ConfigError(f"min_grounding must be in [0, 1], not {self.min_grounding}")
        if not self.prompt_file and self.prompt_version not in PROMPTS:
            raise ConfigError(f"unknown prompt version {self.prompt_version!r}; built in: {', '.join(PROMPTS)}")


@dataclass(frozen=True)
class ChunkRequest:
    book_id: str
    chunk_index: int
    text: str
    num_tokens: int


Answer = list[QAPair] | Rejection


def load_prompt(config: QAConfig) -> PromptTemplate:
    if config.prompt_file:
        with files.open(config.prompt_file) as f:
            return prompt_from_json(f.read().decode())
    return PROMPTS[config.prompt_version]


def output_identity(config: QAConfig) -> dict[str, str]:
    """(model, backend, prompt_version) as written in every output row."""
    if config.backend == "cloze":
        return {"model": CLOZE_MODEL, "backend": "cloze", "prompt_version": CLOZE_PROMPT_VERSION}
    return {"model": config.model, "backend": config.backend, "prompt_version": load_prompt(config).version}


class ClozeBackend:
    """The offline backend: fill-in-the-blank pairs from the chunk's own sentences."""

    def __init__(self, config: QAConfig):
        self.num_pairs = config.pairs_per_chunk
        self.limits = config.limits

    def answer_batch(self, chunks: Sequence[ChunkRequest]) -> tuple[list[Answer], Counter]:
        return [self.answer(c) for c in chunks], Counter()

    def answer(self, chunk: ChunkRequest) -> Answer:
        return cloze_pairs(chunk.text, self.num_pairs, self.limits) or Rejection(
            "no_cloze_sentence", "no sentence with a number or name to blank"
        )


def reply_format(config: QAConfig, constraints: str) -> dict | None:
    """The `response_format` of every request under `constraints`."""
    schema = reply_schema(config.pairs_per_chunk, config.limits, constraints, config.sampling.max_tokens)
    return response_format(schema, constraints)


class ServerBackend:
    """Asks an OpenAI-compatible server for pairs, re-asking invalid replies, a batch at a time.

    `levels` are the structured-output constraints still to try, strongest first: a server that
    refuses the current one (`refuses_constraints`) moves every later request to the next."""

    def __init__(self, config: QAConfig, server, stage: str = STAGE):
        self.config = config
        self.template = load_prompt(config)
        self.levels = list(CONSTRAINTS[CONSTRAINTS.index(config.constraints) :])
        self.loop = EventLoopThread()
        cache = ResponseCache(config.cache) if config.cache else None
        # The event loop's thread has no Beam metrics context: the gauge goes to the live view only.
        self.client = ChatClient(config.model, config.client, server, cache, partial(TALLY.add, stage, IN_FLIGHT))

    def answer_batch(self, chunks: Sequence[ChunkRequest]) -> tuple[list[Answer], Counter]:
        async def batch() -> tuple[list[Answer], Counter]:
            answers = await asyncio.gather(*(self.answer(c) for c in chunks))
            return list(answers), self.client.usage.take()

        return self.loop.run(batch())

    def reply_format(self, constraints: str) -> dict | None:
        return reply_format(self.config, constraints)

    def request_key(self, chunk: ChunkRequest, sampling: SamplingParams, ask: int, reply_format: dict | None) -> str:
        params = {
            **sampling.to_dict(),
            "ask": ask,
            "pairs_per_chunk": self.config.pairs_per_chunk,
            "format": reply_format,
        }
        return cache_key(self.config.model, self.template.version, chunk.text, params)

    async def answer(self, chunk: ChunkRequest) -> Answer:
        messages = self.template.messages(chunk.text, self.config.pairs_per_chunk)
        for ask in range(self.config.max_asks):
            if ask:
                self.client.usage["reasks"] += 1
            sampling = self.config.sampling.for_attempt(ask)
            try:
                completion = await self.ask(chunk, messages, sampling, ask)
            except Rejection as failed:
                return failed
            verdict = judge_reply(completion.content, completion.finish_reason, self.config.limits)
            if not isinstance(verdict, Rejection):
                return verdict
            self.client.usage[f"invalid_{verdict.reason}"] += 1
        return Rejection(verdict.reason, f"{self.config.max_asks} asks; last: {verdict.detail}")

    async def ask(self, chunk: ChunkRequest, messages: list[dict], sampling: SamplingParams, ask: int) -> Completion:
        """One ask, under the strongest constraints the server takes."""
        while True:
            constraints = self.levels[0]
            reply_format = self.reply_format(constraints)
            try:
                return await self.client.complete(
                    messages, sampling, reply_format, self.request_key(chunk, sampling, ask, reply_format)
                )
            except Rejection as failed:
                if len(self.levels) == 1 or not refuses_constraints(failed):
                    raise
                if self.levels[0] == constraints:  # concurrent asks may all have been refused
                    self.levels.pop(0)
                    self.client.usage["constraint_fallbacks"] += 1
                    log.warning(
                        "the server refuses %s constraints (%s); asking with %s from now on",
                        constraints,
                        failed.detail[:300],
                        self.levels[0],
                    )


def request_tokens(chunk: ChunkRequest, max_tokens: int) -> int:
    """A chunk's weight in a batch: what it costs the server, prompt and reply."""
    return chunk.num_tokens + max_tokens


class BatchAnswering(ModelHandler):
    """A RunInference handler whose "model" (an LLM client, or cloze) answers a batch at once:
    `answer_batch(batch) -> (answers, usage counts)`, the counts added to the stage's counters.
    Batches hold about `batch_tokens` tokens, each request weighing `weight(request)`."""

    def __init__(self, config: Any, stage: str, batch_tokens: int, weight: Callable[[Any], int]):
        super().__init__(min_batch_size=batch_tokens, max_batch_size=batch_tokens, element_size_fn=weight)
        self.config = config
        self.stage = stage
        self.count = Counters(stage)

    def run_inference(self, batch: Sequence, model, inference_args: dict | None = None) -> Iterable[PredictionResult]:
        answers, usage = model.answer_batch(batch)
        for name, value in usage.items():
            self.count(name, value)
        return [PredictionResult(request, answer) for request, answer in zip(batch, answers)]

    def get_metrics_namespace(self) -> str:
        return f"lwm_data_{self.stage.replace('-', '_')}_inference"


class QAModelHandler(BatchAnswering):
    """The QA stage's handler: a backend (LLM client or cloze) per worker."""

    def __init__(self, config: QAConfig, stage: str = STAGE):
        weight = partial(request_tokens, max_tokens=config.sampling.max_tokens)
        super().__init__(config, stage, config.batch_tokens, weight)

    def load_model(self) -> ClozeBackend | ServerBackend:
        config = self.config
        if config.backend == "cloze":
            return ClozeBackend(config)
        if config.backend == "openai":
            return ServerBackend(config, Endpoint(config.endpoint, wait_s=config.server_wait), self.stage)
        server = VLLMServer(config.model, config.vllm_args, config.vllm_python, config.vllm_state_dir)
        server.acquire()
        return ServerBackend(config, server, self.stage)


class ChunkRequests:
    """Step: a table of chunk rows -> one request per chunk with text, each an input record."""

    def __init__(self, stage: str):
        self.count = Counters(stage)

    def __call__(self, table: pa.Table) -> Iterable[ChunkRequest | Rejection]:
        for row in table.select(CHUNK_COLUMNS).to_pylist():
            self.count("in")
            text = row["text"] or ""
            if not text.strip():
                yield Rejection("empty_chunk", "chunk has no text", "", row["book_id"], row["chunk_index"])
            else:
                yield ChunkRequest(row["book_id"], row["chunk_index"], text, row["num_tokens"])


class AnswerRows:
    """Step: a chunk's answer -> its QA_SCHEMA row with grounding scores, or its rejection; pairs
    under `min_grounding` are dropped, and a chunk left with none is filtered."""

    def __init__(self, stage: str, identity: dict[str, str], min_grounding: float = 0.0):
        self.count = Counters(stage)
        self.identity = identity
        self.min_grounding = min_grounding

    def __call__(self, result: PredictionResult) -> Iterable[dict | Rejection]:
        chunk, answer = result.example, result.inference
        if isinstance(answer, Rejection):
            yield answer.at(chunk.book_id, chunk.chunk_index, chunk.text)
            return
        pairs = [p for p in scored(answer, chunk.text) if p.grounding >= self.min_grounding]
        self.count("pairs_ungrounded", len(answer) - len(pairs))
        if not pairs:
            self.count("filtered.ungrounded")
            return
        self.count("out")
        self.count("pairs", len(pairs))
        yield {
            "book_id": chunk.book_id,
            "chunk_index": chunk.chunk_index,
            "pairs": [p.to_dict() for p in pairs],
            **self.identity,
        }


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QA_SCHEMA)


class QA(beam.PTransform):
    """Chunk tables (CHUNK_SCHEMA, or any with its book_id, chunk_index, text, num_tokens) -> QA tables."""

    def __init__(self, config: QAConfig, stage: str = STAGE):
        super().__init__()
        self.config = config
        self.stage = stage

    def expand(self, chunks: beam.PCollection) -> StageOutput:
        requests = chunks | "ToRequests" >> route(self.stage, ChunkRequests(self.stage))
        ask = RunInference(QAModelHandler(self.config, self.stage))
        if self.config.accelerator:
            ask = ask.with_resource_hints(accelerator=self.config.accelerator)
        answered = (
            requests.out
            | "AskForPairs" >> ask
            | "ToRows"
            >> route(self.stage, AnswerRows(self.stage, output_identity(self.config), self.config.min_grounding))
        )
        tables = (
            answered.out
            | "BatchRows" >> beam.BatchElements(min_batch_size=ROWS_PER_TABLE, max_batch_size=ROWS_PER_TABLE)
            | "ToTable" >> beam.Map(rows_to_table)
        )
        return StageOutput(tables, merge_errors(requests[ERRORS], answered[ERRORS], label="QAErrors"))


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[") or path.endswith(".parquet")


def run(config: QAConfig, beam_args: list[str] | None = None) -> dict:
    """The stand-alone QA job: read chunks | QA | write; returns its manifest."""
    shards, directories = committed_shards(config.input) if _is_glob(config.input) else ([], [config.input])
    if not directories:
        raise WrongInput(f"{config.input} matches no shard of a committed chunk output")
    for directory in directories:
        read_manifest(directory, ("chunk",), STAGE)
    tokenizer = upstream_tokenizer(directories)  # the chunk stage's

    def build(pipeline: beam.Pipeline) -> StageOutput:
        if shards:
            chunks = (
                pipeline
                | "Shards" >> beam.Create(shards)
                | "ReadChunks" >> ReadAllFromParquetBatched(columns=CHUNK_COLUMNS)
            )
        else:
            chunks = pipeline | "ReadChunks" >> ReadStage(config.input, CHUNK_COLUMNS)
        return chunks | "QA" >> QA(config)

    return run_stage(STAGE, config, build, QA_SCHEMA, beam_args, tokenizer)
