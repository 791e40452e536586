"""The README's main job, end to end on one machine: `python -m decree_ray.demo --workdir DIR`.

1. build a small zoo (4 clean, 4 trojaned encoders; decree.zoo.build_zoo) in DIR/zoo (kept between runs);
2. start moto's S3 server on a loopback port and upload the zoo to s3://decree-demo/zoo/;
3. `decree scan s3://decree-demo/zoo/manifest.jsonl --endpoint-url ... --shadow s3://.../shadow.npz --out DIR/out`
   on an embedded Ray; 4. `decree report DIR/out/results.parquet --html DIR/out/report.html`; 5. stop the server.

Exit status: 0 when the scan and the report ran (finding backdoors is the point), 2 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "decree-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_demo_zoo(zoo: Path, *, build: bool = True) -> Path:
    """build_zoo keeps its own cache: an up-to-date zoo in `zoo` is reused, not retrained."""
    if not build:
        if not (zoo / "manifest.jsonl").is_file():
            raise FileNotFoundError(f"no zoo at {zoo} (manifest.jsonl missing); run without --no-build")
        return zoo
    from decree.zoo import build_zoo

    print(f"[demo] building (or reusing) a zoo of 4 clean + 4 trojaned encoders in {zoo} ...", flush=True)
    t0 = time.monotonic()
    build_zoo(zoo, clean=4, trojaned=4, families=("image-on-image",))
    print(f"[demo] zoo ready in {time.monotonic() - t0:.0f}s", flush=True)
    return zoo


def upload(folder: Path, endpoint: str, prefix: str) -> str:
    from .storage import S3Options, s3_client

    client = s3_client(S3Options(endpoint))
    client.create_bucket(Bucket=BUCKET)
    n = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
            n += 1
    print(f"[demo] uploaded {n} files to s3://{BUCKET}/{prefix}/")
    return f"s3://{BUCKET}/{prefix}"


def _decree(*args: str, env: dict[str, str]) -> int:
    cmd = [sys.executable, "-m", "decree_ray.cli", *args]
    print("[demo] $ decree " + " ".join(args), flush=True)
    return subprocess.run(cmd, env=env, check=False).returncode


def run(workdir: Path, *, steps: int | None = None, profile: str = "fast", cpus: int = 2, build: bool = True) -> int:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log
    workdir.mkdir(parents=True, exist_ok=True)
    zoo = build_demo_zoo(workdir / "zoo", build=build)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    print(f"[demo] moto S3 server at {endpoint}")
    # moto accepts any credentials; boto3 needs some to sign. Only the demo's own processes get these.
    env = dict(os.environ, AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION="us-east-1")
    env.pop("AWS_PROFILE", None)
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    try:
        src = upload(zoo, endpoint, "zoo")
        out = workdir / "out"
        t0 = time.monotonic()
        scan_args = [
            "scan",
            f"{src}/manifest.jsonl",
            "--endpoint-url",
            endpoint,
            "--shadow",
            f"{src}/shadow.npz",
            "--out",
            str(out),
            "--profile",
            profile,
            "--local-cpus",
            str(cpus),
        ]
        if steps is not None:
            scan_args += ["--steps", str(steps)]
        scan_code = _decree(*scan_args, env=env)
        print(
            f"[demo] scan exit code {scan_code} (0 clean, 1 backdoors found, 2 errors) in {time.monotonic() - t0:.0f}s"
        )
        if not (out / "results.parquet").is_file():
            return 2
        html = out / "report.html"
        report_code = _decree("report", str(out / "results.parquet"), "--fpr", "0.25", "--html", str(html), env=env)
        print(f"[demo] results: {out / 'results.parquet'}; ROC plot: {out / 'roc.png'}")
        print(f"[demo] HTML report: {html.resolve()}")
        return 2 if 2 in (scan_code, report_code) else 0
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--steps", type=int, default=None, help="override max_steps (quicker, less accurate)")
    parser.add_argument("--profile", default="fast")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray")
    parser.add_argument("--no-build", dest="build", action="store_false", help="scan the zoo already in WORKDIR/zoo")
    args = parser.parse_args(argv)
    return run(args.workdir, steps=args.steps, profile=args.profile, cpus=args.cpus, build=args.build)


if __name__ == "__main__":
    sys.exit(main())
