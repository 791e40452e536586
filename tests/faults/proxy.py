"""A fault-injecting HTTP proxy on loopback, in front of the moto S3 server.

Clients point `endpoint_url` at the proxy. For a seeded share of requests (and the first of each HTTP method) it
answers like a struggling S3, taking turns: 500 InternalError, 503 ServiceUnavailable, 503 SlowDown (throttling),
a dropped connection; never more than `max_consecutive` times in a row for the same request, so botocore's
retries (which the scanner relies on) always get through. `fail_writes_under` makes PUTs under a key prefix die mid-body (connection cut after half
the upload) once `writes_ok` of them have succeeded: storage that fails in the middle of a job.
"""

from __future__ import annotations

import collections
import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "SlowDown": (503, "SlowDown", "Please reduce your request rate."),
}


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0, max_consecutive: int = 2,
                 kinds: tuple[str, ...] = ("500", "503", "SlowDown", "reset")):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rate, self.max_consecutive, self.kinds = rate, max_consecutive, kinds
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.consecutive: collections.Counter = collections.Counter()
        self.injected: collections.Counter = collections.Counter()  # kind -> count
        self.injected_methods: collections.Counter = collections.Counter()  # method -> count
        self.requests = 0
        self.fail_writes_under: str | None = None  # "/bucket/prefix"
        self.writes_ok = 0
        self.cut_writes = 0
        self._allowed_writes: set[str] = set()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> str:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- one request ---------------------------------------------------------------------------------
    def _body(self, h: BaseHTTPRequestHandler, limit: int | None = None) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n if limit is None else min(n, limit))

    def _decide(self, h: BaseHTTPRequestHandler) -> str | None:
        key = (h.command, h.path)
        with self.lock:
            self.requests += 1
            if h.command == "PUT" and self.fail_writes_under and h.path.startswith(self.fail_writes_under):
                if h.path in self._allowed_writes:
                    pass
                elif self.writes_ok > 0:
                    self.writes_ok -= 1
                    self._allowed_writes.add(h.path)
                else:
                    self.cut_writes += 1
                    return "cut"
            # the first request of each method always fails, so reads and writes are both exercised
            first = h.command not in self.injected_methods
            if self.rate and self.consecutive[key] < self.max_consecutive and (first or self.rng.random() < self.rate):
                self.consecutive[key] += 1
                kind = self.kinds[sum(self.injected.values()) % len(self.kinds)]  # every kind, in turn
                self.injected[kind] += 1
                self.injected_methods[h.command] += 1
                return kind
            self.consecutive[key] = 0
            return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        fault = self._decide(h)
        if fault == "cut":  # read half the upload, then drop the connection: the object must not appear
            n = int(h.headers.get("Content-Length") or 0)
            self._body(h, limit=n // 2)
            h.close_connection = True
            h.connection.shutdown(2)
            return
        body = self._body(h)
        if fault == "reset":
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if fault is not None:
            status, code, message = _ERRORS[fault]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                       f"<RequestId>fault-proxy</RequestId></Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body if body or h.command in ("PUT", "POST") else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    h.send_header(k, v)
            h.send_header("Content-Length", resp.getheader("Content-Length") if h.command == "HEAD" else str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()
