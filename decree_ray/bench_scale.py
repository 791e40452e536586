"""Overhead of the scale layer: `python -m decree_ray.bench_scale --out bench [--n 1000] [--keys 100000]`.

1. Throughput: N distinct tiny encoders (timm/test_efficientnet, 32 px) on moto's S3 server, scanned with a
   near-instant inversion (--steps 1) by the Ray job, against the same encoders in a plain single-process loop
   of `scan_encoder` (download, scan, delete). The gap is what Ray, S3 and Parquet cost per encoder.
2. Listing: `iter_tasks` over --keys objects under one prefix, in a child process that measures its own
   peak Python allocation (tracemalloc) and peak RSS; a second child builds the whole list for contrast.

Writes OUT/scale.json and OUT/SCALE.md.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCH, SIZE = "timm/test_efficientnet", 32
OVERRIDES = (("restarts", 1), ("batch_size", 8), ("eval_images", 8))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upload_encoders(client, bucket: str, n: int) -> str:
    import numpy as np
    import torch
    from safetensors.torch import save

    from decree.encoders import create_encoder

    torch.manual_seed(0)
    base = {k: v.contiguous() for k, v in create_encoder(ARCH, image_size=SIZE).backbone.state_dict().items()}
    key = next(k for k, v in base.items() if v.is_floating_point())
    lines = []
    for i in range(n):
        sd = dict(base)
        sd[key] = base[key].clone()
        sd[key].view(-1)[0] += 1e-3 * (i + 1)  # distinct bytes: nothing is deduplicated
        client.put_object(Bucket=bucket, Key=f"zoo/encoders/e{i:06d}.safetensors", Body=save(sd))
        lines.append(
            json.dumps({"id": f"e{i:06d}", "uri": f"encoders/e{i:06d}.safetensors", "arch": ARCH, "image_size": SIZE})
        )
    client.put_object(Bucket=bucket, Key="zoo/manifest.jsonl", Body=("\n".join(lines) + "\n").encode())
    buf = io.BytesIO()
    np.savez(buf, x=np.random.default_rng(0).integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8))
    client.put_object(Bucket=bucket, Key="zoo/shadow.npz", Body=buf.getvalue())
    return f"s3://{bucket}/zoo"


def _plain_loop(client, bucket: str, n: int, shadow_uri: str, steps: int, options) -> dict:
    import torch

    from decree.inversion import InversionConfig
    from decree.scan import scan_encoder
    from decree.shadow import ShadowSet

    from . import storage

    torch.set_num_threads(1)  # one actor's share
    config = InversionConfig.from_profile("fast", max_steps=steps, min_steps=min(steps, 100), **dict(OVERRIDES))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shadow_path, _ = storage.fetch(shadow_uri, tmp, options)
        shadow = ShadowSet(shadow_path)
        for i in range(n):
            path = Path(tmp) / "ckpt.safetensors"
            client.download_file(bucket, f"zoo/encoders/e{i:06d}.safetensors", str(path))
            scan_encoder(path, ARCH, shadow, config=config, image_size=SIZE, device="cpu")
            path.unlink()
    seconds = time.perf_counter() - t0
    return {"encoders": n, "seconds": seconds, "encoders_per_minute": 60 * n / seconds, "processes": 1}


def _ray_job(src: str, endpoint: str, n: int, steps: int, workers: int) -> dict:
    import ray

    from . import results
    from .job import JobConfig, run_job

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory() as out:
            config = JobConfig(
                source=f"{src}/manifest.jsonl",
                shadow=f"{src}/shadow.npz",
                out=out,
                endpoint_url=endpoint,
                steps=steps,
                overrides=OVERRIDES,
                num_workers=workers,
                evidence=False,
                flush_every=64,
                timeout=600,
            )
            summary = run_job(config)
            rows = results.load_rows(out)
    finally:
        ray.shutdown()
    core = sum(r["seconds"] or 0.0 for r in rows)
    stamps = sorted(r["scanned_at"] for r in rows)
    span = (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else 0.0
    return {
        "encoders": n,
        "workers": workers,
        "ray_start_seconds": ray_start,
        "seconds": summary.seconds,
        "encoders_per_minute": 60 * n / summary.seconds,
        "ok": summary.ok,
        "errors": summary.errors,
        "rows": len(rows),
        "core_seconds_sum": core,
        "overhead_seconds_per_encoder": (summary.seconds * workers - core) / n,
        # first row to last row: throughput once the actors are up (start-up excluded)
        "steady_encoders_per_minute": 60 * (len(stamps) - 1) / span if span > 0 else None,
    }


def _fill_keys(bucket: str, keys: int) -> None:
    """Put keys straight into the in-process moto backend: 100k HTTP PUTs would bench moto, not us."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for i in range(keys):
        backend.put_object(bucket, f"many/{i // 1000:04d}/{i:07d}.safetensors", b"")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _list_child(uri: str, endpoint: str, materialize: bool) -> None:
    import tracemalloc

    from .sources import checkpoint_suffixes, iter_tasks
    from .storage import S3Options, s3_client

    checkpoint_suffixes()  # imports torch via decree: measured apart from the listing
    s3_client(S3Options(endpoint))
    rss0 = _rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    tasks = iter_tasks(uri, arch=ARCH, options=S3Options(endpoint))
    count = len(list(tasks)) if materialize else sum(1 for _ in tasks)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    print(
        json.dumps(
            {
                "keys": count,
                "seconds": seconds,
                "keys_per_second": count / seconds,
                "peak_traced_mib": peak / 2**20,
                "rss_before_mib": rss0,
                "rss_growth_mib": _rss_mib() - rss0,
            }
        )
    )


def _listing(bucket: str, endpoint: str) -> dict:
    out = {}
    for mode in ("stream", "materialize"):
        cmd = [sys.executable, "-m", "decree_ray.bench_scale", "--_list-child", f"s3://{bucket}/many/", endpoint]
        cmd += ["--_materialize"] if mode == "materialize" else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _md_row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _markdown(result: dict) -> str:
    ray_, plain, lst = result["ray"], result["plain_loop"], result.get("listing")
    steady = ray_["steady_encoders_per_minute"] or 0.0
    lines = [
        "# Scale-layer overhead",
        "",
        f"Machine: {result['machine']}. Encoders: {ray_['encoders']} distinct `{ARCH}` checkpoints ({SIZE} px) "
        f"on moto's S3 server (loopback HTTP); inversion `--steps {result['steps']}` (near-instant on purpose).",
        "",
        _md_row("run", "encoders/min", "seconds", "notes"),
        "|---|---|---|---|",
        _md_row(
            "plain loop of `scan_encoder` (1 process, 1 thread)",
            f"{plain['encoders_per_minute']:.1f}",
            f"{plain['seconds']:.1f}",
            "download, scan, delete",
        ),
        _md_row(
            f"Ray job, {ray_['workers']} actors",
            f"{ray_['encoders_per_minute']:.1f}",
            f"{ray_['seconds']:.1f}",
            f"+{ray_['ray_start_seconds']:.1f}s Ray start; {ray_['ok']} ok / {ray_['errors']} errors",
        ),
        _md_row("Ray job, steady state (first to last row)", f"{steady:.1f}", "-", "actor start-up excluded"),
        "",
        f"Overhead per encoder (actor-seconds not spent in `scan_encoder`): "
        f"{ray_['overhead_seconds_per_encoder']:.3f}s (actor start-up, S3 download, sha256, Parquet parts).",
    ]
    if lst:
        lines += [
            "",
            f"## Listing {lst['stream']['keys']:,} keys (paginated `list_objects_v2`, 1,000 per page)",
            "",
            _md_row("mode", "seconds", "keys/s", "peak Python alloc while listing (MiB)", "RSS growth (MiB)"),
            "|---|---|---|---|---|",
        ]
        for name, m in (
            ("streaming `iter_tasks`", lst["stream"]),
            ("`list(iter_tasks(...))`, for contrast", lst["materialize"]),
        ):
            lines.append(
                _md_row(
                    name,
                    f"{m['seconds']:.1f}",
                    f"{m['keys_per_second']:.0f}",
                    f"{m['peak_traced_mib']:.1f}",
                    f"{m['rss_growth_mib']:.0f}",
                )
            )
        lines += [
            "",
            "Listing time is dominated by moto's server (it sorts the whole bucket per page); real S3 is faster.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--n", type=int, default=1000, help="encoders to scan")
    parser.add_argument("--keys", type=int, default=100_000, help="keys to list (0: skip the listing benchmark)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--_list-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_materialize", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._list_child:
        _list_child(*args._list_child, materialize=args._materialize)
        return 0

    from moto.server import ThreadedMotoServer

    from .storage import S3Options, s3_client

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    endpoint = "http://%s:%d" % server.get_host_and_port()
    for k, v in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ[k] = v  # this process and its Ray workers / children only
    try:
        options = S3Options(endpoint)
        client = s3_client(options)
        client.create_bucket(Bucket="bench-scale")
        print(f"[bench] uploading {args.n} encoders ...", flush=True)
        src = _upload_encoders(client, "bench-scale", args.n)
        print("[bench] plain loop ...", flush=True)
        plain = _plain_loop(client, "bench-scale", args.n, f"{src}/shadow.npz", args.steps, options)
        print(f"[bench] plain loop: {plain['encoders_per_minute']:.1f} encoders/min; Ray job ...", flush=True)
        ray_ = _ray_job(src, endpoint, args.n, args.steps, args.workers)
        print(f"[bench] Ray job: {ray_['encoders_per_minute']:.1f} encoders/min", flush=True)
        listing = None
        if args.keys:
            client.create_bucket(Bucket="bench-list")
            _fill_keys("bench-list", args.keys)
            print(f"[bench] listing {args.keys} keys ...", flush=True)
            listing = _listing("bench-list", endpoint)
    finally:
        server.stop()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "steps": args.steps,
        "plain_loop": plain,
        "ray": ray_,
        "listing": listing,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    (args.out / "SCALE.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
