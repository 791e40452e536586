"""The scan actors of one job: how many and how large, starting one, replacing one that died or timed out, and
stopping them all. What each actor runs is the dispatch loop's business (decree_ray.job)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from .config import JobConfig, JobError
from .pool import ActorShape, autoscaler_can_grow, plan_actors
from .worker import WARM_ARCHS, ScanSettings, ScanWorker


@dataclass
class Call:
    ref: Any
    work: Any  # the job's unit of work (decree_ray.job._Work)
    phase: str  # "fetch" or "scan"


@dataclass
class Slot:
    actor: Any
    ready_ref: Any
    ready: bool = False
    calls: collections.deque = field(default_factory=collections.deque)  # outstanding, in the actor's run order
    head_since: float = 0.0  # when the actor started running calls[0] (as seen by the driver)


def one_per_family(archs: tuple[str, ...], arch: str | None) -> tuple[str, ...]:
    """`archs` plus `arch` if its family is new, at most WARM_ARCHS: the names are the audited party's strings."""
    family = (arch or "").partition("/")[0]
    if not family or len(archs) >= WARM_ARCHS or any(a.partition("/")[0] == family for a in archs):
        return archs
    return (*archs, arch)


def scan_settings(cfg: JobConfig, *, auto_bases: tuple[str, ...], shadow_sha256: str | None) -> ScanSettings:
    """What every actor of the job is built with: one value, so the actors of a job cannot differ."""
    return ScanSettings(
        shadow=cfg.shadow,
        out=cfg.out,
        profile=cfg.profile,
        steps=cfg.steps,
        threshold=cfg.threshold,
        shadow_limit=cfg.shadow_limit,
        max_checkpoint_bytes=cfg.max_checkpoint_bytes,
        load_timeout=cfg.load_timeout,
        image_size=cfg.image_size,
        trust_sidecar_preprocessing=cfg.trust_sidecar_preprocessing,
        evidence=cfg.evidence,
        threads=max(1, int(cfg.cpus_per_encoder)),
        s3=cfg.s3,
        overrides=cfg.overrides,
        bases=cfg.bases,
        auto_bases=auto_bases,
        shadow_sha256=shadow_sha256,
    )


class Actors:
    """The job's actor slots. A slot keeps its place when its actor is replaced, so the loop's view of its
    outstanding calls stays one deque per slot."""

    def __init__(self, cfg: JobConfig, *, embedded: bool, worker_cls: type | None = None):
        self.cfg = cfg
        self.embedded = embedded
        self.worker_cls = worker_cls or ScanWorker  # bench_driver measures the driver with stand-in actors
        self.slots: list[Slot] = []
        self.start_failures = 0  # actors that died before they were ready
        self.settings: ScanSettings | None = None  # set once the listing has picked the consensus members
        self.archs: tuple[str, ...] = ()  # queued, one per family: a starting actor imports their libraries
        self._cls = None
        self.shape = self._plan()

    def _plan(self) -> ActorShape:
        """Fail before reading the listing when no actor could ever start; else how many to ask for."""
        import ray

        res = ray.cluster_resources()
        ask = dict(cpus=self.cfg.cpus_per_encoder, gpus=self.cfg.gpus_per_encoder, workers=self.cfg.num_workers,
                   max_encoders=self.cfg.max_encoders)
        shape = plan_actors(res, **ask, can_grow=True)
        # an embedded Ray (started here) never grows; a cluster's autoscaler adds nodes for pending actors
        if shape.fits_now < 1 and (self.embedded or not autoscaler_can_grow()):
            plan_actors(res, **ask, can_grow=False)  # raises, naming what was asked and what is there
        return shape

    @property
    def full(self) -> bool:
        return len(self.slots) >= self.shape.count

    @property
    def starting(self) -> int:
        return sum(not s.ready for s in self.slots)

    def note_arch(self, arch: str | None) -> None:
        self.archs = one_per_family(self.archs, arch)

    def add(self) -> Slot:
        slot = self._start()
        self.slots.append(slot)
        return slot

    def _start(self) -> Slot:
        import ray

        assert self.settings is not None, "scan settings are set before the first actor starts"
        if self._cls is None:
            self._cls = ray.remote(self.worker_cls)
        actor = self._cls.options(num_cpus=self.shape.cpus, num_gpus=self.shape.gpus, max_restarts=0,
                                  max_task_retries=0).remote(self.settings)
        return Slot(actor=actor, ready_ref=actor.ready.remote(self.archs))

    def replace(self, slot: Slot) -> list[Call]:
        """Kill the slot's actor and start a fresh one; returns the calls the old actor still had."""
        import ray

        ray.kill(slot.actor, no_restart=True)
        lost = list(slot.calls)
        fresh = self._start()
        slot.actor, slot.ready_ref, slot.ready, slot.calls = fresh.actor, fresh.ready_ref, False, collections.deque()
        return lost

    def on_ready(self, slot: Slot, ref) -> None:
        """The actor's `ready` came back: it is ready, or it died starting (replaced, within a budget), or it
        could not build (the job stops: every actor would fail alike)."""
        import ray
        from ray.exceptions import RayActorError

        try:
            ray.get(ref)
            slot.ready = True
        except RayActorError as e:
            self.start_failures += 1
            if self.start_failures > 3 * len(self.slots):
                raise JobError(f"scan workers keep dying before they start: {e}") from e
            self.replace(slot)
        except Exception as e:  # noqa: BLE001 - a worker that cannot build (e.g. bad shadow set) stops the job
            cause = getattr(e, "cause", None) or e
            raise JobError(f"scan worker failed to start: {type(cause).__name__}: {cause}") from e

    def stop(self) -> None:
        import ray

        closing = [s.actor.close.remote() for s in self.slots if s.ready and not s.calls]
        ray.wait(closing, num_returns=len(closing), timeout=10)  # let idle actors clear their caches
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
