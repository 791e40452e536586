"""Credentials and signed URLs never appear in output: CLI stdout/stderr, result rows, files under the output
(local and S3), or the logs of the scan's own Ray session.

The scan runs as the real `decree scan` command against the moto S3 server, with fake AWS credentials that are
easy to search for, over a source that makes every error path fire (unsafe pickle, missing object, escaping uri,
a presigned https URL in the manifest).
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import upload_folder, write_unsafe_pickle
from faults.recorder import ModuleRecorder
from faults.zoo import TINY_ARCH, make_zoo

pytestmark = [pytest.mark.s3, pytest.mark.ray]

KEY_ID = "AKIAFAKEDECREE7X2Q9Z"
SECRET = "fAkE/decree+SeCrEt/9x8y7z6w5v4u3t2s1r0qpo"
TOKEN = "FwoFAKEdecreeSESSIONtoken//zzQ9=="


@pytest.fixture(scope="module", autouse=True)  # first in, last out: times the whole module
def rec():
    r = ModuleRecorder("test_secrets")
    yield r
    r.close()


@pytest.fixture()
def record(rec, request):
    return functools.partial(rec, test=request.node.originalname)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """This module's own tiny zoo (conftest's layout)."""
    return make_zoo(tmp_path_factory.mktemp("zoo"))


def _needles(presigned: str) -> list[str]:
    from urllib.parse import parse_qs, urlsplit

    q = parse_qs(urlsplit(presigned).query)
    return [KEY_ID, SECRET, TOKEN, q["X-Amz-Signature"][0], "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token"]


def _leaks(text: str, needles: list[str]) -> list[str]:
    return [n for n in needles if n in text]


def test_credentials_and_signed_urls_never_appear_in_any_output(moto_server, zoo, tmp_path, record):
    import boto3
    from botocore.config import Config

    from decree_ray.storage import S3Options, s3_client

    client = s3_client(S3Options(moto_server))
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    src = upload_folder(client, bucket, zoo, "zoo")
    client.upload_file(str(write_unsafe_pickle(tmp_path / "evil.pt")), bucket, "zoo/encoders/evil.pt")
    signer = boto3.session.Session(aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, aws_session_token=TOKEN,
                                   region_name="us-east-1").client("s3", endpoint_url=moto_server,
                                                                   config=Config(signature_version="s3v4"))
    presigned = signer.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "zoo/encoders/enc1.safetensors"})
    assert KEY_ID in presigned and "X-Amz-Signature" in presigned
    lines = [json.loads(x) for x in (zoo / "manifest.jsonl").read_text().splitlines()][:2]
    lines += [{"id": "evil", "uri": "encoders/evil.pt", "arch": TINY_ARCH},
              {"id": "missing", "uri": "encoders/missing.safetensors", "arch": TINY_ARCH},
              {"id": "escape", "uri": "../x.safetensors", "arch": TINY_ARCH},
              {"id": "signed", "uri": presigned, "arch": TINY_ARCH},
              {"uri": presigned.replace("enc1", "enc2"), "arch": TINY_ARCH}]
    client.put_object(Bucket=bucket, Key="zoo/secret-manifest.jsonl",
                      Body="".join(json.dumps(x) + "\n" for x in lines).encode())

    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN,
           "AWS_DEFAULT_REGION": "us-east-1", "RAY_TMPDIR": str(ray_tmp), "COLUMNS": "200"}
    env.pop("AWS_PROFILE", None)
    outs = {"s3": f"s3://{bucket}/out"}
    texts: dict[str, str] = {}
    try:
        for kind, out in outs.items():
            proc = subprocess.run(
                [str(Path(sys.executable).parent / "decree"), "scan", f"{src}/secret-manifest.jsonl",
                 "--shadow", f"{src}/shadow.npz", "--out", out, "--endpoint-url", moto_server, "--steps", "2",
                 "--workers", "1", "--local-cpus", "1"],
                check=False, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
            assert proc.returncode in (1, 2), proc.stdout[-2000:] + proc.stderr[-3000:]  # errors (and maybe findings)
            texts[f"{kind} stdout"], texts[f"{kind} stderr"] = proc.stdout, proc.stderr
        # everything written under the output
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
        for obj in (o for page in pages for o in page.get("Contents", ())):
            texts[f"s3 {obj['Key']}"] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("latin-1")
        # the scan's own Ray session logs
        logs = [p for p in ray_tmp.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json")]
        for path in logs:
            texts[f"ray {path.name}"] = path.read_bytes().decode("latin-1")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    rows = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key="out/results.parquet")["Body"].read())).to_pylist()
    assert len(rows) == len(lines)
    by_id = {r["id"]: r for r in rows}
    assert by_id["signed"]["status"] == "error" and by_id["evil"]["unsafe_globals"]
    texts["rows"] = json.dumps(rows, default=str)
    needles = _needles(presigned)
    leaked = {name: _leaks(text, needles) for name, text in texts.items() if _leaks(text, needles)}
    assert leaked == {}, leaked
    assert logs, "the Ray session logs were not found"
    record("secrets", "fake AWS key id / secret / session token in the environment, presigned URLs in the manifest; "
           "unsafe, missing and escaping entries", len(texts),
           f"none found in CLI stdout/stderr, {len(rows)} result rows, the objects under the S3 output, or "
           f"{len(logs)} Ray session log files")


@pytest.mark.parametrize(("text", "want"), [
    ("bad uri 'https://b.s3.amazonaws.com/k.pt?X-Amz-Credential=AKIAFAKEDECREE7X2Q9Z%2F1&X-Amz-Signature=ab'",
     "bad uri 'https://b.s3.amazonaws.com/k.pt?***'"),
    ("http://user:pw@host:9000/x.pt#frag", "http://***@host:9000/x.pt#frag"),
    ("s3://bucket/odd?key.pt", "s3://bucket/odd?key.pt"),  # '?' is part of an S3 key
    ("key AKIAFAKEDECREE7X2Q9Z leaked", "key AKIA**************** leaked"),
    ("encoders/a.safetensors", "encoders/a.safetensors"),
])
def test_redact_drops_url_credentials_and_key_ids_and_keeps_everything_else(text, want):
    from decree_ray.redact import redact

    assert redact(text) == want


def test_worker_error_rows_are_redacted_whatever_raised_them():
    """Defence in depth: an exception quoting a signed URL or key id (e.g. from a worker crash) is redacted."""
    from decree_ray.sources import EncoderTask
    from decree_ray.worker import error_row

    leaky = (f"worker error: ClientError: GET https://b.s3.amazonaws.com/k.pt?X-Amz-Credential={KEY_ID}%2F1"
             f"&X-Amz-Security-Token={TOKEN}&X-Amz-Signature=ab failed for {KEY_ID}")
    row = error_row(EncoderTask(id="k", uri="s3://b/k.pt"), leaky)
    assert _leaks(row["error"], [KEY_ID, TOKEN, "X-Amz-Signature"]) == []
    assert row["error"].startswith("worker error: ClientError: GET https://b.s3.amazonaws.com/k.pt?***")
