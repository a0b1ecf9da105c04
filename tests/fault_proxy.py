"""A loopback HTTP proxy in front of the GCS emulator that injects storage faults.

Every request is forwarded to the emulator except a `rate` fraction, spread evenly over the
requests (one in twenty at 5%), which become faults. The kinds of fault take turns, and a
setting's turn carries on when the same kinds are set again, so a handful of faults, even
split over two phases, exercises them all:

    429, 500, 503  a JSON error answer, as GCS gives when overloaded (the request never arrives)
    drop           the connection closed without an answer (the request never arrives)
    truncate       the request forwarded, its answer cut off half-way through the body and
                   the connection closed: a write happened that the client cannot see
    slow           the answer held back `slow_s` seconds, then sent whole

Clients are pointed here by STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL, so gcsfs,
TensorStore and Orbax in a command and in its Ray workers all go through it. The rate
and the kinds can change while clients are connected; `counts` says what was injected,
for the tests and for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERRORS = ("429", "500", "503")
KINDS = (*ERRORS, "drop", "truncate", "slow")
FAILURES = tuple(k for k in KINDS if k != "slow")  # every kind that fails the request

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes when it forwards.
_NOT_FORWARDED = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                  "trailer", "upgrade", "expect", "host", "content-length"}


class FaultProxy:
    """Forwards to `upstream`, failing a `rate` fraction of requests with one of `kinds`."""

    def __init__(self, upstream: str, *, rate: float = 0.0, kinds: tuple[str, ...] = KINDS,
                 slow_s: float = 0.5):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.slow_s = slow_s
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._turns: Counter = Counter()  # faults injected so far per kinds setting
        self._due = 0.0  # the fraction of a fault owed to the requests seen since the last one
        # GCS answers a request to a finished resumable upload with the object it made; the
        # emulator answers 404. A truncated answer to an upload's last chunk makes the client
        # ask again, so the proxy keeps each finished upload's answer and gives it, as GCS would.
        self._finished_uploads: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self.set(rate, kinds)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False  # idle keep-alive clients must not hold up stop()
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy",
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set(self, rate: float, kinds: tuple[str, ...] = KINDS) -> None:
        """Fail a `rate` fraction of the requests from now on, with kinds drawn from `kinds`."""
        unknown = set(kinds) - set(KINDS)
        if unknown or not 0.0 <= rate <= 1.0:
            raise ValueError(f"bad fault setting: rate={rate}, kinds={kinds}")
        with self._lock:
            self.rate, self.kinds = rate, tuple(kinds)

    def counts(self) -> dict[str, int]:
        """Requests seen, faults injected in total and per kind (every kind listed)."""
        with self._lock:
            return {"requests": self._counts["requests"], "faults": self._counts["faults"],
                    **{kind: self._counts[kind] for kind in KINDS}}

    def draw(self) -> str | None:
        """The fault for the next request, or None to forward it untouched."""
        with self._lock:
            self._counts["requests"] += 1
            self._due += self.rate
            if self._due < 1.0:
                return None
            self._due -= 1.0
            kind = self.kinds[self._turns[self.kinds] % len(self.kinds)]
            self._turns[self.kinds] += 1
            self._counts["faults"] += 1
            self._counts[kind] += 1
            return kind

    def forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
                ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The emulator's (status, headers, body) for one request."""
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                                timeout=120)
        try:
            forwarded = [(k, v) for k, v in headers if k.lower() not in _NOT_FORWARDED]
            if body or method in ("POST", "PUT", "PATCH"):
                forwarded.append(("Content-Length", str(len(body))))
            connection.putrequest(method, target, skip_accept_encoding=True)
            for key, value in forwarded:
                connection.putheader(key, value)
            connection.endheaders(body or None)
            response = connection.getresponse()
            answer = response.status, response.getheaders(), response.read()
        finally:
            connection.close()
        upload = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query).get("upload_id")
        if upload and method == "PUT":
            with self._lock:
                if answer[0] in (200, 201):
                    self._finished_uploads[upload[0]] = answer
                elif answer[0] == 404 and upload[0] in self._finished_uploads:
                    return self._finished_uploads[upload[0]]
        return answer


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    """One client connection (HTTP/1.1 keep-alive): each request forwarded or failed."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every answer waits ~40 ms for a delayed ACK
    proxy: FaultProxy

    def handle(self) -> None:
        # The client may hang up: an idle keep-alive connection, or it needed a prefix only.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().handle()

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        """Silent: a harvest makes thousands of requests."""

    def _handle(self) -> None:
        body = self._read_body()
        kind = self.proxy.draw()
        if kind in ERRORS:
            self._answer_error(int(kind))
            return
        if kind == "drop":
            self.close_connection = True  # closed with no answer at all
            return
        if kind == "slow":
            time.sleep(self.proxy.slow_s)
        status, headers, data = self.proxy.forward(self.command, self.path, list(self.headers.items()), body)
        self._answer(status, headers, data, truncate=kind == "truncate")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(parts)

    def _answer_error(self, status: int) -> None:
        """What GCS sends when it is overloaded or failing: a JSON error, connection kept."""
        data = json.dumps({"error": {"code": status, "message": f"injected fault {status}"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, *, truncate: bool) -> None:
        """Relay the emulator's answer; `truncate` closes the connection half-way through the body."""
        if truncate and (self.command == "HEAD" or not data):
            self.close_connection = True  # no body to cut short: the whole answer is lost
            return
        self.send_response(status)
        for key, value in headers:
            if key.lower() in _NOT_FORWARDED or key.lower() in ("date", "server"):
                continue  # hop-by-hop, recomputed, or already sent by send_response
            if key.lower() == "location":  # resumable uploads continue through the proxy
                value = value.replace(self.proxy.upstream.geturl().rstrip("/"), self.proxy.url)
            self.send_header(key, value)
        if self.command == "HEAD":  # no body, but the length a GET would get
            length = next((v for k, v in headers if k.lower() == "content-length"), None)
        else:
            length = str(len(data))
        if length is not None and status not in (204, 304):
            self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if truncate else data)
        self.close_connection = self.close_connection or truncate
