"""A real S3 API for the tests: moto's server (``ThreadedMotoServer``) on a free port, one per test session.

``moto_endpoint()`` starts it on first use (and stops it at exit); ``s3_env(bucket)`` creates a bucket and
returns the standard AWS variables that point botocore (s3fs) at it — for this process or a subprocess.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

ACCESS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@lru_cache
def moto_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access line per request in the test output
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    atexit.register(server.stop)
    return f"http://127.0.0.1:{port}"


def s3_env(bucket: str | None = None) -> dict[str, str]:
    """The AWS variables for the session's moto server; ``bucket`` is created (if missing) first."""
    env = {**ACCESS, "AWS_ENDPOINT_URL": moto_endpoint()}
    if bucket is not None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=bucket)
    return env


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block, then restore the previous values."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
