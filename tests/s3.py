"""A real S3 API for tests: moto's server in a thread on 127.0.0.1, with fault injection.

``moto_s3()`` starts moto's WSGI app behind a small middleware and yields an :class:`S3Server`
with its endpoint and the fsspec ``storage_options`` that reach it. The middleware can

* make a fraction of S3 requests fail transiently (``503 SlowDown`` / ``500 InternalError``, drawn
  from a seeded RNG), the way a busy object store does, to show that retries lose nothing;
* refuse every mutating request to some buckets with ``403 AccessDenied``, the way a read-only
  credential is refused, to show that readers need no write permission.

Usable outside pytest (``python -c "from tests.s3 import moto_s3 ..."``); the pytest fixtures live
in ``tests/cache_tools/conftest.py``.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DUMMY_CREDENTIALS", "FaultInjector", "S3Server", "free_port", "moto_s3"]

#: Credentials moto accepts; set in the environment by the fixtures (never real ones).
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

_ERRORS = (
    ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    ("500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_body(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        "<RequestId>skd-test</RequestId></Error>"
    ).encode()


def _drain(environ: dict) -> None:
    """Read the request body, so a refused upload does not poison the kept-alive connection."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    length = environ.get("CONTENT_LENGTH")
    if length:
        remaining = int(length)
        while remaining > 0:
            chunk = stream.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
    elif environ.get("wsgi.input_terminated"):
        while stream.read(1 << 20):
            pass


@dataclass
class FaultInjector:
    """WSGI middleware in front of moto: transient failures and read-only buckets.

    Attributes:
        failure_rate: fraction of S3 requests answered with a transient error (0 = none).
        read_only: bucket names whose PUT/POST/DELETE requests are refused with 403.
        injected / requests: counters, for tests that want to show faults really happened.
    """

    app: Any
    failure_rate: float = 0.0
    seed: int = 0
    read_only: set[str] = field(default_factory=set)
    injected: int = 0
    requests: int = 0
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def reset(self, *, failure_rate: float = 0.0, seed: int = 0) -> None:
        with self._lock:
            self.failure_rate = failure_rate
            self._rng = random.Random(seed)
            self.read_only = set()
            self.injected = self.requests = 0

    def __call__(self, environ: dict, start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/moto-api"):
            bucket = path.lstrip("/").split("/", 1)[0]
            method = environ.get("REQUEST_METHOD", "GET")
            with self._lock:
                self.requests += 1
                refuse = method in ("PUT", "POST", "DELETE") and bucket in self.read_only
                fail = None
                if not refuse and self.failure_rate and self._rng.random() < self.failure_rate:
                    fail = _ERRORS[self._rng.randrange(len(_ERRORS))]
                    self.injected += 1
            if refuse:
                fail = ("403 Forbidden", "AccessDenied", "Access Denied")
            if fail is not None:
                _drain(environ)
                status, code, message = fail
                # a HEAD answer has no body (RFC 9110 9.3.2); Werkzeug >= 3.1.9 no longer drops one for
                # us, and aiohttp then fails the request on the "data after Connection: close"
                body = b"" if method == "HEAD" else _error_body(code, message)
                start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
                return [body]
        return self.app(environ, start_response)


@dataclass
class S3Server:
    """A running moto S3 server."""

    endpoint: str
    faults: FaultInjector
    storage_options: dict
    bucket: str = ""  # set by fixtures that hand out a bucket per test ("s3://name")

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        """Create a bucket (if needed) and return ``s3://name``."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


def storage_options_for(endpoint: str, *, retries: int = 10) -> dict:
    """fsspec options for s3fs against ``endpoint`` with dummy credentials and patient retries."""
    return {
        "key": DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        # botocore retries 5xx/SlowDown itself; "legacy" mode has no retry quota to run out of
        "config_kwargs": {"retries": {"max_attempts": retries, "mode": "legacy"}},
        # no listings cache: several processes/fs instances write and read the same bucket
        "use_listings_cache": False,
    }


@contextmanager
def moto_s3(*, buckets: tuple[str, ...] = (), failure_rate: float = 0.0, seed: int = 0) -> Iterator[S3Server]:
    """Start moto's S3 server on 127.0.0.1 (a free port) in a thread; stop it on exit.

    Sets dummy AWS credentials in the environment for the duration (restored afterwards).
    """
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class _QuietHandler(WSGIRequestHandler):
        def log(self, *args: Any, **kwargs: Any) -> None:  # one line per request is noise in tests
            pass

    saved = {k: os.environ.get(k) for k in DUMMY_CREDENTIALS}
    os.environ.update(DUMMY_CREDENTIALS)
    faults = FaultInjector(DomainDispatcherApplication(create_backend_app), seed=seed)
    server = make_server("127.0.0.1", free_port(), faults, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    try:
        s3 = S3Server(endpoint=endpoint, faults=faults, storage_options=storage_options_for(endpoint))
        for b in buckets:
            s3.make_bucket(b)
        faults.reset(failure_rate=failure_rate, seed=seed)
        yield s3
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
