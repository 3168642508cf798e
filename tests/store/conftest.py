"""The three backends every conformance test runs against.

- ``path``: a plain local directory path;
- ``file_uri``: the same kind of directory named by a ``file://`` URI;
- ``mock``: pyarrow's in-memory ``_MockFileSystem`` behind a ``mock://`` URI. The
  store resolves non-local URIs through one hook (``raydyn.store.store._fs_from_uri``,
  which calls ``pyarrow.fs.FileSystem.from_uri``); the fixture routes ``mock://``
  there, so the mock runs exactly the code path of ``s3://`` and ``gs://``;
- ``s3``: a real ``s3://`` URI against a local S3 protocol server (moto, tests/s3_helper.py),
  through pyarrow's S3FileSystem: HTTP, multipart uploads, no atomic rename.
"""
from __future__ import annotations

import pyarrow._fs as pa_private_fs
import pytest

import raydyn.store.store as store_module
from raydyn.store import Store, open_store

from tests import s3_helper

BACKENDS = ("path", "file_uri", "mock", "s3")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_uri(backend, tmp_path, monkeypatch) -> str:
    if backend == "path":
        return str(tmp_path / "store")
    if backend == "file_uri":
        return (tmp_path / "store").as_uri()
    if backend == "s3":
        if not s3_helper.available():
            pytest.skip("moto[server] is not installed (it is in the test extra)")
        return s3_helper.bucket_uri()
    mock = pa_private_fs._MockFileSystem()
    real = store_module._fs_from_uri

    def from_uri(uri: str):
        if uri.startswith("mock://"):
            return mock, uri[len("mock://") :]
        return real(uri)

    monkeypatch.setattr(store_module, "_fs_from_uri", from_uri)
    return "mock://bucket/results"


@pytest.fixture
def store(store_uri) -> Store:
    return open_store(store_uri, write=True)
