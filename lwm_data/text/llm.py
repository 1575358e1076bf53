"""Talking to an OpenAI-compatible LLM server (vLLM, SGLang, TGI) from a Beam worker.

ChatClient      async chat completions: at most `concurrency` in flight, a per-request timeout,
                the API key from the environment variable `api_key_env` names,
                the openai client's own retries (exponential backoff with jitter on 408/409/429,
                5xx, connection errors and timeouts), then recovery: wait for the server (or
                restart it) and try again; a response cache; request/retry/token counts. A
                request that cannot succeed raises a `Rejection` (http_<status>, unreachable,
                bad_response); a server that refuses the model or key raises ServerRejected.
ResponseCache   one JSON file per request key on any Beam filesystem, written atomically.
Endpoint        an already running server: recovery waits until it answers again.
VLLMServer      a vLLM server this machine starts for a model, shared by all its processes
                (lock file + state file in a temp dir), restarted when it dies.
EventLoopThread runs the async client from synchronous Beam code, keeping connections warm.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TypeVar

from lwm_data import files
from lwm_data.config import setting
from lwm_data.errors import Rejection

log = logging.getLogger(__name__)
T = TypeVar("T")

LOOPBACK = "127.0.0.1"
# guidance: it honours a pattern beside length bounds, which xgrammar does not (see lwm_data.text.qa).
# Without disable_any_whitespace, JSON-schema decoding may emit whitespace until max_tokens (a known
# vLLM behaviour).
VLLM_STRUCTURED_OUTPUTS = '{"backend":"guidance","disable_any_whitespace":true}'
VLLM_PYTHON_ENV = "LWM_VLLM_PYTHON"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = setting(0.7, "Sampling temperature.")
    top_p: float = setting(1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass.")
    max_tokens: int = setting(512, "Reply token limit; a reply cut off there is invalid.")
    # Per-request seeds crash vLLM 0.32's CPU engine once prefills are chunked ("CPU Generator does
    # not use offset"), so none is sent unless asked for.
    seed: int | None = setting(None, "Per-request sampling seed (re-asks add 1 each); default: the server's.")

    def for_attempt(self, attempt: int) -> SamplingParams:
        """A re-ask samples afresh: same parameters, the next seed if there is one."""
        return self if self.seed is None else replace(self, seed=self.seed + attempt)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Completion:
    """What a server said to one request (what the cache stores)."""

    content: str | None
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Completion:
        return cls(**json.loads(text))


class ServerUnavailable(RuntimeError):
    """The server did not come back within its deadline: the job should fail, not dead-letter."""


class ServerRejected(RuntimeError):
    """The server refuses the model or the credentials (HTTP 401, 403, 404): every request would
    fail alike, so this is a configuration error that fails the job rather than bad input."""


_CONFIGURATION_ERRORS = (401, 403, 404)


class Usage(Counter):
    """Running totals: requests (HTTP requests sent), retries, recoveries, cache_hits, prompt_tokens,
    completion_tokens. Updated on the client's event loop only."""

    def take(self) -> Counter:
        """The totals since the last take (call it on the client's loop)."""
        taken = Counter(self)
        self.clear()
        return taken


class ResponseCache:
    """Completions by request key under `root` (any Beam filesystem): root/ab/abcdef....json.

    An entry that is absent, or torn by a killed run, is a miss. Any other read error (a permission
    error on a bucket, say) is a miss too, so the job goes on asking the server, but it is logged
    once per cache, since every later lookup is likely to fail alike."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self._read_error_logged = False

    def path(self, key: str) -> str:
        return files.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> Completion | None:
        path = self.path(key)
        try:
            with files.open(path) as f:
                return Completion.from_json(f.read())
        except (FileNotFoundError, ValueError, TypeError):  # absent, or torn by a killed run
            return None
        except OSError as e:
            if not files.exists(path):  # Beam filesystems report absence as OSError too
                return None
            if not self._read_error_logged:
                log.warning(
                    "response cache %s: reading %s failed (%s: %s); treating entries as misses",
                    self.root,
                    path,
                    type(e).__name__,
                    e,
                )
                self._read_error_logged = True
            return None

    def put(self, key: str, completion: Completion) -> None:
        final = self.path(key)
        partial = f"{final}.{os.getpid()}.{threading.get_ident()}.partial"
        with files.create(partial) as f:
            f.write(completion.to_json().encode())
        files.rename(partial, final)


class Server(Protocol):
    def ensure_ready(self) -> str:
        """Block until the server answers (starting or restarting it if this side owns it); its URL."""


def http_ok(url: str, timeout_s: float = 5.0, also: tuple[int, ...] = ()) -> bool:
    """Whether `url` answers a GET with 200 (or a status in `also`)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200 or response.status in also
    except urllib.error.HTTPError as e:
        return e.code in also
    except (OSError, http.client.HTTPException):  # URLError is an OSError; a garbled reply is neither
        return False


@dataclass
class Endpoint:
    """A server someone else runs (`--endpoint`): recovery means waiting for it, up to a deadline."""

    base_url: str  # ending in /v1
    wait_s: float = 600.0
    poll_s: float = 2.0

    def ensure_ready(self) -> str:
        deadline = time.monotonic() + self.wait_s
        probe = f"{self.base_url.rstrip('/')}/models"
        # The probe sends no key: a server that wants one answers 401/403, and is up.
        while not http_ok(probe, also=(401, 403)):
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{probe} did not answer within {self.wait_s:.0f} s")
            time.sleep(self.poll_s)
        return self.base_url


@dataclass(frozen=True)
class ClientConfig:
    concurrency: int = setting(8, "Requests in flight per worker.")
    timeout: float = setting(120.0, "Per-request timeout, seconds.")
    max_retries: int = setting(
        4, "Retries per request on 429, 5xx, connection errors and timeouts (the openai client's)."
    )
    max_recoveries: int = setting(2, "After the retries: times to wait for (or restart) the server and call again.")
    api_key_env: str = setting(
        "OPENAI_API_KEY", "Environment variable holding the server's API key (read on each worker)."
    )


NO_KEY = "EMPTY"  # what a server without keys (vLLM without --api-key) accepts


def api_key(variable: str) -> str:
    """The key in $variable, read where the client runs (on Dataflow: the worker's environment).

    Only the variable's name is ever configured, so the key itself never reaches a manifest, the
    cache, logs or dead letters."""
    return os.environ.get(variable) or NO_KEY


def backoff_s(attempt: int, base_s: float = 0.5, cap_s: float = 8.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))


class ChatClient:
    """Chat completions against one server, `concurrency` at a time. Use from one event loop."""

    def __init__(
        self,
        model: str,
        config: ClientConfig,
        server: Server,
        cache: ResponseCache | None = None,
        in_flight: Callable[[int], None] | None = None,
    ):
        """`in_flight(+1 / -1)` hears each request as it goes out and comes back (a live gauge)."""
        import openai

        self.model = model
        self._in_flight = in_flight or (lambda n: None)
        self.config = config
        self.server = server
        self.cache = cache
        self.usage = Usage()
        self._slots = asyncio.Semaphore(config.concurrency)
        self._recovery = asyncio.Lock()
        http_client = openai.DefaultAsyncHttpxClient(event_hooks={"request": [self._on_request]})
        self._key = api_key(config.api_key_env)
        self._openai = openai.AsyncOpenAI(
            base_url=server.ensure_ready(),
            api_key=self._key,
            timeout=config.timeout,
            max_retries=config.max_retries,
            http_client=http_client,
        )

    async def _on_request(self, request) -> None:
        self.usage["requests"] += 1
        if request.headers.get("x-stainless-retry-count", "0") != "0":
            self.usage["retries"] += 1

    async def complete(
        self, messages: list[dict], sampling: SamplingParams, response_format: dict | None, key: str
    ) -> Completion:
        """The server's completion for this request, from the cache when it was asked before."""
        if self.cache is not None:
            cached = await asyncio.to_thread(self.cache.get, key)
            if cached is not None:
                self.usage["cache_hits"] += 1
                return cached
        completion = await self._request(messages, sampling, response_format)
        self.usage["prompt_tokens"] += completion.prompt_tokens
        self.usage["completion_tokens"] += completion.completion_tokens
        if self.cache is not None:
            await asyncio.to_thread(self.cache.put, key, completion)
        return completion

    async def _request(
        self, messages: list[dict], sampling: SamplingParams, response_format: dict | None
    ) -> Completion:
        import openai

        extra = {"response_format": response_format} if response_format else {}
        for recovery in range(self.config.max_recoveries + 1):
            try:
                async with self._slots:
                    self._in_flight(1)
                    try:
                        response = await self._openai.chat.completions.create(
                            model=self.model, messages=messages, **sampling.to_dict(), **extra
                        )
                    finally:
                        self._in_flight(-1)
                return _completion(response)
            except openai.APIStatusError as e:
                if e.status_code in _CONFIGURATION_ERRORS:
                    raise ServerRejected(self._rejected_because(e.status_code, self._said(e))) from e
                failure = Rejection(f"http_{e.status_code}", self._said(e)[:500])
                if e.status_code < 500 and e.status_code not in (408, 409, 429):
                    raise failure from e
            except openai.APIConnectionError as e:  # timeouts included
                failure = Rejection("unreachable", f"{type(e).__name__}: {self._said(e)}")
            except (ValueError, openai.APIResponseValidationError) as e:  # a garbled 200 body
                failure = Rejection("bad_response", f"{type(e).__name__}: {self._said(e)}"[:500])
            if recovery < self.config.max_recoveries:
                self.usage["recoveries"] += 1
                await asyncio.sleep(backoff_s(recovery))
                await self._recover()
        raise failure

    def _said(self, error: Exception) -> str:
        """An error's message, without the key should a server echo it (dead letters are kept)."""
        text = str(error)
        return text.replace(self._key, "<redacted>") if self._key != NO_KEY else text

    def _rejected_because(self, status: int, message: str) -> str:
        """What a 401/403/404 means for this client: for credentials, which variable was read."""
        said = f"model {self.model!r}: HTTP {status}: {message[:800]}"
        if status == 404:
            return said
        variable = self.config.api_key_env
        held = "set" if os.environ.get(variable) else "unset or empty, so no key was sent"
        return f"{said}; the API key is read from ${variable} ({held}; --api-key-env names another variable)"

    async def _recover(self) -> None:
        """Wait for the server (restart it if it is ours and dead); one recovery at a time."""
        async with self._recovery:
            self._openai.base_url = await asyncio.to_thread(self.server.ensure_ready)


def _completion(response) -> Completion:
    """The first choice of a chat completion; ValueError for a 200 whose body is not one (the
    openai client builds its objects without validation, so any JSON gets here)."""
    try:
        choice = response.choices[0] if response.choices else None
        message = choice.message if choice else None
        content = message.content if message else None
        if content is not None and not isinstance(content, str):
            raise TypeError(f"content is {type(content).__name__}")
        usage = response.usage
        return Completion(
            content=content,
            finish_reason=choice.finish_reason if choice else None,
            prompt_tokens=int(usage.prompt_tokens or 0) if usage else 0,
            completion_tokens=int(usage.completion_tokens or 0) if usage else 0,
        )
    except (AttributeError, TypeError, IndexError, KeyError) as e:
        raise ValueError(f"not a chat completion: {type(e).__name__}: {e}") from e


class EventLoopThread:
    """An asyncio loop on a daemon thread, so synchronous code can run coroutines on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lwm-data-llm", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()


# --- a vLLM server per machine -------------------------------------------------------------------


def default_vllm_python() -> str:
    """The interpreter with vLLM installed: $LWM_VLLM_PYTHON, else this one."""
    return os.environ.get(VLLM_PYTHON_ENV) or sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def vllm_command(model: str, port: int, python: str | None = None, extra_args: tuple[str, ...] = ()) -> list[str]:
    """vLLM's OpenAI server on the loopback interface, with compact structured output."""
    return [
        python or default_vllm_python(),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--structured-outputs-config",
        VLLM_STRUCTURED_OUTPUTS,
        *extra_args,
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class VLLMServer:
    """One vLLM server per (model, arguments) on this machine, shared by every process using it.

    State lives in `state_root/lwm-data-vllm-<key>/`: `lock` (flock, held while starting), `server.json`
    (pid, port), `server.log`, and `users/<pid>` for each process holding it. The first `acquire` starts
    the server; `ensure_ready` restarts it when its process has died; the last `release` stops it.
    """

    def __init__(
        self,
        model: str,
        extra_args: tuple[str, ...] = (),
        python: str | None = None,
        state_root: str | None = None,
        ready_timeout_s: float = 900.0,
    ):
        self.model = model
        self.extra_args = tuple(extra_args)
        self.python = python or default_vllm_python()
        self.ready_timeout_s = ready_timeout_s
        key = hashlib.sha256(json.dumps([model, self.extra_args, self.python]).encode()).hexdigest()[:16]
        self.state_dir = os.path.join(state_root or tempfile.gettempdir(), f"lwm-data-vllm-{key}")
        self.users_dir = os.path.join(self.state_dir, "users")
        os.makedirs(self.users_dir, exist_ok=True)
        self._children: dict[int, subprocess.Popen] = {}
        self._holds = 0

    @property
    def log_path(self) -> str:
        return os.path.join(self.state_dir, "server.log")

    def _lock(self):
        lock = open(os.path.join(self.state_dir, "lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    def _state(self) -> dict | None:
        try:
            with open(os.path.join(self.state_dir, "server.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _write_state(self, state: dict | None) -> None:
        path = os.path.join(self.state_dir, "server.json")
        if state is None:
            if os.path.exists(path):
                os.remove(path)
            return
        with open(f"{path}.tmp", "w") as f:
            json.dump(state, f)
        os.replace(f"{path}.tmp", path)

    def _running(self, state: dict | None) -> bool:
        if not state:
            return False
        child = self._children.get(state["pid"])
        return child.poll() is None if child else _alive(state["pid"])

    def acquire(self) -> str:
        """Hold the server (starting it if needed) until `release`; returns its /v1 URL."""
        self._holds += 1
        open(os.path.join(self.users_dir, str(os.getpid())), "w").close()
        if self._holds == 1:
            atexit.register(self.release)
        return self.ensure_ready()

    def release(self) -> None:
        """Drop this process's hold; the last holder on the machine stops the server."""
        if self._holds == 0:
            return
        self._holds -= 1
        if self._holds:
            return
        atexit.unregister(self.release)
        with self._lock():
            try:
                os.remove(os.path.join(self.users_dir, str(os.getpid())))
            except FileNotFoundError:
                pass
            if not self._live_users():
                self.stop()

    def _live_users(self) -> list[int]:
        return [int(name) for name in os.listdir(self.users_dir) if _alive(int(name))]

    def ensure_ready(self) -> str:
        with self._lock():
            state = self._state()
            if not self._running(state):
                if state:  # it died: first end what is left of its process group (vLLM's engine processes)
                    self.stop(grace_s=0)
                state = self._start()
            url = f"http://{LOOPBACK}:{state['port']}"
            self._wait_ready(url, state["pid"])
        return f"{url}/v1"

    def pid(self) -> int | None:
        state = self._state()
        return state["pid"] if self._running(state) else None

    def _start(self) -> dict:
        port = free_port()
        command = vllm_command(self.model, port, self.python, self.extra_args)
        log.info("starting vLLM: %s", " ".join(command))
        with open(self.log_path, "ab") as out:
            child = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._children[child.pid] = child
        state = {"pid": child.pid, "port": port, "started": time.time()}
        self._write_state(state)
        return state

    def _wait_ready(self, url: str, pid: int) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not http_ok(f"{url}/health"):
            if not self._running({"pid": pid}):
                raise ServerUnavailable(f"vLLM exited while starting; log tail:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"vLLM not ready after {self.ready_timeout_s:.0f} s; log: {self.log_path}")
            time.sleep(1.0)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the server's whole process group (vLLM runs its engine in child processes), also
        when its main process has died already. (A group id is not reused while members live.)"""
        state = self._state()
        if state:
            _kill_group(state["pid"], grace_s)
        child = self._children.pop(state["pid"], None) if state else None
        if child:
            child.wait(timeout=grace_s)
        self._write_state(None)


def _kill_group(pid: int, grace_s: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
