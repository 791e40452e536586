"""Does the verdict hold beyond what it was tuned on? The benchmark's split and shadow-condition analysis.

Zoos are split before any tuning (bench/README.md): a zoo built with a seed in TUNE_SEEDS is a *tune* zoo, every
other seed is *report-only*, and a family never moves across. Every encoder is scanned under each shadow condition
its zoo ships: `in-distribution` (the training distribution's held-out images) and `photos` (crops of natural
photos, the normal condition of an audit that lacks the pre-training data). Per split, condition, profile and zoo
family this reports ROC-AUC of −PL1, TPR at 5% FPR, the absolute-threshold verdicts and the fleet verdicts side by
side, and AUC per trigger kind and size bucket.

The fleet verdict is simulated as a fleet audit sees it: most encoders clean, a trojan the odd one out. Each
encoder is judged against the clean encoders of its architecture, input size, condition and split (without
itself), with decree.fleet's anomaly index and cutoff, plus its own absolute verdict where it lies below every
clean peer (as decree.fleet treats references). The *folder* verdict is what
`decree scan` of one zoo family's folder gives: the whole family (about half of it trojaned) is one fleet group,
with no references, through decree.fleet.assign itself.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .fleet import DEFAULT_CUTOFF, MIN_REFERENCES, FleetConfig, assign, log_score, robust_index

TUNE_SEEDS = (0,)
# shadow file -> condition; a photo-trained zoo (zoo.photos.TRAINED_ON_PHOTOS) has photo crops in distribution
CONDITIONS = {"shadow.npz": "in-distribution", "shadow-photos.npz": "photos", "shadow-fmnist.npz": "fashion-mnist"}
# trigger area buckets (fraction of the image); whole-image triggers have their own
BUCKETS = ((0.02, "patch <2%"), (0.04, "patch 2-4%"), (0.08, "patch 4-8%"), (0.125, "patch 8-12.5%"),
           (1.0, "patch >12.5%"))


def zoo_split(zoo_dir: str | Path) -> str:
    try:
        seed = json.loads((Path(zoo_dir) / "zoo.json").read_text())["params"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return "report"  # a zoo of unknown origin was never tuned on
    return "tune" if seed in TUNE_SEEDS else "report"


def condition_of(shadow_file: str) -> str:
    return CONDITIONS.get(shadow_file, Path(shadow_file).stem)


def bucket_of(entry: dict) -> str | None:
    if entry.get("label") != "trojaned":
        return None
    kind = entry.get("trigger_kind")
    if kind not in (None, "patch", "shape"):
        return f"whole-image {kind}"
    area = entry.get("trigger_area")
    if area is None:
        return None
    size = next(name for top, name in BUCKETS if float(area) <= top)
    return size.replace("patch", "shape") if kind == "shape" else size


def _auc(pos: list[float], neg: list[float]) -> tuple[float | None, float | None]:
    """ROC-AUC and TPR at 5% FPR of score = −PL1 (trojaned positive)."""
    if not pos or not neg:
        return None, None
    from sklearn.metrics import roc_auc_score, roc_curve

    y = [1] * len(pos) + [0] * len(neg)
    s = -np.asarray(pos + neg, dtype=float)
    fpr, tpr, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), float(max(t for f, t in zip(fpr, tpr) if f <= 0.05 + 1e-12))


def fleet_flags(rows: list[dict], cutoff: float = DEFAULT_CUTOFF) -> dict[int, tuple[float | None, bool]]:
    """id(row) -> (anomaly index against its clean peers without itself, fleet verdict trojaned?)."""
    peers: dict[tuple, list[dict]] = defaultdict(list)
    key = lambda r: (r["split"], r["condition"], r["profile"], r["arch"], r.get("image_size"))  # noqa: E731
    for r in rows:
        if r["label"] == "clean":
            peers[key(r)].append(r)
    out = {}
    for r in rows:
        pop = [v for c in peers[key(r)] if c is not r and (v := log_score(c, "pl1_norm")) is not None]
        mine = log_score(r, "pl1_norm")
        anchored = mine is not None and len(pop) >= MIN_REFERENCES
        index = robust_index(mine, pop) if anchored else None
        # as decree.fleet.assign with references: a threshold flags only below every clean peer
        absolute = r.get("verdict") == "trojaned" and (not anchored or mine < min(pop))
        out[id(r)] = (index, absolute or (index is not None and index > cutoff))
    return out


def folder_flags(rows: list[dict], cutoff: float = DEFAULT_CUTOFF) -> dict[int, bool]:
    """id(row) -> trojaned, when each zoo family is scanned as one folder: a fleet group of clean and trojaned."""
    group = lambda r: (r["split"], r.get("zoo"), r["zoo_family"], r["arch"])  # noqa: E731
    as_scanned = [{"status": "ok", "arch": group(r), "image_size": r.get("image_size"),
                   "shadow_sha256": r["condition"], "profile": r["profile"], "pl1_norm": r["pl1_norm"],
                   "reached_tau": r.get("reached_tau"), "verdict": r.get("verdict")} for r in rows]
    judged = assign(as_scanned, config=FleetConfig(cutoff=cutoff))
    return {id(r): j["verdict"] == "trojaned" for r, j in zip(rows, judged)}


def summarize(rows: list[dict], cutoff: float = DEFAULT_CUTOFF) -> dict:
    """{split: {condition: {profile: {"families": {family: ...}, "buckets": {family: {bucket: ...}},
    "overall": {...}}}}}."""
    ok = [r for r in rows if r.get("status") == "ok"]
    flags = fleet_flags(ok, cutoff)
    folder = folder_flags(ok, cutoff)
    flags = {k: (index, flagged, folder[k]) for k, (index, flagged) in flags.items()}
    out: dict = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        groups[(r["split"], r["condition"], r["profile"])].append(r)
    for (split, cond, prof), sel in sorted(groups.items()):
        fams: dict[str, list[dict]] = defaultdict(list)
        for r in sel:
            fams[r["zoo_family"]].append(r)
        entry = {"families": {f: _metrics(g, flags) for f, g in sorted(fams.items())},
                 "overall": _metrics(sel, flags), "buckets": {}}
        # per family and trigger bucket: the bucket's trojans against the family's own clean encoders (one
        # architecture and input size; pooling families would rank one architecture's trojans against another's
        # natural triggers, e.g. 32-px trojans against 224-px clean encoders)
        for fam, g in sorted(fams.items()):
            clean = [r for r in g if r["label"] == "clean"]
            buckets: dict[str, list[dict]] = defaultdict(list)
            for r in g:
                if r.get("bucket"):
                    buckets[r["bucket"]].append(r)
            for name, troj in sorted(buckets.items()):
                entry["buckets"].setdefault(fam, {})[name] = _metrics(troj + clean, flags)
        out.setdefault(split, {}).setdefault(cond, {})[prof] = entry
    return out


def _metrics(sel: list[dict], flags: dict) -> dict:
    pos = [r["pl1_norm"] for r in sel if r["label"] == "trojaned"]
    neg = [r["pl1_norm"] for r in sel if r["label"] == "clean"]
    auc, tpr = _auc(pos, neg)
    thr = [r.get("verdict") == "trojaned" for r in sel]
    fleet = [flags[id(r)][1] for r in sel]
    folder = [flags[id(r)][2] for r in sel]
    troj = [r["label"] == "trojaned" for r in sel]
    secs = [r["seconds"] for r in sel if r.get("seconds") is not None]
    secs_troj = [r["seconds"] for r in sel if r.get("seconds") is not None and r["label"] == "trojaned"]

    def counts(pred):
        return {"tp": sum(p and t for p, t in zip(pred, troj)), "fp": sum(p and not t for p, t in zip(pred, troj))}

    return {"n_clean": len(neg), "n_trojaned": len(pos), "auc": auc, "tpr_at_5fpr": tpr,
            "threshold": counts(thr), "fleet": counts(fleet), "folder": counts(folder),
            "accuracy_threshold": _mean([p == t for p, t in zip(thr, troj)]),
            "accuracy_fleet": _mean([p == t for p, t in zip(fleet, troj)]),
            "accuracy_folder": _mean([p == t for p, t in zip(folder, troj)]),
            "seconds_mean": _mean(secs), "seconds_trojaned": _mean(secs_troj), "max_trojan_pl1": max(pos) if pos else None,
            "min_clean_pl1": min(neg) if neg else None}


def _accuracies(g: dict) -> str:
    return "/".join(_f(g.get(k), 2) for k in ("accuracy_threshold", "accuracy_fleet", "accuracy_folder"))


def _mean(values) -> float | None:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


def _f(v, d: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{d}f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def markdown(summary: dict, profiles: list[str], cutoff: float = DEFAULT_CUTOFF) -> str:
    md = ["# Generalization: tune families vs report-only families, in- and out-of-distribution shadow sets", "",
          ("Generated by `decree bench` (see bench/README.md for the split, fixed before tuning). Score −PL1. "
           f"*threshold*: each profile's absolute PL1 threshold. *fleet*: anomaly index > {cutoff:g} against the "
           "clean encoders of the same architecture, input size, condition and split (without itself), or the "
           "threshold verdict below every one of them (they are the group's references). *folder*: the verdict of `decree scan` on the family's folder, the whole family "
           "(clean and trojaned) one fleet group without references. TP/FP are counts of trojaned/clean encoders "
           "flagged."), ""]
    for split in ("report", "tune"):
        if split not in summary:
            continue
        md += [f"## {'Report-only' if split == 'report' else 'Tune'} families", ""]
        for cond, per in summary[split].items():
            md += [f"### Shadow set: {cond}", ""]
            head = ["family", "clean", "trojaned"]
            for p in profiles:
                head += [f"AUC {p}", f"TPR@5% {p}", f"threshold TP/FP {p}", f"fleet TP/FP {p}", f"folder TP/FP {p}",
                         f"accuracy {p} (threshold/fleet/folder)", f"s/enc {p}"]
            body = []
            first_profile = next(p for p in profiles if p in per)  # a profile may skip a condition (paper at 224 px)
            names = list(per[first_profile]["families"]) + ["all"]
            for name in names:
                first = per[first_profile]
                g0 = first["overall"] if name == "all" else first["families"].get(name)
                if g0 is None:
                    continue
                cells = [f"**{name}**" if name == "all" else name, str(g0["n_clean"]), str(g0["n_trojaned"])]
                for p in profiles:
                    g = per.get(p, {}).get("overall" if name == "all" else "families", {})
                    g = g if name == "all" else g.get(name)
                    if not g:
                        cells += ["-"] * 7
                        continue
                    cells += [_f(g["auc"]), _f(g["tpr_at_5fpr"]),
                              f"{g['threshold']['tp']}/{g['threshold']['fp']}", f"{g['fleet']['tp']}/{g['fleet']['fp']}",
                              f"{g['folder']['tp']}/{g['folder']['fp']}", _accuracies(g), _f(g["seconds_mean"], 2)]
                body.append(cells)
            md += _table(head, body) + [""]
            bhead = ["family", "trigger", "trojaned", "clean"]
            for p in profiles:
                bhead += [f"AUC {p}", f"TPR@5% {p}", f"fleet TP {p}", f"accuracy {p} (threshold/fleet/folder)",
                          f"s/enc {p}"]
            brows = []
            for fam, per_bucket in per[first_profile]["buckets"].items():
                for name, g0 in per_bucket.items():
                    row = [fam, name, str(g0["n_trojaned"]), str(g0["n_clean"])]
                    for p in profiles:
                        g = per.get(p, {}).get("buckets", {}).get(fam, {}).get(name)
                        row += ([_f(g["auc"]), _f(g["tpr_at_5fpr"]), str(g["fleet"]["tp"]), _accuracies(g),
                                 _f(g["seconds_trojaned"], 2)] if g else ["-"] * 5)
                    brows.append(row)
            if brows:
                md += ["Per family, by trigger kind and size (the bucket's trojans against the family's clean encoders; "
                       "accuracy over both, s/enc over the bucket's trojans):", ""] + _table(bhead, brows) + [""]
    return "\n".join(md)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])
