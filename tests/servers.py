"""Servers the remote-shard tests start and stop themselves, bound to 127.0.0.1 only.

`ShardServer`: a threaded HTTP server over a directory that answers HEAD and GET with Range requests (206 and
Content-Range, as CDNs and object stores do; with `ranges=False` it ignores them and sends the whole file, 200,
as `python -m http.server` does) and injects faults on request: reset the connection in the middle of a
response (`reset`: file name -> how many responses to cut), flip one byte of a file on the wire (`corrupt`:
name -> offset), answer 404 (`missing`), or stall after the headers (`stall`). With `login` set it answers 401
to a request without HTTP Basic credentials of that user (a token sent as the user name, any password). It
counts requests and body bytes per file, so tests can check that a reader fetched only its range.

`http_server_process(root)`: `python -m http.server` itself, a real process on 127.0.0.1 (no Range support, no
Accept-Ranges), started and stopped with bounded waits.

`moto_server()`: moto's ThreadedMotoServer, the S3-compatible server s3fs's own tests use, with the AWS_*
variables s3fs and botocore read pointed at it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STALL_S = 20.0  # longer than any client timeout the tests set; bounded so a failing test cannot hang


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that stops reading mid-response (a reader done with its run, a closed stream) is normal."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class ShardServer:
    def __init__(self, root: Path, ranges: bool = True):
        self.root, self.ranges = root, ranges
        self.login: str | None = None
        self.reset: dict[str, int] = {}
        self.corrupt: dict[str, int] = {}
        self.missing: set[str] = set()
        self.stall: set[str] = set()
        self.requests: collections.Counter[str] = collections.Counter()
        self.body_bytes: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.httpd = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, rel: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{rel}".rstrip("/")

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()  # stalled handlers return
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _handler(server: ShardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # a client that vanishes frees its thread

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            rel = self.path.split("?", 1)[0].lstrip("/")
            path = server.root / rel
            name = path.name
            with server.lock:
                server.requests[rel] += 1
            if (
                server.login is not None
                and _basic_login(self.headers.get("Authorization", "")) != server.login
            ):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="shards"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if name in server.missing or not path.is_file() or ".." in rel:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            lo, hi = 0, len(data)
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if m and server.ranges:
                lo, hi = int(m.group(1)), min(len(data), int(m.group(2)) + 1 if m.group(2) else len(data))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(hi - lo))
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            chunk = bytearray(data[lo:hi])
            if name in server.corrupt and lo <= server.corrupt[name] < hi:
                chunk[server.corrupt[name] - lo] ^= 0xFF
            if name in server.stall:
                server.closing.wait(STALL_S)
                return
            with server.lock:
                cut = server.reset.get(name, 0) > 0 and len(chunk) > 1
                if cut:
                    server.reset[name] -= 1
            if cut:  # half the body, then a TCP reset: the client sees the connection drop mid-response
                self.wfile.write(chunk[: len(chunk) // 2])
                self.wfile.flush()
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                self.connection.close()
                self.close_connection = True
                return
            self.wfile.write(chunk)
            with server.lock:
                server.body_bytes[rel] += len(chunk)

    return Handler


def _basic_login(header: str) -> str | None:
    """The user name of an HTTP Basic Authorization header, None for anything else."""
    kind, _, value = header.partition(" ")
    if kind.lower() != "basic":
        return None
    try:
        return base64.b64decode(value).decode().partition(":")[0]
    except (ValueError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def http_server_process(root: Path) -> Iterator[str]:
    """`python -m http.server` over `root` on 127.0.0.1 and a free port, as a separate process; yields its
    base URL. Waits at most 30 s for it to listen and 10 s for it to stop (then kills it)."""
    with socket.socket() as s:  # a free port: http.server prints nothing parseable before it listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # it prints a traceback for every response a reader stops reading
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"python -m http.server did not start on port {port}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1; yields its endpoint URL with the AWS_* variables set for it
    (fake credentials: moto accepts any), restored afterwards."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def url(srv: ShardServer, tiny_shards: dict[str, Path], name: str) -> str:
    """The URL of tiny shard set `name` on `srv` (serving the tiny shards' parent directory)."""
    return srv.url(str(tiny_shards[name].relative_to(srv.root)))
