"""How many scan actors to ask Ray for, and whether the cluster can still grow to host them.

A scale-to-zero cluster (cluster.yaml, the KubeRay RayJob) has no GPU before its first scan: the actors'
pending demand is what makes Ray's autoscaler add nodes. So a request the cluster cannot host *now* is made
anyway when an autoscaler runs; it fails at once only on a cluster that cannot grow, and otherwise when no
actor became ready within the startup timeout.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from .config import JobError


@dataclass(frozen=True)
class ActorShape:
    cpus: float
    gpus: float
    count: int
    fits_now: int  # how many of them the cluster can host before any node is added

    @property
    def asked(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.count} actors of {self.cpus:g} CPU{gpu}"


def offer(resources: dict) -> str:
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


def plan_actors(resources: dict, *, cpus: float, gpus: float | None, workers: int | None, max_encoders: int | None,
                can_grow: bool) -> ActorShape:
    """The actor shape for a cluster offering `resources`; raises JobError only if it can never be met."""
    if gpus is None:  # not asked for: GPUs if the cluster has them now, else CPU actors
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    fits = math.floor(resources.get("CPU", 0) / cpus + 1e-9)
    if gpus > 0:
        fits = min(fits, math.floor(resources.get("GPU", 0) / gpus + 1e-9))
    if fits < 1 and not can_grow:
        what = f"--gpus-per-encoder {gpus:g}" if gpus else f"--cpus-per-encoder {cpus:g}"
        raise JobError(f"{what} but the cluster has {offer(resources)} and no autoscaler that could add nodes "
                       "(start GPU workers, or scan on CPU with --gpus-per-encoder 0)")
    count = workers or max(1, fits)
    if max_encoders:
        count = min(count, max_encoders)
    return ActorShape(cpus, gpus, count, max(0, fits))


def autoscaler_can_grow(wait_s: float = 15.0) -> bool:
    """True when an autoscaler with node types of its own manages this cluster.

    Ray's monitor publishes its report in the GCS key-value store. A cluster without an autoscaling config
    reports its nodes "legacy"-style (each node its own type); an autoscaler names its configured node types
    (ray.head.default, gpu-workers, ...), or runs as autoscaler v2. The first report can take a few seconds.
    """
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if (_internal_kv_get(b"__autoscaler_v2_enabled") or b"") in (b"1", b"true", b"True"):
                return True
            raw = _internal_kv_get(b"__autoscaling_status")
            report = (json.loads(raw) if raw else {}).get("autoscaler_report")
        except Exception:  # noqa: BLE001 - an unreadable report: assume it may grow, the startup timeout bounds it
            return True
        if report is not None:
            types = set((report.get("node_type_mapping") or {}).values()) | set(report.get("active_nodes") or {})
            available = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
            pending = report.get("pending_nodes") or report.get("pending_launches")
            return bool(available or pending or any(not str(t).startswith("node_") for t in types))
        if time.monotonic() > deadline:
            return True
        time.sleep(0.5)
