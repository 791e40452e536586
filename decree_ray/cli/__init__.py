"""The `decree` command line: `commands.py` (scan, submit, status, report and the app), `options.py` (every option,
defined once), `bench.py`, `zoo.py` and `plan.py` (the benchmark, zoo and sizing commands). Each command builds
one validated config and makes one call into the scale layer or the core."""

from .commands import *  # noqa: F401,F403 - `decree_ray.cli` is the app's public module
from .commands import _fail, _mount_subcommands, app, main, scan_args  # noqa: F401
