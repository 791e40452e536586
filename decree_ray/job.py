"""The Ray job: stream encoders from a source to a pool of scan actors, one encoder per call, into Parquet.

Each actor is built once (device, shadow set, inversion config) and gets encoders through a `ray.wait` dispatch
loop. Actors start only for encoders the driver cannot settle alone (an unchanged entry of a finished scan is
settled from the earlier table), so a re-run with nothing to do asks the cluster for nothing. Per encoder the
actor first downloads and hashes (`fetch`), and the driver decides by content (`results.content_key`: sha256,
arch, profile, image_size, mean, std, format) whether to scan, to reuse an earlier result (resume; identical
checkpoints under other keys) or to wait for an identical one in flight.
An actor holds its current encoder plus at most `prefetch` more: their calls queue on the actor (Ray runs one
caller's calls in order), so the next download starts as the last scan ends instead of a driver round trip
later, and a slow encoder holds back at most `prefetch` others. Every encoder ends as exactly one row: a
timeout (counted from when the actor starts the call) kills and replaces the actor; an actor that dies is
replaced and the encoder it was running retried up to `max_retries` times, then recorded as an error; the
encoders queued behind it go back to the queue unpenalized. Starting, replacing and stopping actors: decree_ray.slots.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import bases as bases_mod
from . import results as results_mod
from . import storage
from .config import CONSENSUS_MEMBERS, JobConfig, JobError, JobSummary, precheck
from .progress import Counts, NullReporter, Reporter
from .schema import SCAN_COLUMNS, new_row
from .sources import EncoderTask, SourceStats, is_manifest, is_shard_index, iter_tasks
from .pool import offer
from .resume import ResumeState
from .slots import Actors, Call, Slot, scan_settings
from .worker import error_row, write_evidence


def init_local_ray(num_cpus: int) -> None:
    """Start an embedded Ray of this process's own. "local": even where `ray start` left its address in /tmp/ray (a
    head node, a dev box), where a bare ray.init() would join that cluster (and refuse num_cpus there)."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def run_job(config: JobConfig, reporter: Reporter | None = None) -> JobSummary:
    """Connect to Ray (embedded local when no address), run the scan, shut Ray down if we started it."""
    import ray

    precheck(config)
    # Workers may run in another directory (runtime_env working_dir): hand them absolute local paths.
    paths = {k: getattr(config, k) for k in ("source", "shadow", "out")}
    config = dataclasses.replace(config, **{k: os.path.abspath(v) for k, v in paths.items() if not storage.is_s3(v)})
    started = embedded = False
    if not ray.is_initialized():
        if config.address:
            ray.init(address=config.address, log_to_driver=False)
        elif os.environ.get("RAY_ADDRESS"):  # inside `decree submit`: the job's own cluster
            ray.init(log_to_driver=False)
        else:
            init_local_ray(config.local_cpus)
            embedded = True
        started = True
    try:
        return _Job(config, reporter or NullReporter(), embedded=embedded).run()
    finally:
        if started:
            ray.shutdown()


@dataclass
class _Work:
    task: EncoderTask
    attempt: int = 0
    key: str | None = None  # results.content_key, once fetched and sent to scan
    sha: str | None = None
    size: int | None = None


@dataclass
class _State:
    pending: collections.deque = field(default_factory=collections.deque)  # retries go first
    in_flight: set = field(default_factory=set)  # content keys being scanned now
    waiting: dict = field(default_factory=lambda: collections.defaultdict(list))  # key -> [(task, size)]
    seen: set = field(default_factory=set)


class _Job:
    def __init__(self, config: JobConfig, reporter: Reporter, embedded: bool = False,
                 worker_cls: type | None = None):
        self.cfg = config
        self.embedded = embedded
        self.worker_cls = worker_cls  # None: decree_ray.worker.ScanWorker
        self.reporter = reporter
        self.summary = JobSummary(results=results_mod.results_path(config.out))
        self.counts = Counts()
        self.stats = SourceStats()
        self.state = _State()
        self.writer = results_mod.PartWriter(
            config.out, every=config.flush_every, seconds=config.flush_seconds, options=config.s3
        )
        self._finished = results_mod.load_rows(config.out, config.s3)  # indexed by _open_resume, then released
        self.actors: Actors | None = None  # planned when the job runs: a request no cluster can meet fails first
        self.auto_bases: tuple[str, ...] = ()  # architectures whose consensus was picked by default

    def _open_resume(self) -> None:
        """Index the earlier rows under this run's settings keys (known once the consensus members are picked); the
        shadow set enters them by the SHA-256 of its file's bytes."""
        self.shadow_sha256 = results_mod.shadow_digest(self.cfg.shadow, self.cfg.s3)
        self.resume = ResumeState(self._finished, results_mod.SettingsKeys(self.cfg, self.shadow_sha256),
                                  self.cfg.profile, self.cfg.s3)
        self.summary.other_settings = self.resume.other_settings  # rescanned, never reused
        self._finished = None

    def _pick_consensus(self) -> None:
        """--base ARCH=consensus, and by default every architecture without a base: the consensus members from the
        listing's first encoders (decree_ray.bases)."""
        archs = bases_mod.wanted(self.cfg.bases)
        if not archs and not self.cfg.consensus:
            return
        named = {arch for arch, _ in self.cfg.bases} if self.cfg.consensus else None
        tasks, picked, auto = bases_mod.pick_members(self._tasks, archs, auto_except=named)
        self.counts.listing_done = False  # the read-ahead may have reached the listing's end: not dispatched yet
        self._tasks = self._then_done(tasks)
        if short := {a: len(picked[a]) for a in archs if len(picked[a]) < CONSENSUS_MEMBERS[0]}:
            found = ", ".join(f"{a}: {n}" for a, n in short.items())
            raise JobError(f"--base ARCH=consensus needs at least {CONSENSUS_MEMBERS[0]} encoders of ARCH named by the "
                           f"listing (a manifest or --arch) among its first {bases_mod.WINDOW}; found {found}")
        self.cfg = dataclasses.replace(self.cfg, bases=bases_mod.resolve(self.cfg.bases, picked),
                                       listed_bases=tuple(u for uris in picked.values() for u in uris))
        self.auto_bases = tuple(auto)
        self.summary.consensus = picked

    def _then_done(self, tasks: Iterator[EncoderTask]) -> Iterator[EncoderTask]:
        yield from tasks
        self.counts.listing_done = True

    # -- actors -------------------------------------------------------------------------------------
    @property
    def slots(self) -> list[Slot]:
        return self.actors.slots

    def _replace_busy(self, slot: Slot) -> Call | None:
        """Replace a failed actor. Returns the call it was running (the culprit); the encoders queued behind
        it go back to the front of the queue, unpenalized. Content keys of all of them leave `in_flight`:
        their waiters stay parked for the next owner of that content."""
        lost = self.actors.replace(slot)
        for call in lost:
            if call.work.key is not None:
                self.state.in_flight.discard(call.work.key)
        for call in reversed(lost[1:]):
            self.state.pending.appendleft(_Work(call.work.task, attempt=call.work.attempt))
        return lost[0] if lost else None

    # -- source -------------------------------------------------------------------------------------
    def _source(self) -> Iterator[EncoderTask]:
        tasks = iter_tasks(self.cfg.source, arch=self.cfg.arch, options=self.cfg.s3, stats=self.stats)
        if self.cfg.max_encoders:
            tasks = itertools.islice(tasks, self.cfg.max_encoders)
        dedupe = is_manifest(self.cfg.source)  # a listing names each uri once: no set of every uri to keep
        for task in tasks:
            if dedupe:
                if task.uri in self.state.seen:  # the same uri twice in a manifest is one encoder
                    continue
                self.state.seen.add(task.uri)
            self.counts.discovered += 1
            yield task
        self.counts.listing_done = True

    def _next(self) -> _Work | None:
        return self.state.pending.popleft() if self.state.pending else self._pull()

    def _pull(self) -> _Work | None:
        """The listing's next encoder that needs a worker; the ones it can settle alone become rows here."""
        while True:
            task = next(self._tasks, None)
            if task is None:
                return None
            if task.status != "pending":  # the source already knows: a row without a worker
                self._emit(
                    new_row(
                        id=task.id, uri=task.uri, status=task.status, arch=task.arch, label=task.label, error=task.error,
                        arch_source=task.arch_source,
                    )
                )
                continue
            if task.identity is None and task.uri in self.resume.by_uri and not is_shard_index(task.uri):
                # a manifest entry with a finished row: a stat or a HEAD decides whether it needs a download
                # (entries without one get their identity from the worker, off the driver's loop)
                try:
                    task = dataclasses.replace(task, identity=storage.identity_of(task.uri, self.cfg.s3))
                except Exception:  # noqa: BLE001 - gone or unreadable: the fetch says why, in the row
                    pass
            if (row := self.resume.unchanged_row(task)) is not None:
                self.summary.reused_unchanged += 1
                self._emit(row)
                continue
            return _Work(task)

    # -- rows ---------------------------------------------------------------------------------------
    def _emit(self, row: dict[str, Any]) -> None:
        self.writer.add(row)
        s = self.summary
        s.total += 1
        s.ok += row["status"] == "ok"
        s.errors += row["status"] == "error"
        s.skipped += row["status"] == "skipped"
        s.trojaned += row["verdict"] == "trojaned"
        self.counts.done += 1
        self.counts.failed += row["status"] == "error"
        self.reporter.update(self.counts)

    def _copy(self, src: dict[str, Any], task: EncoderTask, size: int | None, sha: str | None) -> dict[str, Any]:
        """The row of an identical checkpoint, reported for this uri."""
        values = {c: src.get(c) for c in SCAN_COLUMNS if c not in ("arch", "status", "error")}
        values.update(sha256=sha or values.get("sha256"), size_bytes=size or values.get("size_bytes"), seconds=0.0,
                      arch_source=task.arch_source)
        self.summary.reused += 1
        return new_row(
            id=task.id,
            uri=task.uri,
            status=src["status"],
            arch=task.arch,
            label=task.label,
            error=src.get("error"),
            **values,
        )

    def _release(self, key: str, row: dict[str, Any]) -> None:
        for task, size in self.state.waiting.pop(key, []):
            copy = self._copy(row, task, size, None)  # same key: same sha256 as `row`
            ok = copy["status"] == "ok" and task.identity
            self._emit({**copy, "source_identity": task.identity} if ok else copy)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> JobSummary:
        import ray

        t0 = time.monotonic()
        self.actors = Actors(self.cfg, embedded=self.embedded, worker_cls=self.worker_cls)
        self._tasks = self._source()
        self._pick_consensus()
        self._open_resume()  # after the pick: the members are part of the settings
        self.actors.settings = scan_settings(self.cfg, auto_bases=self.auto_bases, shadow_sha256=self.shadow_sha256)
        self.reporter.start()
        flushed = False
        try:
            self._loop(ray)
        finally:
            self.reporter.stop()
            try:
                self.writer.flush()
                flushed = True
            finally:  # a failing output store must not leave the actors holding their CPUs/GPUs
                self.actors.stop()
                if flushed:
                    results_mod.compact(self.cfg.out, self.cfg.s3, finalize=self._fleet)
        self.summary.workers = len(self.slots)
        self.summary.skipped_keys = self.stats.skipped_keys
        self.summary.skipped_examples = list(self.stats.skipped_examples)
        self.summary.seconds = time.monotonic() - t0
        return self.summary

    def _fleet(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fleet verdicts over the whole table (this run and earlier ones): outliers among comparable encoders."""
        from decree.fleet import FleetConfig, assign, below_threshold
        from decree.transfer import collapsing_bases

        fleet = FleetConfig(cutoff=self.cfg.fleet_cutoff, cluster_fraction=self.cfg.fleet_cluster)
        rows = assign(rows, self.cfg.references, fleet)
        flagged = [r for r in rows if r.get("verdict") == "trojaned"]
        self.summary.flagged = len(flagged)
        self.summary.fleet_outliers = sum(1 for r in flagged if not below_threshold(r))
        self.summary.threshold_overruled = sum(r.get("verdict") == "clean" and below_threshold(r) for r in rows)
        self.summary.collapsing_bases = collapsing_bases(rows)
        return rows

    def _grow(self) -> None:
        """Start an actor only for work no started actor will take: a rerun whose every entry is unchanged starts
        none (and asks a cluster for no GPU node), a listing of n encoders at most n."""
        starting = self.actors.starting
        while not self.actors.full:
            if len(self.state.pending) > starting:
                self.actors.add()
                starting += 1
            elif (work := self._pull()) is not None:
                self.actors.note_arch(work.task.arch)  # the actor it starts imports that family's library
                self.state.pending.append(work)
            else:
                return

    def _loop(self, ray) -> None:
        idle_since = time.monotonic()
        depth = 1 + self.cfg.prefetch
        while True:
            for slot in self.slots:
                while slot.ready and len(slot.calls) < depth:
                    work = self._next()
                    if work is None:
                        break
                    self._submit(slot, work, "fetch", slot.actor.fetch.remote(work.task))
            self._grow()
            busy = [s for s in self.slots if s.calls]
            self.counts.running = len(busy)  # actors at work (each may hold a prefetched encoder too)
            self.counts.workers_ready = sum(s.ready for s in self.slots)
            self.counts.workers = len(self.slots)
            self.reporter.update(self.counts)
            if not busy and not self.state.pending and self.counts.listing_done:
                if not self.state.waiting:
                    return
                for waiters in self.state.waiting.values():  # their owner vanished: scan them themselves
                    self.state.pending.extend(_Work(task) for task, _ in waiters)
                self.state.waiting.clear()
                continue
            if busy or not self.slots or any(s.ready for s in self.slots):  # runs while every actor is starting
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.cfg.startup_timeout:
                raise JobError(
                    f"no scan worker could start within {self.cfg.startup_timeout:g}s (--startup-timeout): asked for "
                    f"{self.actors.shape.asked}, the cluster offers {offer(ray.cluster_resources())}")
            by_ref = {c.ref: (s, c) for s in busy for c in s.calls}
            by_ref.update({s.ready_ref: (s, None) for s in self.slots if not s.ready})
            if by_ref:
                done, _ = ray.wait(list(by_ref), num_returns=1, timeout=0.5)
            else:  # nothing in flight: the next pass dispatches or returns; never spin on an empty wait
                done = []
                time.sleep(0.05)
            for ref in done:
                slot, call = by_ref[ref]
                if call is None:
                    self.actors.on_ready(slot, ref)
                elif call in slot.calls:  # not already dropped with an actor that died or timed out
                    self._handle(ray, slot, call)
            self._check_timeouts()
            self.writer.flush_if_due()

    def _submit(self, slot: Slot, work: _Work, phase: str, ref) -> None:
        if not slot.calls:
            slot.head_since = time.monotonic()
        slot.calls.append(Call(ref, work, phase))

    def _handle(self, ray, slot: Slot, call: Call) -> None:
        from ray.exceptions import RayActorError

        work = call.work
        try:
            result = ray.get(call.ref)
        except RayActorError as e:
            self._actor_died(slot, e)
            return
        except Exception as e:  # noqa: BLE001 - a bug in one call is this encoder's error row
            self._pop(slot, call)
            cause = getattr(e, "cause", None) or e
            self._fail(work, f"worker error: {type(cause).__name__}: {cause}")
            return
        self._pop(slot, call)
        if call.phase == "fetch":
            self._after_fetch(slot, work, result)
        else:
            self.summary.scanned += 1
            self._finish(work, write_evidence(result, self.cfg.out))

    def _pop(self, slot: Slot, call: Call) -> None:
        """A call came back: the actor runs calls in order, so the next one started about now."""
        slot.calls.remove(call)
        slot.head_since = time.monotonic()

    def _after_fetch(self, slot: Slot, work: _Work, result: dict[str, Any]) -> None:
        if "row" in result:
            self._emit(result["row"])
            return
        task = work.task = result["task"]
        work.size, work.sha = result["size_bytes"], result["sha256"]
        key = self.resume.key(work.sha, task)
        done = self.resume.done_row(key, task, work.sha)
        if done is not None:
            slot.actor.drop.remote(task.uri)
            self._emit({**self._copy(done, task, work.size, work.sha), "content_key": key,
                        "source_identity": task.identity if done["status"] == "ok" else None})
        elif key in self.state.in_flight:
            slot.actor.drop.remote(task.uri)
            self.state.waiting[key].append((task, work.size))
        else:
            self.state.in_flight.add(key)
            work.key = key
            self._submit(slot, work, "scan", slot.actor.scan.remote(task.uri))

    def _finish(self, work: _Work, row: dict[str, Any]) -> None:
        if work.key is not None:
            row = {**row, "content_key": work.key}  # what a later run matches to resume
        if work.task.identity and row.get("status") == "ok":
            row = {**row, "source_identity": work.task.identity}  # what a later run matches without downloading
        self._emit(row)
        if work.key is not None:
            self.state.in_flight.discard(work.key)
            self.resume.record(work.key, row)
            self._release(work.key, row)

    def _fail(self, work: _Work, message: str) -> None:
        self._finish(work, error_row(work.task, message, sha256=work.sha, size_bytes=work.size))

    def _actor_died(self, slot: Slot, exc: Exception) -> None:
        """The call the actor was running is the culprit; the ones queued behind it are requeued."""
        head = self._replace_busy(slot)
        if head is None:
            return
        work = head.work
        if work.attempt < self.cfg.max_retries:
            self.summary.retried += 1
            self.state.pending.appendleft(_Work(work.task, attempt=work.attempt + 1))
            return
        message = f"worker died {work.attempt + 1} times scanning this encoder: {str(exc).splitlines()[0][:300]}"
        self._emit(error_row(work.task, message, size_bytes=work.size))
        if work.key is not None:
            self.state.pending.extend(_Work(task) for task, _ in self.state.waiting.pop(work.key, []))

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if not slot.calls or now - slot.head_since <= self.cfg.timeout:
                continue
            head = self._replace_busy(slot)
            self._fail(head.work, f"timed out after {self.cfg.timeout:g}s ({head.phase})")
