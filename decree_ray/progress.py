"""Driver-side progress: a live rich bar (done / failed / remaining, ETA) while the actors work.

The job talks to a `Reporter`; `RichReporter` draws the bar, `NullReporter` is silent (tests, --quiet).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Counts:
    discovered: int = 0  # encoders read from the source so far
    listing_done: bool = False
    done: int = 0  # rows written (ok + error + skipped)
    failed: int = 0  # error rows
    running: int = 0
    workers: int = 0  # actors asked for
    workers_ready: int = 0  # of those, started (the rest wait for the cluster, e.g. an autoscaler adding nodes)


class Reporter:
    def start(self) -> None: ...

    def update(self, counts: Counts) -> None: ...

    def stop(self) -> None: ...


class NullReporter(Reporter):
    pass


class RichReporter(Reporter):
    def __init__(self, description: str = "scanning"):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.fields[total_text]}"),
            TextColumn(
                "[green]ok {task.fields[ok]}[/] [red]failed {task.fields[failed]}[/] "
                "remaining {task.fields[remaining]} running {task.fields[running]}"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._description = description
        self._task = self._progress.add_task(
            description, total=None, ok=0, failed=0, remaining="?", running=0, total_text="?"
        )

    def start(self) -> None:
        self._progress.start()

    def update(self, counts: Counts) -> None:
        if counts.workers and counts.workers_ready < counts.workers:
            # before the first actor starts this is all there is to see; later, the pool is still growing
            waiting = "autoscaler adding nodes" if counts.workers_ready == 0 else "more joining"
            description = f"waiting for workers: {counts.workers_ready}/{counts.workers} ready, {waiting}"
        else:
            description = self._description
        total = counts.discovered if counts.listing_done else None
        remaining = counts.discovered - counts.done
        self._progress.update(
            self._task,
            description=description,
            completed=counts.done,
            total=total,
            ok=counts.done - counts.failed,
            failed=counts.failed,
            running=counts.running,
            remaining=f"{remaining}" if counts.listing_done else f"{remaining}+",
            total_text=str(total) if total is not None else f"{counts.discovered}+ (listing)",
        )

    def stop(self) -> None:
        self._progress.stop()
