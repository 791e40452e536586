"""Shared fixtures: a real S3 API (moto's server over HTTP on loopback), tiny real encoders, a shadow set."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

TINY_ARCH = "timm/test_resnet"  # 0.37M parameters: a real timm ResNet that scans in about a second on CPU
TINY_SIZE = 32
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


def write_encoder(path: Path, seed: int) -> Path:
    """A real (random-init) checkpoint of TINY_ARCH, as a safetensors state dict."""
    import torch
    from safetensors.torch import save_file

    from decree.encoders import create_encoder

    torch.manual_seed(seed)
    enc = create_encoder(TINY_ARCH, image_size=TINY_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(path))  # may be channels-last
    return path


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
    root = tmp_path_factory.mktemp("zoo")
    for i in range(3):
        write_encoder(root / "encoders" / f"enc{i}.safetensors", seed=i)
    (root / "encoders" / "copy-of-enc0.safetensors").write_bytes((root / "encoders" / "enc0.safetensors").read_bytes())
    rng = np.random.default_rng(0)
    np.savez(root / "shadow.npz", x=rng.integers(0, 256, (16, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8))
    labels = {"enc0": "trojaned", "enc1": "clean", "enc2": "clean", "copy-of-enc0": "trojaned"}
    with open(root / "manifest.jsonl", "w") as fh:
        for name, label in labels.items():
            fh.write(
                json.dumps(
                    {
                        "id": name,
                        "uri": f"encoders/{name}.safetensors",
                        "arch": TINY_ARCH,
                        "image_size": TINY_SIZE,
                        "label": label,
                    }
                )
                + "\n"
            )
    return root


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"
