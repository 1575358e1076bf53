"""A fault-injecting HTTP proxy on 127.0.0.1, between an LLM client and a real server.

POST request i (in arrival order) gets `plan[i]`, or passes through once the plan is used up:
    ok        forwarded unchanged
    http_500  a 500 error, never forwarded
    http_429  a 429 error, never forwarded
    delay     held for `delay_s` (past the client's timeout), then the connection is closed
    truncate  forwarded, then the reply is cut mid-JSON (status 200, connection closed)
    drop      the connection is closed without a reply
Bounded: it serves at most `max_requests` requests (503 with x-should-retry: false after that) and
shuts itself down after `lifetime_s`.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("http_500", "http_429", "delay", "truncate", "drop")
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        plan: Sequence[str] = (),
        delay_s: float = 5.0,
        max_requests: int = 10_000,
        lifetime_s: float = 600.0,
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.plan = list(plan)
        self.delay_s = delay_s
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.served: Counter = Counter()  # fault (or "ok") -> POST requests
        self.probes = 0  # GET requests (passed through)
        self.bodies: list[bytes] = []  # request bodies of POSTs, in arrival order
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def requests(self) -> int:
        return sum(self.served.values())

    def _next_fault(self, body: bytes | None) -> str:
        """The fault for a request; the plan applies to POSTs only (health probes pass through)."""
        with self._lock:
            index = self.requests + self.probes
            if index >= self.max_requests:
                return "over_limit"
            if body is None:
                self.probes += 1
                return "ok"
            fault = self.plan[len(self.bodies)] if len(self.bodies) < len(self.plan) else "ok"
            self.served[fault] += 1
            self.bodies.append(body)
            return fault

    def forward(self, method: str, path: str, headers, body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=self.lifetime_s)
        try:
            kept = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
            connection.request(method, path, body=body, headers=kept)
            response = connection.getresponse()
            payload = response.read()
            kept_out = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
            return response.status, kept_out, payload
        finally:
            connection.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._handle(None)

            def do_POST(self) -> None:
                self._handle(self.rfile.read(int(self.headers.get("content-length", 0))))

            def _handle(self, body: bytes | None) -> None:
                fault = proxy._next_fault(body)
                if fault in ("http_500", "http_429", "over_limit"):
                    status = {"http_500": 500, "http_429": 429, "over_limit": 503}[fault]
                    extra = [("x-should-retry", "false")] if fault == "over_limit" else []
                    self._reply(status, [("content-type", "application/json"), *extra], _error(fault))
                elif fault in ("delay", "drop"):
                    if fault == "delay":
                        time.sleep(proxy.delay_s)
                    self.close_connection = True
                else:
                    status, headers, payload = proxy.forward(self.command, self.path, self.headers, body)
                    if fault == "truncate":
                        self._reply_truncated(headers, payload)
                    else:
                        self._reply(status, headers, payload)

            def _reply(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _reply_truncated(self, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(200)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.close_connection = True

        return Handler


def _error(fault: str) -> bytes:
    return json.dumps({"error": {"message": f"injected {fault}", "type": "fault_proxy"}}).encode()
