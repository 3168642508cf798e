"""A local S3 protocol server (moto) for tests of object-store URIs; nothing leaves 127.0.0.1.

``start()`` runs moto's threaded server on a free localhost port once per test session;
``bucket_uri(name)`` creates a fresh bucket and returns a raydyn store URI for it, with the
endpoint given the way a user would for MinIO or another S3-compatible service
(``?endpoint_override=HOST:PORT&scheme=http``). Credentials are dummy values that
tests/conftest.py puts in the environment before Ray starts, so Ray workers see them too.
"""
from __future__ import annotations

import socket
import uuid

_server = None
_port: int | None = None


def available() -> bool:
    try:
        import boto3  # noqa: F401
        from moto.server import ThreadedMotoServer  # noqa: F401
    except ImportError:
        return False
    return True


def start() -> int:
    global _server, _port
    if _server is None:
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            _port = s.getsockname()[1]
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per HTTP request otherwise
        _server = ThreadedMotoServer(ip_address="127.0.0.1", port=_port, verbose=False)
        _server.start()
    assert _port is not None
    return _port


def bucket_uri(prefix: str = "results") -> str:
    import boto3

    port = start()
    name = f"rd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
