"""JSON over HTTP to a teacher server: one keep-alive connection per thread and server, gzip when the server
offers it, bounded retries. Only the standard library (a training process should not need `requests`).
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass


class ServerError(Exception):
    """The server answered with an HTTP error. `status` is its code; `message` its own words, when it gave any."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"{url} answered HTTP {status}: {message}")
        self.url, self.status, self.message = url, status, message

    @property
    def retryable(self) -> bool:
        """Overload or a server-side failure: worth another try. Other 4xx are the request's fault."""
        return self.status in (408, 429) or self.status >= 500


class Unreachable(Exception):
    """No answer: connection refused or reset, a time-out, or a reply that is not JSON."""


@dataclass
class Reply:
    body: object  # the decoded JSON
    wire_bytes: int  # bytes received (compressed, when the server compressed)


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of an http(s) URL such as http://127.0.0.1:8000/v1."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}; expected e.g. http://127.0.0.1:8000/v1")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise ValueError(f"bad port in {url!r}: {err}") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


class JsonClient:
    """GET and POST JSON to one server (`base`: scheme://host:port[/prefix]); thread-safe."""

    def __init__(self, base: str, timeout_s: float) -> None:
        self.base = base.rstrip("/")
        self.scheme, self.host, self.port, self.prefix = split_url(base)
        self.timeout_s = timeout_s
        self.origin = f"{self.scheme}://{self.host}:{self.port}"
        self.local = threading.local()

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self.local.conn = cls(self.host, self.port, timeout=self.timeout_s)
        return conn

    def drop_connection(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None

    def call(self, method: str, path: str, body: object | None = None, root: bool = False) -> Reply:
        """One request; `root`: the path is on the server's root, not under the URL's prefix (vLLM's
        /tokenize beside /v1). Raises ServerError for an HTTP error, Unreachable for no usable answer."""
        target = path if root else f"{self.prefix}{path}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept-Encoding": "gzip", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn = self.connection()
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException, socket.timeout) as err:
            self.drop_connection()  # a half-read connection cannot be reused
            reason = "timed out" if isinstance(err, (socket.timeout, TimeoutError)) else f"{type(err).__name__}: {err}"
            raise Unreachable(f"{self.origin}{target}: {reason}") from None
        wire = len(raw)
        if response.getheader("Content-Encoding", "") == "gzip":
            raw = gzip.decompress(raw)
        if response.status >= 400:
            raise ServerError(f"{self.origin}{target}", response.status, error_message(raw))
        try:
            return Reply(json.loads(raw), wire)
        except ValueError:
            raise Unreachable(f"{self.origin}{target} answered something that is not JSON: {raw[:80]!r}") from None


def error_message(raw: bytes) -> str:
    """The server's own error text (OpenAI style {"error": {"message": ...}}, FastAPI {"detail": ...})."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:200].decode(errors="replace").strip() or "(no message)"
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return " ".join(str(err).split())[:300]
    return str(body)[:300]


def with_retries(call, clients: list[JsonClient], start: int, retries: int, backoff_s: float,
                 stop: threading.Event | None = None):
    """`call(client)` on clients[start], then, after a retryable failure, on the next client round-robin, at most
    `retries` more times with exponential back-off. Returns (result, retries used); raises the last error, at once
    when `stop` is set (the placement is closing)."""
    attempt = 0
    while True:
        client = clients[(start + attempt) % len(clients)]
        try:
            return call(client), attempt
        except (Unreachable, ServerError) as err:
            if isinstance(err, ServerError) and not err.retryable:
                raise
            if attempt >= retries or (stop is not None and stop.is_set()):
                raise
        if stop is not None and stop.wait(backoff_s * 2**attempt):
            raise Unreachable("the teacher placement was closed while a request waited to be retried")
        if stop is None:
            time.sleep(backoff_s * 2**attempt)
        attempt += 1
