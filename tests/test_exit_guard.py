"""tests/exit_guard.py ends a Ray-loading test process with os._exit: the status must still be pytest's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

TEST = """
import atexit
import os
{ray}

def _mark():
    with open(os.environ["MARK"], "w") as f:
        f.write("the interpreter's exit ran")

atexit.register(_mark)

def test_outcome():
    print("the test's own output")
    if os.environ["OUTCOME"] == "interrupt":
        raise KeyboardInterrupt
    assert os.environ["OUTCOME"] == "pass"
"""


def _run(tmp_path: Path, outcome: str, with_ray: bool) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp_path / "test_child.py").write_text(TEST.format(ray="import ray  # noqa: F401" if with_ray else ""))
    mark = tmp_path / "mark"
    env = {**os.environ, "PYTHONPATH": str(HERE), "MARK": str(mark), "OUTCOME": outcome}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "exit_guard", "-p", "no:cacheprovider",
                           str(tmp_path)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, mark


@pytest.mark.parametrize(("outcome", "status", "summary"), [("pass", 0, "1 passed"), ("fail", 1, "1 failed")])
def test_a_ray_loading_test_process_exits_with_pytests_status_and_its_whole_summary(tmp_path, outcome, status,
                                                                                   summary):
    proc, mark = _run(tmp_path, outcome, with_ray=True)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert summary in proc.stdout and "the test's own output" in proc.stdout
    assert not mark.exists()  # ended by the guard, before the interpreter's teardown


def test_a_process_without_ray_exits_through_the_interpreter_as_usual(tmp_path):
    proc, mark = _run(tmp_path, "fail", with_ray=False)
    assert proc.returncode == 1 and "1 failed" in proc.stdout
    assert mark.read_text() == "the interpreter's exit ran"


def test_an_interrupted_run_still_prints_its_traceback_and_exits_through_the_interpreter(tmp_path):
    proc, mark = _run(tmp_path, "interrupt", with_ray=True)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED
    assert "KeyboardInterrupt" in proc.stdout + proc.stderr  # the terminal reporter prints it at unconfigure
    assert mark.exists()
