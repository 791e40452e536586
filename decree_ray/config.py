"""The job's settings and outcome: one validated, frozen config per scan (the CLI builds it, tests compare it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import storage
from .storage import S3Options


# decree.fleet.DEFAULT_CUTOFF, spelled out so the CLI starts without importing torch (a test keeps them equal)
DEFAULT_CUTOFF = 3.0
DEFAULT_CLUSTER = 1 / 3  # decree.fleet.CLUSTER_FRACTION, likewise
LOAD_TIMEOUT = 120.0  # decree.encoders.contained.LOAD_TIMEOUT, likewise
DEFAULT_MAX_CHECKPOINT_BYTES = 16 << 30


class JobError(Exception):
    """The job as a whole cannot run (bad source, shadow set unreadable by every worker, no workers)."""


@dataclass(frozen=True)
class JobConfig:
    source: str
    shadow: str
    out: str
    address: str | None = None
    profile: str = "fast"
    threshold: float | None = None
    gpus_per_encoder: float | None = None  # None: 1 if the cluster has GPUs, else CPU actors
    cpus_per_encoder: float = 1.0
    max_encoders: int | None = None
    endpoint_url: str | None = None
    arch: str | None = None
    steps: int | None = None
    timeout: float = 1800.0
    # how long the scan waits with no actor ready (an autoscaler booting GPU nodes) before it gives up
    startup_timeout: float = 1200.0
    max_retries: int = 2
    prefetch: int = 1  # encoders queued on an actor behind the one it runs (hides the driver round trip)
    num_workers: int | None = None  # None: as many as the cluster's resources allow
    local_cpus: int = 2  # embedded Ray only
    flush_every: int = 16
    flush_seconds: float = 30.0
    evidence: bool = True
    shadow_limit: int | None = None
    # bigger checkpoints are error rows, never downloaded (None: no limit); the largest image towers are ~4 GB
    max_checkpoint_bytes: int | None = DEFAULT_MAX_CHECKPOINT_BYTES
    load_timeout: float = LOAD_TIMEOUT  # reading one checkpoint (in a child process) past this is its error row
    # the auditor's input size (None: each architecture's own); a manifest line's image_size overrides it
    image_size: int | None = None
    # believe a sidecar's / hub config's preprocessing alone (default: also scan at the auditor's, keep the worse)
    trust_sidecar_preprocessing: bool = False
    retry_mode: str = "adaptive"
    max_attempts: int = 8
    overrides: tuple[tuple[str, Any], ...] = ()
    references: tuple[str, ...] = ()  # ids or uris of known-clean encoders that anchor the fleet statistics
    # (arch, source) of the base model each architecture's encoders were fine-tuned from: "pretrained" (the
    # architecture's offline weights) or a checkpoint path / s3:// uri (decree.transfer: specific_pl1)
    bases: tuple[tuple[str, str], ...] = ()
    # every architecture the listing names at least 3 times and no --base covers gets a consensus base of its own
    # encoders (decree_ray.bases); off: only what --base names
    consensus: bool = True
    # uris the job picked from its own listing as consensus members: not checked as files (a manifest's missing
    # one is that member's load error, never the whole job's)
    listed_bases: tuple[str, ...] = ()
    fleet_cutoff: float = DEFAULT_CUTOFF  # anomaly index above which an encoder is an outlier among its peers
    fleet_cluster: float = DEFAULT_CLUSTER  # least share of a group that can anchor it as its clean cluster (0: off)

    def __post_init__(self):
        if self.timeout <= 0 or self.startup_timeout <= 0 or not 0 < self.load_timeout < float("inf"):
            raise ValueError("timeout, startup_timeout and load_timeout must be > 0 seconds")
        if self.prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.cpus_per_encoder <= 0 or (self.gpus_per_encoder or 0) < 0:
            raise ValueError("cpus_per_encoder must be > 0 and gpus_per_encoder >= 0")
        if self.max_encoders is not None and self.max_encoders < 1:
            raise ValueError("max_encoders must be >= 1")
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise ValueError("image_size must be within 8..1024")
        if self.max_checkpoint_bytes is not None and self.max_checkpoint_bytes < 1:
            raise ValueError("max_checkpoint_bytes must be >= 1")
        if not self.fleet_cutoff > 0 or self.fleet_cutoff == float("inf"):
            raise ValueError("fleet_cutoff must be a finite number > 0")
        if not 0 <= self.fleet_cluster <= 1:
            raise ValueError("fleet_cluster must be within 0..1 (0: no clean cluster)")
        check_bases(self.bases, listed=frozenset(self.listed_bases))

    @property
    def s3(self) -> S3Options:
        return S3Options(self.endpoint_url, self.retry_mode, self.max_attempts)


# decree.consensus.MIN_MEMBERS / MAX_MEMBERS, repeated so the CLI checks them before importing torch (a test ties them)
CONSENSUS_MEMBERS = (3, 15)


def check_bases(bases, listed: frozenset[str] = frozenset()) -> None:
    """--base ARCH=SOURCE: one base per architecture, or 3 to 15 members of a consensus base (decree.consensus);
    a local checkpoint must exist (a typo must not cost a scan)."""
    from collections import Counter
    from pathlib import Path

    seen = set()
    for arch, source in bases:
        if not arch or not source:
            raise ValueError(f"--base needs ARCH=SOURCE (SOURCE: pretrained, a checkpoint path or s3:// uri), got {arch}={source}")
        if (arch, source) in seen:
            raise ValueError(f"--base names {arch}={source} twice")
        seen.add((arch, source))
        if source not in ("pretrained", "consensus", *listed) and not source.startswith("s3://") and not Path(source).is_file():
            raise ValueError(f"--base {arch}={source}: no such checkpoint file")
    low, high = CONSENSUS_MEMBERS
    for arch, n in Counter(a for a, _ in bases).items():
        if n > 1 and (arch, "consensus") in seen:
            raise ValueError(f"--base {arch}=consensus picks its own members: name no other base for {arch}")
        if n > 1 and not low <= n <= high:
            raise ValueError(f"--base names {arch} {n} times: give one base, or {low} to {high} fine-tunes of it "
                             "whose coordinate-wise median stands in for it (a median of two is their mean)")


@dataclass
class JobSummary:
    results: str
    total: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    trojaned: int = 0  # this run's rows flagged by their own thresholds
    flagged: int = 0  # rows of the final table whose verdict is trojaned (thresholds or fleet outliers)
    fleet_outliers: int = 0  # of those, flagged only as outliers among their peers
    threshold_overruled: int = 0  # below a threshold but clean: their anchor's clean peers score as low
    scanned: int = 0  # scan calls actually made
    reused: int = 0  # rows copied from an identical checkpoint (this run or an earlier one), after its download
    reused_unchanged: int = 0  # rows of an earlier run kept for entries the listing says are unchanged: no download
    other_settings: int = 0  # ok rows of earlier runs made with other settings: not reused, scanned again
    retried: int = 0  # encoders re-dispatched after their actor died
    skipped_keys: int = 0  # listed objects that are not checkpoints (each is also a `skipped` row)
    skipped_examples: list = field(default_factory=list)  # the first of their names
    workers: int = 0
    seconds: float = 0.0
    consensus: dict = field(default_factory=dict)  # --base ARCH=consensus: arch -> the member uris picked
    collapsing_bases: list = field(default_factory=list)  # decree.transfer.collapsing_bases of the final table

    @property
    def exit_code(self) -> int:
        """0 nothing found, 1 backdoors found, 2 errors (and nothing found)."""
        if self.trojaned or self.flagged:
            return 1
        return 2 if self.errors else 0


def precheck(config: JobConfig) -> None:
    """Fail before starting Ray when a local input is missing (S3 inputs are checked by the first reads)."""
    for what, uri in (("source", config.source), ("shadow set", config.shadow)):
        if not storage.is_s3(uri) and not Path(uri).exists():
            raise JobError(f"{what} not found: {uri}")
