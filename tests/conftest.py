"""Shared fixtures: a real S3 API (moto's server over HTTP on loopback), tiny real encoders, a shadow set."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
from exit_guard import pytest_sessionfinish, pytest_unconfigure  # noqa: F401 - hooks: see exit_guard's docstring
from faults.zoo import TINY_ARCH, TINY_SIZE, make_zoo, write_encoder  # noqa: F401 - re-exported to tests
from hypothesis import settings

# Very short inversions: the scale layer is under test here, not DECREE's accuracy.
FAST_OVERRIDES = (("restarts", 1), ("batch_size", 8), ("eval_images", 8))


# CI explores the same examples on every run: a property test that fails there fails reproducibly.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1. Credentials are set before any Ray worker starts."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3(moto_server):
    """(client, bucket, endpoint): a fresh bucket on the moto server for each test."""
    from decree_ray.storage import S3Options, s3_client

    client = s3_client(S3Options(moto_server))
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket, moto_server


def write_unsafe_pickle(path: Path) -> Path:
    """A .pt whose unpickling would call os.system: must be refused, never run."""
    import pickle

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > /dev/null",))

    path.write_bytes(pickle.dumps({"weight": Evil()}, protocol=2))
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """A small local folder: 3 distinct tiny encoders, one byte-identical copy, a shadow set, a manifest."""
    return make_zoo(tmp_path_factory.mktemp("zoo"))


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"
