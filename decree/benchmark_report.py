"""The benchmark's readable side: RESULTS.md and roc.png from results.json, and a CPU profile of one inversion."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .encoders import create_encoder
from .inversion import InversionConfig, invert


def _f(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return lines


def results_markdown(results: dict, rows: list[dict]) -> str:
    profiles = results["profiles_run"]
    md = ["# DECREE benchmark: `fast` vs the paper's settings", "",
          (f"Generated from `results.json` ({results['created']}). Zoo `{results['zoo']}` (hash {results['zoo_hash']}): "
          f"{results['n_clean']} clean and {results['n_trojaned']} trojaned encoders, every encoder scanned with "
          f"every profile in one run, interleaved per encoder."), "",
          f"Device `{results['device']}`, torch {results['torch']}, {results['cpu_count']} CPUs "
          f"({results['torch_threads']} torch threads)" + (f", GPU {results['gpu']}" if results.get("gpu") else "")
          + f". Verdict threshold PL1 < {_thresholds(results)}.", ""]
    if "paper" in profiles and results.get("paper_max_steps") is None:
        md += ["The `paper` profile ran uncapped, up to its own bound of 1000 epochs.", ""]
    elif "paper" in profiles:
        pp = results["profiles"]["paper"]
        md += [(f"The `paper` profile is capped at **{results['paper_max_steps']} optimizer steps** (`--paper-max-steps`; "
               f"the original schedule allows up to 1000 epochs). {pp.get('at_step_cap', 0)} of "
               f"{pp['seconds']['n']} paper inversions stopped at the cap rather than by their own early stop: for "
               "those, the seconds are a lower bound (an uncapped run would only widen the speed gap) and the PL1 "
               "is what the paper's schedule had reached by then."), ""]
    md += [("Score = −PL1 (a smaller inverted trigger is more suspicious; for an inversion that never reached τ, the "
           "mask that came closest). The *τ-aware* rows score as the verdict does: no trigger reaching τ counts as "
           "PL1 1.0. TPR at 5% FPR: the largest true-positive rate with at most 5% of clean encoders flagged."), "",
           "## Summary", ""]
    head = ["metric", *profiles]
    summary = [
        ["ROC-AUC", *[results.get(f"auc_{p}") for p in profiles]],
        ["TPR @ 5% FPR", *[results.get(f"tpr_at_5fpr_{p}") for p in profiles]],
        ["ROC-AUC, τ-aware", *[results.get(f"auc_tau_{p}") for p in profiles]],
        ["TPR @ 5% FPR, τ-aware", *[results.get(f"tpr_at_5fpr_tau_{p}") for p in profiles]],
        [f"accuracy @ PL1<{_thresholds(results)}", *[results.get(f"accuracy_{p}") for p in profiles]],
        ["seconds / encoder (mean)", *[results.get(f"seconds_per_encoder_{p}") for p in profiles]],
        ["seconds / encoder (median)", *[results.get(f"median_seconds_per_encoder_{p}") for p in profiles]],
        ["mean steps", *[_f(results["profiles"][p]["mean_steps"], 0) for p in profiles]],
        ["stopped at the step cap", *[str(results["profiles"][p].get("at_step_cap", 0)) for p in profiles]],
        ["reached τ", *[str(results["profiles"][p]["reached_tau"]) for p in profiles]],
        ["errors", *[str(results["profiles"][p]["errors"]) for p in profiles]],
    ]
    md += _table(head, summary) + [""]
    if results.get("speedup") is not None:
        md += [(f"**Speed-up ({results['speedup_of']}, mean seconds): {results['speedup']:.1f}×** "
               f"(median {_f(results.get('speedup_median'), 1)}×, per-encoder paired median "
               f"{_f(results.get('speedup_paired_median'), 1)}×). Verdict agreement between the profiles: "
               f"{_f(results.get('verdict_agreement'))}."), ""]
    md += ["## Per family", "",
           ("Trojans count in their attack's family; clean encoders in every family of their architecture "
           "(a clean CLIP tower is a negative for both CLIP attacks)."), ""]
    fam_rows = []
    for fam, g in results.get("families", {}).items():
        fam_rows.append([fam, str(g["n_clean"]), str(g["n_trojaned"]),
                         *[g.get(f"auc_{p}") for p in profiles], *[g.get(f"tpr_at_5fpr_{p}") for p in profiles]])
    md += _table(["family", "clean", "trojaned", *[f"AUC {p}" for p in profiles],
                  *[f"TPR@5%FPR {p}" for p in profiles]], fam_rows) + [""]
    md += ["## Per encoder", ""]
    by_id: dict[str, dict] = {}
    for r in rows:
        by_id.setdefault(r["id"], {"row": r})[r["profile"]] = r
    enc_rows = []
    for eid, d in by_id.items():
        base = d["row"]
        cells = [eid, base["label"], base.get("attack") or "-", base["families"]]
        for p in profiles:
            r = d.get(p)
            if r is None or r.get("status") != "ok":
                cells += ["error" if r else "-", "-", "-", "-"]
            else:
                cells += [r["pl1_norm"], ("" if r["reached_tau"] else "no τ ") + r["verdict"], r["steps"], r["seconds"]]
        enc_rows.append(cells)
    head = ["id", "label", "attack", "families"]
    for p in profiles:
        head += [f"PL1 {p}", f"verdict {p}", f"steps {p}", f"s {p}"]
    md += _table(head, enc_rows) + [""]
    if results.get("errors"):
        md += ["## Errors", ""] + [f"- `{e['id']}` ({e['profile']}): {e['error']}" for e in results["errors"]] + [""]
    md += ["## Profiles", "", "```json"]
    md += [json.dumps(results["configs"], indent=1), "```", ""]
    prof = results.get("profile") or {}
    if prof.get("top"):
        md += ["## Where the time goes (CPU, `fast`, torch.profiler)", "",
               (f"{prof['steps']} steps on `{prof['encoder']}`, {_f(prof['seconds_per_step'])} s/step; top ops by "
               "self CPU time (full table in `profile.txt`):"), ""]
        md += _table(["op", "self CPU %", "self CPU ms", "calls"],
                     [[t["op"], t["self_cpu_pct"], t["self_cpu_ms"], str(t["calls"])] for t in prof["top"][:8]]) + [""]
    return "\n".join(md)


def plot_roc(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = results["profiles_run"]
    panels = [("overall", results.get("roc", {}))]
    panels += [(f, {p: g.get(f"roc_{p}") for p in profiles}) for f, g in results.get("families", {}).items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels):
        for p in profiles:
            c = curves.get(p)
            if c:
                auc = results.get(f"auc_{p}") if name == "overall" else results["families"][name].get(f"auc_{p}")
                ax.step(c["fpr"], c["tpr"], where="post", label=f"{p} (AUC {_f(auc)})",
                        ls="-" if p == "fast" else "--", lw=2.2 if p == "fast" else 1.4)
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.axvline(0.05, ls="--", c="grey", lw=0.6)
        ax.set(title=name, xlabel="false-positive rate", ylabel="true-positive rate", xlim=(-0.02, 1.02),
               ylim=(-0.02, 1.02))
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("DECREE ROC, score = −PL1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, rows: list[dict], out: Path) -> None:
    (out / "RESULTS.md").write_text(results_markdown(results, rows))
    plot_roc(results, out / "roc.png")


def profile_inversion(entry: dict, shadow, cfg: InversionConfig, path: Path, steps: int = 5) -> dict:
    """torch.profiler over a few `fast` steps on CPU: the top ops by self CPU time, to see where time goes."""
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    enc = create_encoder(entry["arch"], entry["_zoo"] / entry["uri"], image_size=entry.get("image_size"),
                         mean=entry.get("mean"), std=entry.get("std"))
    pixels = shadow.pixels(enc.preprocess.image_size, "cpu")
    small = replace(cfg, max_steps=steps, min_steps=0)
    invert(enc, pixels, replace(small, max_steps=1), device="cpu")  # warm-up: first-call allocations
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = invert(enc, pixels, small, device="cpu")
    avgs = prof.key_averages()
    table = avgs.table(sort_by="self_cpu_time_total", row_limit=25)
    total = sum(a.self_cpu_time_total for a in avgs) or 1.0
    top = sorted(avgs, key=lambda a: a.self_cpu_time_total, reverse=True)[:15]
    header = (f"torch.profiler, CPU, profile `{cfg.profile}` capped at {steps} steps: encoder {entry['id']} "
              f"({entry['arch']}), batch {cfg.batch_size} x {cfg.restarts} restarts, {torch.get_num_threads()} "
              f"threads, {res.seconds:.2f}s ({res.seconds / max(res.steps, 1):.3f} s/step incl. the final "
              f"evaluation)\n\n")
    path.write_text(header + table + "\n")
    return {"encoder": entry["id"], "steps": res.steps, "seconds": res.seconds,
            "seconds_per_step": res.seconds / max(res.steps, 1), "file": path.name,
            "top": [{"op": a.key, "self_cpu_ms": a.self_cpu_time_total / 1e3, "calls": a.count,
                     "self_cpu_pct": 100.0 * a.self_cpu_time_total / total} for a in top]}


def _thresholds(results: dict) -> str:
    """One number when all profiles share the threshold, else 'fast 0.02 / paper 0.1'."""
    per = results.get("thresholds") or {}
    if results.get("threshold") is not None or not per:
        return str(results.get("threshold"))
    return " / ".join(f"{p} {t:g}" for p, t in per.items())
