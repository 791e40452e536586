"""Driver-side hooks into the Ray job for fault tests: kill an encoder's actor mid-scan, track the actors."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

from decree_ray import job as job_mod
from decree_ray import slots as slots_mod


class Killer:
    """Wraps _Job._submit: when a planned encoder starts scanning, its actor is killed shortly after.

    Calls queue on an actor (prefetch), so "starts" means: its scan call is at the head of the slot's queue,
    i.e. the call before it came back; the kill then lands while that scan runs, not one queued behind.

    plan: encoder id -> (how, times); how is "ray.kill" or "sigkill" (SIGKILL of the actor's pid, as the
    kernel's OOM killer does).
    """

    def __init__(self, ray, plan: dict[str, tuple[str, int]], delay: float = 0.1):
        self.ray, self.delay = ray, delay
        self.plan = {k: list(v) for k, v in plan.items()}
        self.pids: dict[str, int] = {}
        self.kills: collections.Counter = collections.Counter()
        self._real = job_mod._Job._submit

    def __call__(self, job, slot, work, phase, ref):
        self._real(job, slot, work, phase, ref)
        entry = self.plan.get(work.task.id)
        if entry is None or entry[1] <= 0:
            return
        if phase == "fetch" and entry[0] == "sigkill":  # the pid, asked while the actor is still reachable
            try:
                self.pids[work.task.id] = self.ray.get(slot.actor.__ray_call__.remote(lambda actor: os.getpid()))
            except self.ray.exceptions.RayActorError:
                pass  # killed for an encoder queued ahead: this one is requeued and asked again on its next actor
        elif phase == "scan":
            threading.Thread(target=self._kill_when_running, args=(slot, ref, work.task.id, entry), daemon=True).start()

    def _kill_when_running(self, slot, ref, eid, entry, wait=60.0):
        """Counts a planned kill only when it happens: a scan requeued from a dead actor is planned again."""
        actor, deadline = slot.actor, time.monotonic() + wait
        while time.monotonic() < deadline:
            calls = list(slot.calls)
            if slot.actor is not actor or not any(c.ref is ref for c in calls):
                return  # the actor died of something else first, or the scan already came back
            if calls[0].ref is ref:
                time.sleep(self.delay)
                if eid in self.pids or entry[0] != "sigkill":
                    entry[1] -= 1
                    self._kill(eid, entry[0], actor)
                return
            time.sleep(0.005)

    def _kill(self, eid, how, actor):
        self.kills[how] += 1
        if how == "sigkill":
            os.kill(self.pids.pop(eid), signal.SIGKILL)  # a pid is used once: never a stale one
        else:
            self.ray.kill(actor, no_restart=True)


def track_actors(monkeypatch) -> list:
    """Every actor the job creates (so a test can end the ones a failed job leaves behind)."""
    actors, real = [], slots_mod.Actors._start

    def start(pool):
        slot = real(pool)
        actors.append(slot.actor)
        return slot

    monkeypatch.setattr(slots_mod.Actors, "_start", start)
    return actors


def kill_all(ray, actors) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
    actors.clear()
