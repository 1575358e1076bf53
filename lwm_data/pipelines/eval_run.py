"""`lwm-data eval-run`: an eval set's prompts -> a model's responses, from an OpenAI-compatible server.

    evalset tables --ToRequests--> EvalRequest per row (+ dead letters)
        --RunInference(EvalModelHandler)--> a Completion or a Rejection per row
        --ToRows (+ dead letters)--> BatchRows --> RESPONSES_SCHEMA tables

Each row's `prompt` goes to the server as one user message (the server applies the model's chat
template, as RULER does for chat models), decoded greedily (temperature 0) up to `max_tokens`. The
client is QA's (`lwm_data.text.llm.ChatClient`): at most `concurrency` requests in flight per worker,
its retries and recoveries, the response cache, the API key read from the variable `api_key_env`
names. Before the job starts, the endpoint is asked which models it serves: a server that does not
answer, refuses the key, or does not serve `--model` is a one-line error, and what it serves
(vLLM's `root` and `max_model_len` too) is recorded in the manifest's `server` section.

Counts: `in` = eval rows read, `out` = responses written. A response cut by `max_tokens` is kept
(finish_reason "length"; it is scored like any other; stat `truncated`). Dead-lettered: empty_prompt,
and requests that failed after the client's retries, by reason (http_<status>, unreachable,
bad_response; a prompt longer than the server's context is the server's http_400). Stats: requests,
retries, recoveries, cache_hits, prompt_tokens and completion_tokens (the server's counts), truncated,
empty_responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.ml.inference.base import PredictionResult, RunInference

from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.outputs import DeadLetterPolicy, read_manifest
from lwm_data.pipelines.common import ERRORS, Counters, ReadStage, StageOutput, merge_errors, route, run_stage
from lwm_data.pipelines.qa import BatchAnswering
from lwm_data.pipelines.tally import IN_FLIGHT, TALLY
from lwm_data.schemas import RESPONSES_SCHEMA
from lwm_data.text.llm import (
    NO_KEY,
    ChatClient,
    ClientConfig,
    Completion,
    Endpoint,
    EventLoopThread,
    ResponseCache,
    SamplingParams,
    ServerUnavailable,
    api_key,
    http_ok,
)
from lwm_data.text.qa import cache_key

log = logging.getLogger(__name__)
STAGE = "eval-run"
INPUT_STAGES = ("evalset",)
REQUEST_VERSION = "eval-run-chat-1"  # how a prompt becomes a request: part of every cache key
ROWS_PER_TABLE = 4096
EVAL_COLUMNS = ["example_id", "task", "context_length", "depth", "prompt", "prompt_tokens", "answers"]


@dataclass(frozen=True)
class EvalRunConfig:
    input: str = setting(help="The output directory of `lwm-data evalset`.")
    output: str = setting(help="Output directory.")
    endpoint: str | None = setting(None, "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (required).")
    model: str | None = setting(None, "The model name the server serves (required).")
    max_tokens: int = setting(128, "Response token limit (greedy decoding); a response cut there is kept and scored.")
    cache: str | None = setting(None, "Response cache directory (any Beam filesystem): reruns reuse responses.")
    server_wait: float = setting(600.0, "Seconds to wait for an --endpoint server that does not answer.")
    batch_tokens: int = setting(1_000_000, "RunInference batch size, in prompt + max_tokens tokens.")
    client: ClientConfig = nested(ClientConfig)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)

    def __post_init__(self):
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint must be an http(s) URL like http://127.0.0.1:8000/v1, not {self.endpoint!r}")
        if self.max_tokens < 1 or self.client.concurrency < 1:
            raise ConfigError("max_tokens and concurrency must be at least 1")

    def require_server(self) -> None:
        """--endpoint and --model are required, and said so after the input is checked (a wrong input
        is the first thing to hear about)."""
        if not self.endpoint:
            raise ConfigError("eval-run needs --endpoint, the base URL of an OpenAI-compatible server (…/v1)")
        if not self.model:
            raise ConfigError("eval-run needs --model, the name the server serves the model under")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=0.0, top_p=1.0, max_tokens=self.max_tokens)


@dataclass(frozen=True)
class EvalRequest:
    example_id: str
    task: str
    context_length: int
    depth: float | None
    answers: list[str]
    prompt: str
    prompt_tokens: int


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def request_key(config: EvalRunConfig, prompt: str) -> str:
    return cache_key(config.model, REQUEST_VERSION, prompt, config.sampling.to_dict())


# --- the server, before the job --------------------------------------------------------------------


def served_models(base_url: str, key: str, timeout_s: float = 30.0) -> list[dict]:
    """The models an OpenAI-compatible server lists at /models (`id`; vLLM adds `root`, `max_model_len`)."""
    request = urllib.request.Request(f"{base_url.rstrip('/')}/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        listed = json.loads(response.read())
    return [m for m in listed.get("data", []) if isinstance(m, dict)] if isinstance(listed, dict) else []


def check_server(config: EvalRunConfig) -> dict[str, Any]:
    """The manifest's `server` section: what the endpoint serves under `--model`. A server that does not
    answer, refuses the key or does not serve the model is a ConfigError, before any job starts."""
    base = config.endpoint.rstrip("/")
    if not base.endswith("/v1") and http_ok(f"{base}/v1/models", timeout_s=5, also=(401, 403)):
        raise ConfigError(f"--endpoint {config.endpoint} is a server's root; its OpenAI API is at {base}/v1")
    try:
        Endpoint(config.endpoint, wait_s=config.server_wait).ensure_ready()
    except ServerUnavailable as e:
        raise ConfigError(f"no server answers at --endpoint {config.endpoint}: {e}") from None
    variable = config.client.api_key_env
    try:
        models = served_models(config.endpoint, api_key(variable), min(config.client.timeout, 60.0))
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            held = "set" if api_key(variable) != NO_KEY else "unset or empty, so no key was sent"
            raise ConfigError(
                f"{config.endpoint} refuses the API key (HTTP {e.code}); it is read from ${variable} ({held};"
                " --api-key-env names another variable)"
            ) from None
        v1 = config.endpoint.rstrip("/").endswith("/v1")
        hint = "; does --endpoint end in /v1?" if e.code == 404 and not v1 else ""
        log.warning("%s/models answered HTTP %s%s; the served model is not recorded", config.endpoint, e.code, hint)
        return {"endpoint": config.endpoint, "model": config.model}
    except (OSError, ValueError) as e:
        log.warning("%s/models could not be read (%s); the served model is not recorded", config.endpoint, e)
        return {"endpoint": config.endpoint, "model": config.model}
    ids = [m.get("id") for m in models]
    if models and config.model not in ids:
        raise ConfigError(f"{config.endpoint} does not serve --model {config.model!r}; it serves {ids}")
    served = next((m for m in models if m.get("id") == config.model), {})
    section = {"endpoint": config.endpoint, "model": config.model}
    section["served_model"] = served.get("root") or served.get("id")
    if served.get("max_model_len"):
        section["max_model_len"] = served["max_model_len"]
    return section


# --- the job -----------------------------------------------------------------------------------------


class EvalBackend:
    """Asks the server for each prompt's response, a batch at a time, on its own event loop."""

    def __init__(self, config: EvalRunConfig, stage: str = STAGE):
        self.config = config
        self.loop = EventLoopThread()
        cache = ResponseCache(config.cache) if config.cache else None
        server = Endpoint(config.endpoint, wait_s=config.server_wait)
        # The event loop's thread has no Beam metrics context: the gauge goes to the live view only.
        self.client = ChatClient(config.model, config.client, server, cache, partial(TALLY.add, stage, IN_FLIGHT))

    def answer_batch(self, requests: Sequence[EvalRequest]) -> tuple[list[Completion | Rejection], Counter]:
        async def batch() -> tuple[list[Completion | Rejection], Counter]:
            answers = await asyncio.gather(*(self.answer(r) for r in requests))
            return list(answers), self.client.usage.take()

        return self.loop.run(batch())

    async def answer(self, request: EvalRequest) -> Completion | Rejection:
        try:
            return await self.client.complete(
                messages(request.prompt), self.config.sampling, None, request_key(self.config, request.prompt)
            )
        except Rejection as failed:
            return failed


def request_tokens(request: EvalRequest, max_tokens: int) -> int:
    return request.prompt_tokens + max_tokens


class EvalModelHandler(BatchAnswering):
    """The eval-run stage's handler: the server's client per worker."""

    def __init__(self, config: EvalRunConfig, stage: str = STAGE):
        super().__init__(config, stage, config.batch_tokens, partial(request_tokens, max_tokens=config.max_tokens))

    def load_model(self) -> EvalBackend:
        return EvalBackend(self.config, self.stage)


class EvalRequests:
    """Step: a table of eval rows -> one request per row, each an input record."""

    def __init__(self, stage: str):
        self.count = Counters(stage)

    def __call__(self, table: pa.Table) -> Iterable[EvalRequest | Rejection]:
        for row in table.select(EVAL_COLUMNS).to_pylist():
            self.count("in")
            if not (row["prompt"] or "").strip():
                yield Rejection("empty_prompt", "the row has no prompt", "", row["example_id"])
            else:
                yield EvalRequest(**row)


class ResponseRows:
    """Step: a request's completion -> its RESPONSES_SCHEMA row, or its rejection as a dead letter."""

    def __init__(self, stage: str, model: str):
        self.count = Counters(stage)
        self.model = model

    def __call__(self, result: PredictionResult) -> Iterable[dict | Rejection]:
        request, answer = result.example, result.inference
        if isinstance(answer, Rejection):
            yield answer.at(request.example_id, f"{request.task}@{request.context_length}", request.prompt)
            return
        if answer.finish_reason == "length":
            self.count("truncated")
        if not (answer.content or "").strip():
            self.count("empty_responses")
        self.count("out")
        yield {
            "example_id": request.example_id,
            "task": request.task,
            "context_length": request.context_length,
            "depth": request.depth,
            "answers": request.answers,
            "response": answer.content or "",
            "model": self.model,
            "finish_reason": answer.finish_reason,
        }


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESPONSES_SCHEMA)


class EvalRun(beam.PTransform):
    """Eval set tables (EVALSET_SCHEMA, or any with its EVAL_COLUMNS) -> RESPONSES_SCHEMA tables."""

    def __init__(self, config: EvalRunConfig, stage: str = STAGE):
        super().__init__()
        config.require_server()
        self.config = config
        self.stage = stage

    def expand(self, rows: beam.PCollection) -> StageOutput:
        requests = rows | "ToRequests" >> route(self.stage, EvalRequests(self.stage))
        answered = (
            requests.out
            | "Ask" >> RunInference(EvalModelHandler(self.config, self.stage))
            | "ToRows" >> route(self.stage, ResponseRows(self.stage, self.config.model))
        )
        tables = (
            answered.out
            | "BatchRows" >> beam.BatchElements(min_batch_size=ROWS_PER_TABLE, max_batch_size=ROWS_PER_TABLE)
            | "ToTable" >> beam.Map(rows_to_table)
        )
        return StageOutput(tables, merge_errors(requests[ERRORS], answered[ERRORS], label="EvalRunErrors"))


def run(config: EvalRunConfig, beam_args: list[str] | None = None) -> dict:
    """The stand-alone job: read an eval set | EvalRun | write; returns its manifest."""
    read_manifest(config.input, INPUT_STAGES, STAGE)
    config.require_server()
    server = check_server(config)

    def build(pipeline: beam.Pipeline) -> StageOutput:
        return pipeline | "ReadEvalSet" >> ReadStage(config.input, EVAL_COLUMNS) | "EvalRun" >> EvalRun(config)

    return run_stage(STAGE, config, build, RESPONSES_SCHEMA, beam_args, summary=lambda manifest: {"server": server})
