"""ROC analysis of a results table, ranked by `suspicion`: every rule of the verdict in one number (decree.fleet).

The verdicts are re-derived from the table (`rejudge`): each row's thresholds (or `--threshold`), then the fleet
statistics of `decree.fleet`, so a changed cutoff or reference list needs no rescan.

With labels (manifest `label` clean/trojaned): ROC-AUC, the TPR reached at a target FPR and the PL1 threshold
that reaches it, and the confusion matrix at the configured threshold. Without labels: the ranking and the
score distribution. All metrics come from scikit-learn; the plot is matplotlib's Agg backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_CLUSTER, DEFAULT_CUTOFF

POSITIVE, NEGATIVE = "trojaned", "clean"


@dataclass
class Report:
    total: int
    ok: int
    errors: int
    threshold: float  # the PL1 threshold the confusion matrix uses
    threshold_source: str  # "--threshold", "scan" (the rows' own verdicts) or "default"
    flagged: int  # encoders judged trojaned at `threshold`
    labeled: int = 0
    positives: int = 0
    negatives: int = 0
    auc: float | None = None  # of `suspicion`: every rule of the verdict in one number (decree.fleet)
    auc_pl1: float | None = None  # of -PL1 alone, the paper's score
    fpr_target: float = 0.05
    tpr_at_fpr: float | None = None
    fpr_achieved: float | None = None
    threshold_at_fpr: float | None = None  # the suspicion cut reaching it: flag suspicion >= this
    confusion: dict[str, int] | None = None  # tn, fp, fn, tp at `threshold`
    quantiles: dict[str, float] = field(default_factory=dict)  # PL1 distribution of scanned encoders
    suspicious: list[dict[str, Any]] = field(default_factory=list)  # most suspicious first (by suspicion)
    roc: tuple[list[float], list[float]] | None = None  # (fpr, tpr) points
    fleet_cutoff: float = DEFAULT_CUTOFF
    fleet_judged: int = 0  # rows whose group had enough peers for a fleet statistic (verdict_basis fleet)
    fleet_outliers: int = 0  # flagged only as outliers among their peers, not by a threshold
    threshold_overruled: int = 0  # below a threshold, judged clean: anchor peers (references, clean cluster) score as low
    references: int = 0  # reference encoders found among the rows
    collapsing_bases: list = field(default_factory=list)  # decree.transfer.collapsing_bases: bases under the threshold

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["suspicious"] = [{k: _plain(v) for k, v in r.items()} for r in self.suspicious]
        return out


def collapse_warning(base: dict) -> str:
    """The one text of a decree.transfer.collapsing_bases entry, for the terminal and the HTML report alike."""
    which = f"consensus lineage {base['base_group']}" if base["base_group"] else "named"
    return (f"the base of {base['arch']} at {base['image_size']} px ({which}) needs only a trigger of "
            f"{100 * base['base_pl1']:.1f}% of the image on this shadow set, under the threshold "
            f"({100 * base['threshold']:.1f}%): either it carries a backdoor its {base['encoders']} fine-tunes share, or "
            f"this shadow set and input size collapse clean models (check --image-size: the architecture's default may "
            f"not be the size the encoders were trained at) and their threshold verdicts mean nothing")


def _plain(v):
    return v.isoformat() if hasattr(v, "isoformat") else v


def load_rows(path: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    from .results import read_table
    from .storage import S3Options

    return read_table(path, S3Options(endpoint_url)).to_pylist()


def _predict(row: dict[str, Any], threshold: float) -> bool:
    # The core's rule: a small mask only counts if it actually made the shadow set embed alike.
    return bool(row.get("reached_tau", True)) and row["pl1_norm"] < threshold


def _at_threshold(row: dict[str, Any], t: float) -> dict[str, Any]:
    """The row's threshold verdicts at another patch threshold: the patch search's, and the specific score's, whose
    cut is a fraction of it (decree.transfer)."""
    from decree.fleet import base_distance
    from decree.transfer import specific_verdict

    out = dict(row, threshold=t, patch_verdict=POSITIVE if _predict(row, t) else NEGATIVE)
    if isinstance(row.get("specific_pl1"), (int, float)):
        out["specific_verdict"] = specific_verdict(bool(row.get("reached_tau", True)), row["specific_pl1"], t,
                                                   row.get("base_pl1"), base_distance(row))
    return out


def rejudge(rows: list[dict[str, Any]], threshold: float | None = None, references=(),
            fleet_cutoff: float = DEFAULT_CUTOFF, fleet_cluster: float = DEFAULT_CLUSTER
            ) -> tuple[list[dict[str, Any]], str, float]:
    """The verdicts re-derived from the table: each row's own thresholds (or `threshold` for the patch search),
    then the fleet statistics. Returns (rows, threshold source, the patch threshold in use)."""
    from decree.fleet import FleetConfig, assign

    ok = [r for r in rows if r["status"] == "ok" and r.get("pl1_norm") is not None]
    if threshold is not None:
        source, t = "--threshold", float(threshold)
        ok_ids = {id(r) for r in ok}
        rows = [_at_threshold(r, t) if id(r) in ok_ids else r for r in rows]
    else:
        used = [r["threshold"] for r in ok if r.get("threshold") is not None]
        if used:
            source, t = "scan", float(np.median(used))
        else:
            from decree.scoring import DEFAULT_THRESHOLD

            source, t = "default", DEFAULT_THRESHOLD
    # rows from before the patch_verdict column keep their verdict as the patch verdict (decree.fleet)
    return assign(rows, references, FleetConfig(cutoff=fleet_cutoff, cluster_fraction=fleet_cluster)), source, t


def analyze(rows: list[dict[str, Any]], *, fpr: float = 0.05, threshold: float | None = None, top: int = 10,
            references=(), fleet_cutoff: float = DEFAULT_CUTOFF, fleet_cluster: float = DEFAULT_CLUSTER) -> Report:
    from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

    from decree.fleet import below_threshold
    from decree.transfer import collapsing_bases

    if not 0.0 < fpr < 1.0:
        raise ValueError(f"--fpr must be in (0, 1), got {fpr}")
    rows, source, t = rejudge(rows, threshold, references, fleet_cutoff, fleet_cluster)
    scanned = [r for r in rows if r["status"] == "ok" and r.get("pl1_norm") is not None]
    flagged = [r.get("verdict") == POSITIVE for r in scanned]
    report = Report(
        total=len(rows),
        ok=len(scanned),
        errors=sum(r["status"] == "error" for r in rows),
        threshold=t,
        threshold_source=source,
        flagged=int(sum(flagged)),
        fpr_target=fpr,
        fleet_cutoff=fleet_cutoff,
        fleet_judged=sum(r.get("verdict_basis") == "fleet" for r in scanned),
        fleet_outliers=sum(f and not below_threshold(r) for r, f in zip(scanned, flagged, strict=True)),
        threshold_overruled=sum(not f and below_threshold(r) for r, f in zip(scanned, flagged, strict=True)),
        references=sum(1 for r in scanned if r.get("id") in set(references) or r.get("uri") in set(references)),
        collapsing_bases=collapsing_bases(rows),
    )
    pl1 = np.array([r["pl1_norm"] for r in scanned], dtype=float)
    if len(pl1):
        report.quantiles = {f"p{q}": float(np.percentile(pl1, q)) for q in (0, 5, 25, 50, 75, 95, 100)}
    # higher = more suspicious; rejudge gave every scanned row its suspicion (decree.fleet)
    order = np.argsort([-r["suspicion"] for r in scanned], kind="stable")[:top]
    report.suspicious = [dict(scanned[i], flagged=flagged[i]) for i in order]

    labeled = [(r, f) for r, f in zip(scanned, flagged, strict=True) if r.get("label") in (POSITIVE, NEGATIVE)]
    report.labeled = len(labeled)
    y = np.array([r["label"] == POSITIVE for r, _ in labeled], dtype=int)
    report.positives, report.negatives = int(y.sum()), int(len(y) - y.sum())
    if report.labeled:
        pred = np.array([f for _, f in labeled], dtype=int)
        tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
        report.confusion = {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}
    if report.positives and report.negatives:
        score = np.array([r["suspicion"] for r, _ in labeled], dtype=float)
        report.auc = float(roc_auc_score(y, score))
        report.auc_pl1 = float(roc_auc_score(y, [-r["pl1_norm"] for r, _ in labeled]))
        fprs, tprs, thresholds = roc_curve(y, score, drop_intermediate=False)
        ok = np.flatnonzero(fprs <= fpr + 1e-12)
        best = ok[np.argmax(tprs[ok])]
        report.tpr_at_fpr, report.fpr_achieved = float(tprs[best]), float(fprs[best])
        # the first threshold is +inf (flag nothing)
        report.threshold_at_fpr = None if not np.isfinite(thresholds[best]) else float(thresholds[best])
        report.roc = ([float(v) for v in fprs], [float(v) for v in tprs])
    return report


def score_cut(report: Report) -> str:
    """The cut that reaches the target FPR, in words."""
    return "flag none" if report.threshold_at_fpr is None else f"suspicion >= {report.threshold_at_fpr:.4f}"


def plot(report: Report, rows: list[dict[str, Any]], path: str | Path) -> Path:
    """roc.png: the ROC curve when labels allow one, else the PL1 distribution with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    if report.roc is not None:
        ax.plot(report.roc[0], report.roc[1], lw=2, label=f"DECREE (suspicion), AUC={report.auc:.3f}")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.axvline(report.fpr_target, color="tab:red", lw=1, ls=":", label=f"FPR={report.fpr_target:g}")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
        ax.set_title(f"ROC over {report.labeled} labeled encoders")
    else:
        pl1 = [r["pl1_norm"] for r in rows if r["status"] == "ok" and r.get("pl1_norm") is not None]
        ax.hist(pl1, bins=min(30, max(5, len(pl1))), color="tab:blue", alpha=0.8)
        ax.set(xlabel="PL1 norm (lower = more suspicious)", ylabel="encoders")
        ax.set_title(f"PL1 distribution ({len(pl1)} encoders, no labels)")
        ax.axvline(report.threshold, color="tab:orange", lw=1, label=f"threshold={report.threshold:g}")
    ax.legend(loc="lower right" if report.roc is not None else "upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
