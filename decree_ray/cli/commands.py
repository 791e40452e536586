"""`decree`: scan encoders at scale, submit the scan as a Ray Job, report ROC metrics.

A thin Typer layer: options are defined once (Annotated) and reused; each command builds one validated
config and calls one function (`job.run_job`, `report.analyze`). Exit codes:

    0  nothing found          1  backdoors found (trojaned verdicts)          2  errors (and nothing found)
"""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..config import DEFAULT_CLUSTER, DEFAULT_CUTOFF, LOAD_TIMEOUT

from .options import (  # noqa: F401 - EXIT_* and parse_size are part of this module's interface
    EXIT_CLEAN,
    EXIT_ERROR,
    EXIT_FOUND,
    Arch,
    CpusPer,
    Endpoint,
    Consensus,
    FleetCluster,
    FleetCutoff,
    GpusPer,
    LocalCpus,
    MaxEnc,
    MaxSize,
    Out,
    Prefetch,
    Profile,
    Quiet,
    References,
    Bases,
    Retries,
    Sets,
    Shadow,
    Source,
    Steps,
    Threshold,
    Timeout,
    ImageSize,
    LoadTimeout,
    TrustSidecars,
    StartupTimeout,
    Workers,
    config_from_options,
    _fail,
    err_console,
    parse_sets,
    parse_size,
)

app = typer.Typer(
    name="decree",
    help="Fleet-scale backdoor scanning of pre-trained image encoders (DECREE) on Ray. "
    "Exit codes: 0 nothing found, 1 backdoors found, 2 errors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

@app.command()
def scan(
    source: Source,
    shadow: Shadow,
    out: Out,
    *,
    address: Annotated[
        Optional[str], typer.Option("--address", help="ray://head:10001 or 'auto'. Default: embedded local Ray.")
    ] = None,
    profile: Profile = "fast",
    threshold: Threshold = None,
    gpus_per_encoder: GpusPer = None,
    cpus_per_encoder: CpusPer = 1.0,
    max_encoders: MaxEnc = None,
    endpoint_url: Endpoint = None,
    arch: Arch = None,
    image_size: ImageSize = None,
    trust_sidecar_preprocessing: TrustSidecars = False,
    steps: Steps = None,
    timeout: Timeout = 1800.0,
    startup_timeout: StartupTimeout = 1200.0,
    load_timeout: LoadTimeout = LOAD_TIMEOUT,
    max_retries: Retries = 2,
    prefetch: Prefetch = 1,
    sets: Sets = None,
    workers: Workers = None,
    local_cpus: LocalCpus = 2,
    max_checkpoint_size: MaxSize = None,
    reference: References = None,
    base: Bases = None,
    consensus: Consensus = True,
    fleet_cutoff: FleetCutoff = DEFAULT_CUTOFF,
    fleet_cluster: FleetCluster = DEFAULT_CLUSTER,
    quiet: Quiet = False,
) -> None:
    """Scan every encoder of SOURCE into OUT/results.parquet (resumable: finished encoders are not rescanned)."""
    from .. import job
    from ..progress import NullReporter, RichReporter

    config = config_from_options(locals())
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        summary = job.run_job(config, NullReporter() if quiet else RichReporter())
    except (job.JobError, OSError, ValueError, BotoCoreError, ClientError) as e:
        raise _fail(str(e)) from None
    table = Table(title="decree scan", show_header=False)
    for name in (
        "total",
        "ok",
        "errors",
        "skipped",
        "trojaned",
        "flagged",
        "fleet_outliers",
        "threshold_overruled",
        "scanned",
        "reused",
        "reused_unchanged",
        "other_settings",
        "retried",
        "skipped_keys",
        "workers",
    ):
        table.add_row(name, str(getattr(summary, name)))
    table.add_row("seconds", f"{summary.seconds:.1f}")
    table.add_row("results", summary.results)
    console.print(table)
    for arch, members in summary.consensus.items():  # the audited party's names: printed sanitized
        console.print(_text(f"consensus base of {arch}: {len(members)} members, a median per group of fine-tunes of "
                            f"one model: {', '.join(members)}"))
    _warn_collapsing(summary.collapsing_bases)
    if summary.skipped_examples:  # never a silent gap: name what was listed but is not a checkpoint
        more = summary.skipped_keys - len(summary.skipped_examples)
        names = ", ".join(str(n)[:200] for n in summary.skipped_examples) + (f" and {more} more" if more > 0 else "")
        console.print(_text(f"skipped, not checkpoints (rows with status skipped): {names}"))
    raise typer.Exit(summary.exit_code)


def scan_args(config) -> list[str]:
    """The `decree scan` command line that reproduces `config` (used by `submit`)."""
    args = ["decree", "scan", config.source, "--shadow", config.shadow, "--out", config.out, "--quiet"]
    flags = {
        "--profile": config.profile,
        "--threshold": config.threshold,
        "--gpus-per-encoder": config.gpus_per_encoder,
        "--cpus-per-encoder": config.cpus_per_encoder,
        "--max-encoders": config.max_encoders,
        "--endpoint-url": config.endpoint_url,
        "--arch": config.arch,
        "--image-size": config.image_size,
        "--steps": config.steps,
        "--timeout": config.timeout,
        "--startup-timeout": config.startup_timeout,
        "--load-timeout": config.load_timeout,
        "--max-retries": config.max_retries,
        "--prefetch": config.prefetch,
        "--workers": config.num_workers,
        "--max-checkpoint-size": config.max_checkpoint_bytes if config.max_checkpoint_bytes is not None else "none",
    }
    for flag, value in flags.items():
        if value is not None:
            args += [flag, str(value)]
    if config.trust_sidecar_preprocessing:
        args.append("--trust-sidecar-preprocessing")
    if not config.consensus:
        args.append("--no-consensus")
    if config.fleet_cutoff != DEFAULT_CUTOFF:
        args += ["--fleet-cutoff", str(config.fleet_cutoff)]
    if config.fleet_cluster != DEFAULT_CLUSTER:
        args += ["--fleet-cluster", str(config.fleet_cluster)]
    for ref in config.references:
        args += ["--reference", ref]
    for arch, source in config.bases:
        args += ["--base", f"{arch}={source}"]
    for key, value in config.overrides:
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


@app.command()
def submit(
    source: Source,
    shadow: Shadow,
    out: Out,
    *,
    address: Annotated[str, typer.Option("--address", help="Ray dashboard address, e.g. http://head:8265.")],
    working_dir: Annotated[
        Optional[Path], typer.Option("--working-dir", help="Upload this folder as the job's working_dir.")
    ] = None,
    pip: Annotated[
        Optional[list[str]], typer.Option("--pip", help="pip requirement for the job's runtime_env (repeatable).")
    ] = None,
    env: Annotated[
        Optional[list[str]], typer.Option("--env", help="KEY=VALUE for the job's env_vars (repeatable).")
    ] = None,
    profile: Profile = "fast",
    threshold: Threshold = None,
    gpus_per_encoder: GpusPer = None,
    cpus_per_encoder: CpusPer = 1.0,
    max_encoders: MaxEnc = None,
    endpoint_url: Endpoint = None,
    arch: Arch = None,
    image_size: ImageSize = None,
    trust_sidecar_preprocessing: TrustSidecars = False,
    steps: Steps = None,
    timeout: Timeout = 1800.0,
    startup_timeout: StartupTimeout = 1200.0,
    load_timeout: LoadTimeout = LOAD_TIMEOUT,
    max_retries: Retries = 2,
    prefetch: Prefetch = 1,
    sets: Sets = None,
    workers: Workers = None,
    max_checkpoint_size: MaxSize = None,
    reference: References = None,
    base: Bases = None,
    consensus: Consensus = True,
    fleet_cutoff: FleetCutoff = DEFAULT_CUTOFF,
    fleet_cluster: FleetCluster = DEFAULT_CLUSTER,
) -> None:
    """Run the same scan as a Ray Job on a cluster; prints the job id (follow it with `decree status`)."""
    config = config_from_options(locals(), skip=("working_dir", "pip", "env", "address"))
    runtime_env: dict = {}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        bad = [e for e in env if "=" not in e]
        if bad:
            raise _fail(f"--env needs KEY=VALUE, got {bad}")
        runtime_env["env_vars"] = dict(e.split("=", 1) for e in env)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=shlex.join(scan_args(config)), runtime_env=runtime_env or None)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise _fail(f"cannot submit to {address}: {e}") from None
    console.print(job_id)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="The id `decree submit` printed.")],
    *,
    address: Annotated[str, typer.Option("--address", help="Ray dashboard address, e.g. http://head:8265.")],
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's logs until it ends.")] = False,
) -> None:
    """Show a submitted job's status and logs.

    Exits with the scan's own code once it ended (0 nothing found, 1 backdoors found, 2 errors); 0 while running."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        if follow:

            async def _tail() -> None:
                async for lines in client.tail_job_logs(job_id):
                    console.print(lines, end="", markup=False, highlight=False)

            asyncio.run(_tail())
        else:
            console.print(client.get_job_logs(job_id), end="", markup=False, highlight=False)
        info = client.get_job_info(job_id)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise _fail(f"cannot read job {job_id} from {address}: {e}") from None
    state = info.status
    console.print(f"job {job_id}: {state}")
    if state not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
        raise typer.Exit(EXIT_CLEAN)
    # Ray calls a scan that found backdoors (driver exit 1) FAILED; the driver's code is the truth.
    code = getattr(info, "driver_exit_code", None)
    raise typer.Exit(code if code in (EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR) else EXIT_ERROR)


@app.command()
def report(
    results: Annotated[str, typer.Argument(help="OUT/results.parquet (local or s3://).")],
    *,
    fpr: Annotated[
        float, typer.Option("--fpr", help="Target false-positive rate for the TPR and its threshold.")
    ] = 0.05,
    threshold: Threshold = None,
    plot: Annotated[
        Optional[Path], typer.Option("--plot", help="Where to write roc.png (default: next to the results).")
    ] = None,
    top: Annotated[int, typer.Option("--top", help="How many of the most suspicious encoders to list.")] = 10,
    endpoint_url: Endpoint = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics as JSON here.")] = None,
    reference: References = None,
    fleet_cutoff: FleetCutoff = DEFAULT_CUTOFF,
    fleet_cluster: FleetCluster = DEFAULT_CLUSTER,
    html_out: Annotated[
        Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report here.")
    ] = None,
    cards: Annotated[int, typer.Option("--cards", min=1, help="At most this many encoder cards in --html.")] = 100,
) -> None:
    """ROC-AUC, TPR at --fpr, confusion matrix at the threshold, roc.png, and the most suspicious encoders.

    Exits 1 if any encoder is flagged at the threshold, 0 if none, 2 if the table cannot be read."""
    from botocore.exceptions import BotoCoreError, ClientError

    from .. import report as report_mod

    try:
        rows = report_mod.load_rows(results, endpoint_url)
        rep = report_mod.analyze(rows, fpr=fpr, threshold=threshold, top=top, references=reference or (),
                                 fleet_cutoff=fleet_cutoff, fleet_cluster=fleet_cluster)
    except (OSError, ValueError, BotoCoreError, ClientError) as e:
        raise _fail(f"cannot analyze {results}: {e}") from None
    if plot is None:
        plot = Path("roc.png") if results.startswith("s3://") else Path(results).parent / "roc.png"
    report_mod.plot(rep, rows, plot)
    _print_report(rep, plot)
    if html_out is not None:
        from .. import html_report
        from ..storage import S3Options

        judged, _, _ = report_mod.rejudge(rows, threshold, reference or (), fleet_cutoff, fleet_cluster)
        html_report.write(html_out, judged, rep, options=S3Options(endpoint_url), cards=cards,
                          roc_png=plot.read_bytes() if rep.roc is not None and plot.is_file() else None)
        console.print(f"html report: {html_out}")
    if as_json is not None:
        as_json.write_text(json.dumps(rep.to_dict(), indent=2, default=str))
    raise typer.Exit(EXIT_FOUND if rep.flagged else EXIT_CLEAN)


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _print_report(rep, plot: Path) -> None:
    from ..report import score_cut

    summary = Table(title="decree report", show_header=False)
    summary.add_row("encoders", f"{rep.total} ({rep.ok} scanned, {rep.errors} errors)")
    summary.add_row("threshold", f"{rep.threshold:g} (from {rep.threshold_source}); flagged {rep.flagged}")
    if rep.auc is not None:
        summary.add_row("ROC-AUC", f"{_fmt(rep.auc)} (by suspicion; -PL1 alone {_fmt(rep.auc_pl1)})")
        summary.add_row(
            f"TPR @ FPR<={rep.fpr_target:g}",
            f"{_fmt(rep.tpr_at_fpr, '.3f')} (FPR {_fmt(rep.fpr_achieved, '.3f')}, {score_cut(rep)})",
        )
    else:
        summary.add_row("labels", f"{rep.labeled} labeled ({rep.positives} trojaned, {rep.negatives} clean): no ROC")
    if rep.confusion:
        c = rep.confusion
        summary.add_row("confusion", f"TP {c['tp']}  FP {c['fp']}  FN {c['fn']}  TN {c['tn']}")
    summary.add_row(
        "fleet",
        f"{rep.fleet_judged} judged against comparable peers (anomaly cutoff {rep.fleet_cutoff:g}, "
        f"{rep.references} references); {rep.fleet_outliers} flagged as outliers only, "
        f"{rep.threshold_overruled} below a threshold but cleared by their anchor's peers",
    )
    if rep.quantiles:
        summary.add_row("PL1 quantiles", "  ".join(f"{k}={v:.4f}" for k, v in rep.quantiles.items()))
    summary.add_row("plot", str(plot))
    console.print(summary)
    _warn_collapsing(rep.collapsing_bases)
    top = Table(title="most suspicious (by suspicion)")
    for col in ("id", "arch", "suspicion", "pl1_norm", "anomaly", "verdict", "label"):
        top.add_column(col)
    for r in rep.suspicious:
        style = "red" if r["flagged"] else None
        top.add_row(
            _text(r["id"]),  # the audited party's text: never parsed as rich markup, controls escaped
            _text(r["arch"]),
            _fmt(r.get("suspicion"), ".2f"),
            _fmt(r["pl1_norm"]),
            _fmt(r.get("anomaly_index"), ".2f"),
            "trojaned" if r["flagged"] else "clean",
            _text(r.get("label") or "-"),
            style=style,
        )
    console.print(top)


def _warn_collapsing(bases) -> None:
    """A warning, not a verdict, per base whose own trigger is under the threshold (decree.transfer.collapsing_bases):
    the base may carry the backdoor of its whole lineage, or the shadow set and input size collapse clean models."""
    from ..report import collapse_warning

    for b in bases:
        console.print(_text(f"warning: {collapse_warning(b)}"), style="yellow")


def _text(value):
    from rich.text import Text

    from ..schema import safe_text

    return Text(safe_text(str(value)))


def _mount_subcommands() -> None:
    """Commands whose code lives in their own modules (zoo building, benchmark, sizing)."""
    from .bench import bench_command
    from .plan import plan_command
    from .zoo import zoo_app

    app.add_typer(zoo_app, name="zoo", help="Build a zoo of clean and trojaned encoders.")
    app.command("bench")(bench_command)
    app.command("plan")(plan_command)


_mount_subcommands()


def main() -> None:
    """The `decree` console script: an exception no command expected is exit 2 with one line, never a traceback
    ending in exit 1, which would read as "backdoors found"."""
    import sys

    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(EXIT_ERROR)
    except Exception as e:  # noqa: BLE001 - the last line of defence of the exit-code contract
        from rich.markup import escape

        from ..redact import redact

        text = redact(f"{type(e).__name__}: {e}").replace("\n", " ")[:500]
        err_console.print(f"[red]error:[/] unexpected failure: {escape(text)}")
        sys.exit(EXIT_ERROR)
