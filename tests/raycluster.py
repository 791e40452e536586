"""Real Ray heads for tests, started in their own process session so that only their processes are stopped
(never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def ray_auth_mode(mode: str) -> Iterator[None]:
    """This process's Ray client in another RAY_AUTH_MODE, and back. Ray reads the mode into its RayConfig and caches
    the token once per process, so without the resets a test's cluster depends on which test started Ray first: a
    client still in token mode gets its actors cancelled by a head without tokens, and the next default head's GCS
    refuses a client left in "disabled" (InvalidAuthToken). Ray's own tests reset both the same way."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    def reset() -> None:
        Config.initialize("")  # the config first: a draining client thread must not reload the token in the old mode
        AuthenticationTokenLoader.instance().reset_cache()

    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", mode)
        reset()
        try:
            yield
        finally:
            ray.shutdown()
    reset()


def stop_head(proc: subprocess.Popen, wait: float = 30) -> None:
    """Stop a `ray start --head --block` started in its own session: --block stops what it started on SIGTERM, and
    whatever is left of the session is killed."""
    proc.terminate()
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass
    kill_session(proc.pid)


def kill_session(sid: int) -> None:
    """SIGKILL every process of one session (a `ray start --block` and all it spawned)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getsid(int(proc.name)) == sid:
                    os.kill(int(proc.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _ppid(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and parentheses
    except (OSError, ValueError, IndexError):
        return None


def kill_node_processes(sid: int, needle: str) -> list[str]:
    """A node lost at once, as a spot reclaim: SIGKILL the processes of session `sid` whose command line holds
    `needle` (a fake node's raylet, by its node id) and everything they spawned (its workers, the actors).
    Returns the start of each killed command line."""
    pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]
    children: dict[int, list[int]] = {}
    for pid in pids:
        parent = _ppid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(int(pid))
    roots = []
    for pid in pids:
        try:
            if os.getsid(int(pid)) == sid and needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                roots.append(int(pid))
        except (OSError, ProcessLookupError):
            pass
    doomed, stack = [], list(roots)
    while stack:
        pid = stack.pop()
        doomed.append(pid)
        stack.extend(children.get(pid, []))
    killed = []
    for pid in doomed:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            os.kill(pid, signal.SIGKILL)
            killed.append(cmdline[:120])
        except (OSError, ProcessLookupError):
            pass
    return killed


@dataclass
class Head:
    url: str
    env: dict[str, str]  # what a client on this machine needs: PATH to `decree`, the auth token
    token: str

    def get(self, path: str, *, auth: bool = True) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=10) as r:
            return json.loads(r.read())
