"""`decree` CLI entry point with part files flushed after every row (for the driver-kill test).

The CLI has no --flush-every option, and its default (every 16 rows or 30 s) would leave nothing on disk to
resume from in a test-sized scan. Everything else is the real `decree scan`. Run: python driver.py scan ...
"""

from __future__ import annotations

import dataclasses
import sys

from decree_ray.cli import commands as cli  # the module whose globals the commands read

FAST = (("restarts", 1), ("batch_size", 8), ("eval_images", 8))
_real_config = cli.config_from_options


def _config(params, skip=()):
    config = _real_config(params, skip)
    return dataclasses.replace(config, flush_every=1, flush_seconds=0.5, overrides=config.overrides or FAST)


cli.config_from_options = _config

if __name__ == "__main__":
    sys.argv[0] = "decree"
    cli.app()
