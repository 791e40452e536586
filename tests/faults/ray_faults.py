"""Driver-side hooks into the Ray job for fault tests: kill an encoder's actor mid-scan, track the actors."""

from __future__ import annotations

import collections
import os
import signal
import threading

from decree_ray import job as job_mod


class Killer:
    """Wraps _Job._start: when a planned encoder starts scanning, its actor is killed shortly after.

    plan: encoder id -> (how, times); how is "ray.kill" or "sigkill" (SIGKILL of the actor's pid, as the
    kernel's OOM killer does).
    """

    def __init__(self, ray, plan: dict[str, tuple[str, int]], delay: float = 0.1):
        self.ray, self.delay = ray, delay
        self.plan = {k: list(v) for k, v in plan.items()}
        self.pids: dict[str, int] = {}
        self.kills: collections.Counter = collections.Counter()
        self._real = job_mod._Job._start

    def __call__(self, job, slot, work, phase, ref):
        self._real(job, slot, work, phase, ref)
        entry = self.plan.get(work.task.id)
        if entry is None or entry[1] <= 0:
            return
        if phase == "fetch" and entry[0] == "sigkill":  # the pid, asked while the actor is still reachable
            self.pids[work.task.id] = self.ray.get(slot.actor.__ray_call__.remote(lambda actor: os.getpid()))
        elif phase == "scan":
            entry[1] -= 1
            threading.Timer(self.delay, self._kill, (work.task.id, entry[0], slot.actor)).start()

    def _kill(self, eid, how, actor):
        self.kills[how] += 1
        if how == "sigkill":
            os.kill(self.pids[eid], signal.SIGKILL)
        else:
            self.ray.kill(actor, no_restart=True)


def track_actors(monkeypatch) -> list:
    """Every actor the job creates (so a test can end the ones a failed job leaves behind)."""
    actors, real = [], job_mod._Job._new_slot

    def new_slot(job):
        slot = real(job)
        actors.append(slot.actor)
        return slot

    monkeypatch.setattr(job_mod._Job, "_new_slot", new_slot)
    return actors


def kill_all(ray, actors) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
    actors.clear()
