"""Regenerate bench/RELIABILITY.md: run the fault and abuse suite, which records each outcome as it passes.

    .venv/bin/python tests/reliability_report.py           # run the five modules, then print the report
    .venv/bin/python tests/reliability_report.py --render  # only re-render from bench/reliability/*.json

`make reliability` runs the first form. A plain `pytest` run does not write the report (DECREE_WRITE_RELIABILITY).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ["test_hostile_checkpoints.py", "test_load_containment.py", "test_abuse_inputs.py", "test_faults.py",
           "test_secrets.py"]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    from faults.recorder import REPORT, render

    code = 0
    if "--render" not in argv:
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                *(str(HERE / m) for m in MODULES)], cwd=HERE.parent,
                               env={**os.environ, "DECREE_WRITE_RELIABILITY": "1"})
    print(render())
    print(f"\nwritten: {REPORT}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
