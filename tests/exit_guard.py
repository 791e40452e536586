"""End a test process that loaded Ray with pytest's own exit status, once pytest has said everything.

Ray keeps native threads and gRPC clients alive after ray.shutdown(): its GCS client's io thread, the
`client.poll` threads of every ray.cluster_utils.Cluster and GcsClient the Ray tests made (six of them at the end
of this suite, counted in /proc/self/task), gRPC's executor and timer threads. Python then tears its modules
down under them, and that can segfault (grpc/grpc#11804, ray-project/ray#31145, #47864). CI saw it once: "458
passed" and then `make: *** [test] Segmentation fault`, exit 2, so nothing landed although every test passed.

Nothing is left to do in this process at that point: the summary is printed, tmp_path folders are cleaned, the
moto server and every Ray are stopped. So the first pytest_unconfigure ends the process with os._exit and the
exit status pytest computed (1 when a test failed, which tests/test_exit_guard.py checks), before the other
plugins' unconfigure too: the unraisable-exception plugin's gc.collect() there would free Ray's clients under
the same threads. An interrupted run (Ctrl-C) exits as usual, so that its traceback, printed at unconfigure,
still shows. A crash anywhere earlier still shows where: `make test` runs Python with -X faulthandler.
"""

from __future__ import annotations

import os
import sys

import pytest

_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _status
    _status = int(exitstatus)


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _status in (None, pytest.ExitCode.INTERRUPTED) or "ray._raylet" not in sys.modules:
        return  # no session ran (usage error), Ctrl-C, or no Ray: the interpreter's own exit
    import ray

    if ray.is_initialized():  # a test that left its Ray up: stop its processes, as Ray's atexit hook would have
        ray.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(_status)
