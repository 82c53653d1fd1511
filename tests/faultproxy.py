"""A loopback TCP proxy that injects object-store faults between a client (s3fs) and an S3 API
server (moto), for the tests and ``bench/store_faults.py``.

It reads just enough HTTP/1.1 to know where each request starts and ends (a head, then a
``Content-Length`` body; anything else, such as a chunked request body, is piped through
as it comes for the rest of that connection), so that a fault hits whole requests:

- ``refuse()``: every connection, open or new, is reset at once (a store that is away),
  until ``resume()``;
- ``slow(seconds)``: every chunk forwarded, either way, waits that long first;
- ``stall_next(k, seconds)``: the next ``k`` answers wait ``seconds`` (a client's read timeout);
- ``drop_next(k, after_bytes)``: the next ``k`` requests with a body are cut (both sides reset)
  after ``after_bytes`` bytes of the request (or half of it, if it is shorter): a connection
  lost mid-upload, which the server never completes;
- ``lose_answers(k)``: the next ``k`` requests reach the server whole, which answers; the
  answer never reaches the client, whose connection is reset (the write happened, the
  client cannot know it);
- ``fail_next(k, status)``: the next ``k`` requests are answered by the proxy itself with
  ``503 SlowDown`` or ``500 InternalError`` (an S3 XML error body), never forwarded;
- ``passing()``: back to normal (pending faults are cleared).

``match`` (a function of method and path) limits the faults to some requests; ``counts``
says how many of each fault were injected and how many requests went through.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

_ERRORS = {
    503: ("Service Unavailable", "SlowDown", "Please reduce your request rate."),
    500: ("Internal Server Error", "InternalError", "We encountered an internal error."),
}


def _reset(sock: socket.socket | None) -> None:
    """Close with a TCP reset (not a polite FIN): the peer sees the connection cut."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


class _Connection:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.swallow = False  # the answer to the last request must not reach the client
        self.stall = 0.0  # hold the next answer this long
        self.closed = False

    def close(self) -> None:
        self.closed = True
        _reset(self.client)
        _reset(self.upstream)

    # -------------------------------------------------------------- upstream -> client
    def _pipe_answers(self) -> None:
        up = self.upstream
        try:
            while True:
                data = up.recv(65536)
                if not data:
                    break
                if self.swallow:  # the server has answered: the write happened; cut it
                    break
                if self.stall:
                    time.sleep(self.stall)
                    self.stall = 0.0
                if self.proxy.delay:
                    time.sleep(self.proxy.delay)
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            self.close()

    # -------------------------------------------------------------- client -> upstream
    def _recv(self) -> bytes:
        data = self.client.recv(65536)
        if data and self.proxy.delay:
            time.sleep(self.proxy.delay)
        return data

    def _send_up(self, data: bytes) -> None:
        if self.upstream is None:
            self.upstream = socket.create_connection(self.proxy.upstream, timeout=None)
            threading.Thread(target=self._pipe_answers, daemon=True).start()
        self.upstream.sendall(data)

    def serve(self) -> None:
        buf = b""
        try:
            while not self.closed:
                while b"\r\n\r\n" not in buf:
                    data = self._recv()
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                head += b"\r\n\r\n"
                lines = head.decode("latin-1").split("\r\n")
                method, path = (lines[0].split(" ") + ["", ""])[:2]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self.proxy._count("unparsed")
                    self._send_up(head + buf)
                    while data := self._recv():
                        self.upstream.sendall(data)
                    return
                length = int(headers.get("content-length") or 0)
                fault = self.proxy._take_fault(method, path, length)
                if fault is not None and fault[0] == "fail":
                    self._answer_error(fault[1])
                    return
                if fault is not None and fault[0] == "stall":
                    self.stall = fault[1]
                cut_at = None
                if fault is not None and fault[0] == "drop":
                    cut_at = min(fault[1], max(1, (len(head) + length) // 2))
                lose = fault is not None and fault[0] == "lose"
                # the request: its head, then exactly ``length`` bytes of body
                sent = 0
                pending = head
                remaining = length
                while True:
                    take = min(remaining, len(buf))
                    pending += buf[:take]
                    buf = buf[take:]
                    remaining -= take
                    if cut_at is not None and sent + len(pending) >= cut_at:
                        self._send_up(pending[: cut_at - sent])
                        time.sleep(0.05)  # the server has these bytes, never the rest
                        self.close()
                        return
                    if lose and remaining == 0:
                        self.swallow = True  # set before the server can answer
                    if pending:  # the head goes first: a client that sent "Expect:
                        self._send_up(pending)  # 100-continue" waits for an answer
                        sent += len(pending)
                        pending = b""
                    if remaining == 0:
                        break
                    data = self._recv()
                    if not data:
                        return
                    buf = data
                self.proxy._count("requests")
                if lose:
                    _reset(self.client)  # the pipe closes upstream once the answer starts
                    return
        except OSError:
            pass
        finally:
            if not self.swallow:
                self.close()
            self.proxy._forget(self)

    def _answer_error(self, status: int) -> None:
        reason, code, message = _ERRORS[status]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
        ).encode()
        answer = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        with contextlib.suppress(OSError):
            self.client.sendall(answer)
            self.client.shutdown(socket.SHUT_WR)
            time.sleep(0.02)
        self.close()


class FaultProxy:
    """See the module's docstring. ``endpoint`` is what a client uses instead of the server's."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[-1].rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay = 0.0
        self.refusing = False
        self.match: Callable[[str, str], bool] = lambda method, path: True
        self.counts: Counter[str] = Counter()
        self._faults: list[tuple[str, float]] = []  # pending one-shot faults, in order
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._running = True
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ commands
    def passing(self) -> None:
        with self._lock:
            self.refusing = False
            self.delay = 0.0
            self._faults.clear()
            self.match = lambda method, path: True

    def refuse(self) -> None:
        """Reset every open connection and every new one until ``passing()``."""
        with self._lock:
            self.refusing = True
            conns = list(self._conns)
        for c in conns:
            c.close()

    def resume(self) -> None:
        """Stop refusing connections (other faults stay as they are)."""
        with self._lock:
            self.refusing = False

    def slow(self, seconds: float) -> None:
        self.delay = seconds

    def fail_next(self, k: int, status: int = 503) -> None:
        self._add([("fail", status)] * k)

    def drop_next(self, k: int, after_bytes: int = 1024) -> None:
        self._add([("drop", after_bytes)] * k)

    def lose_answers(self, k: int) -> None:
        self._add([("lose", 0)] * k)

    def stall_next(self, k: int, seconds: float) -> None:
        self._add([("stall", seconds)] * k)

    def pending(self) -> int:
        with self._lock:
            return len(self._faults)

    def close(self) -> None:
        self._running = False
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()

    # ------------------------------------------------------------------ internals
    def _add(self, faults: list[tuple[str, float]]) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def _take_fault(self, method: str, path: str, length: int) -> tuple[str, float] | None:
        """The fault this request gets, if any (taken off the queue and counted)."""
        with self._lock:
            if not self._faults or not self.match(method, path):
                return None
            kind, arg = self._faults[0]
            if kind == "drop" and length == 0:
                return None  # only requests that upload something are cut mid-upload
            self._faults.pop(0)
            name = {"fail": f"answered {int(arg)}", "drop": "cut mid-upload"}.get(kind, kind)
            self.counts[{"lose": "answer lost", "stall": "stalled"}.get(kind, name)] += 1
            return kind, arg

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refusing = self.refusing
                if refusing:
                    self.counts["refused"] += 1
            if refusing:
                _reset(client)
                continue
            conn = _Connection(self, client)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=conn.serve, daemon=True).start()


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()


class RetryCounter:
    """Counts the retries the S3 client takes, from the debug logs of botocore's retry
    handler (each retried attempt) and of s3fs's own retry loop."""

    def __init__(self) -> None:
        import logging

        self.botocore = 0
        self.s3fs = 0
        counter = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                if record.name.startswith("botocore.retr"):
                    if msg.startswith("Retry needed, retrying request after delay") or (
                        msg.startswith("Retry needed, action of")
                    ):
                        counter.botocore += 1
                elif record.name == "s3fs" and (
                    msg.startswith("Retryable error")
                    or (msg.startswith("Client error (maybe retryable)") and "SlowDown" in msg)
                ):
                    counter.s3fs += 1

        self.handler = _Handler(level=logging.DEBUG)
        self._loggers = [
            logging.getLogger(n)
            for n in ("botocore.retries.standard", "botocore.retryhandler", "s3fs")
        ]

    def __enter__(self) -> RetryCounter:
        import logging

        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.addHandler(self.handler)
            lg.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self._loggers, self._levels, strict=True):
            lg.removeHandler(self.handler)
            lg.setLevel(level)

    @property
    def total(self) -> int:
        return self.botocore + self.s3fs
