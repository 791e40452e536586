"""Fleet-relative verdicts: a trojan is a low outlier among encoders of its own architecture and input size.

A fleet holds many encoders of one architecture, most of them clean. Their inverted triggers are about as large
as each other (how large depends on the architecture, the input size and the shadow set, which is why one absolute
threshold does not carry from one fleet or shadow set to another); a trojan's is far smaller. For each group of
comparable encoders this computes Neural Cleanse's anomaly index of every score against the group: the robust
z-score (median and MAD, scaled to σ) of log PL1, positive when the encoder needs a smaller trigger than its peers.
Known-clean reference encoders (`--reference`, e.g. the publisher's original weights) anchor the group: with
enough of them, the median and MAD come from them alone, so a fleet that is mostly trojaned cannot hide in its
own statistics. Without references, a group anchors on its *clean cluster*: trojans are only ever low outliers,
so when the group's upper part (at least a third of it and at least `min_peers` encoders) sits well apart from
everything below it, the median and MAD come from that upper part. A scan of a folder that is half trojaned
(a benchmark family, an attacker's batch) then no longer drags the median into the trojans and inflates the MAD
until nothing stands out (measured on the tune families: bench/README.md).

Fine-tunes of different base models of one architecture have natural triggers of different sizes. When a scan
grouped its encoders by the model they descend from (`base_group`, decree.consensus), a lineage with at least
`min_peers` encoders is judged among itself; every other encoder (no lineage, a small one) against the whole
group, as before: moving an encoder away from every lineage in weight space cannot buy it a smaller group.

Works on plain result rows (dicts), so the verdict can be re-derived from a results table without rescanning.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .transfer import specific_cut

# Neural Cleanse flags an anomaly index above 2; measured on the tune families (bench/README.md).
DEFAULT_CUTOFF = 3.0
MIN_PEERS = 6  # fewer comparable encoders than this: no fleet statistic, the absolute threshold decides
MIN_REFERENCES = 3  # this many references in a group anchor it; fewer only join the peers
_MAD_TO_SIGMA = 1.4826
# A floor under the MAD (in log PL1): a group of near-identical encoders must not make a 5% difference an outlier.
MIN_SPREAD = 0.1
# score column -> its "reached τ" column: patch trigger area, whole-image blend weight and the area divided by how
# much less the base model collapses (decree.transfer), each against its peers
SCORES = {"pl1_norm": "reached_tau", "blend_pl1": "blend_reached_tau", "specific_pl1": "reached_tau"}
_VERDICTS = {"blend_pl1": "blend_verdict", "specific_pl1": "specific_verdict"}
CLUSTER_FRACTION = 1 / 3  # the clean cluster holds at least this share of the group (tolerates 2/3 trojaned)
_CLUSTER_SAMPLE = 1024  # larger groups find their cluster's edge on this many evenly spaced order statistics


@dataclass(frozen=True)
class FleetConfig:
    cutoff: float = DEFAULT_CUTOFF
    min_peers: int = MIN_PEERS
    min_references: int = MIN_REFERENCES
    min_spread: float = MIN_SPREAD
    cluster_fraction: float = CLUSTER_FRACTION  # 0: no clean cluster, the whole group's median and MAD

    def __post_init__(self):
        if not self.cutoff > 0:
            raise ValueError(f"cutoff (--fleet-cutoff) must be positive, got {self.cutoff!r}")
        if not 0 <= self.cluster_fraction <= 1:
            raise ValueError(f"cluster_fraction (--fleet-cluster) must be within 0..1, got {self.cluster_fraction!r}")


def group_key(row: dict) -> tuple:
    """Comparable encoders: same architecture, input size, shadow set and profile."""
    return (row.get("arch"), row.get("image_size"), row.get("shadow_sha256"), row.get("profile"))


def _positive(v) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return float(v) if ok else None


def log_score(row: dict, column: str) -> float | None:
    v = _positive(row.get(column))
    if v is None:
        return None
    if row.get(SCORES[column]) is False:
        return 0.0  # the search never reached τ: no trigger found, the least suspicious score (PL1 1.0)
    return math.log(min(v, 1.0))


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _location_spread(population: list[float], min_spread: float) -> tuple[float, float]:
    med = _median(population)
    return med, max(_median([abs(v - med) for v in population]) * _MAD_TO_SIGMA, min_spread)


def robust_index(value: float, population: list[float], min_spread: float = MIN_SPREAD) -> float:
    """(median - value) / (1.4826 · MAD): positive when `value` is below the population."""
    med, spread = _location_spread(population, min_spread)
    return (med - value) / spread


def clean_cluster(population: list[float], config: FleetConfig = FleetConfig()) -> list[float]:
    """The group's upper cluster of log scores, or the whole population when none stands apart.

    The cluster is the smallest top part (at least `min_peers` and `cluster_fraction` of the group) whose next
    lower score is an outlier against it (anomaly index above the cutoff) while its own lowest is not: everything
    below is then judged against the cluster alone. A smooth spread of clean scores has no such edge (the next score sits about one
    spread below the median of the part above it), so an all-clean group keeps its own median and MAD."""
    desc = sorted(population, reverse=True)
    if not config.cluster_fraction:
        return desc
    smallest = max(config.min_peers, math.ceil(config.cluster_fraction * len(desc)), 1)
    # Only searches that reached τ can form the cluster: "never reached" (log score 0) says nothing about how
    # large the trigger is, and a few such encoders must not stand as a tight cluster above every real score.
    found = [v for v in desc if v < 0.0]
    n = len(found)
    view = found if n <= _CLUSTER_SAMPLE else [found[round(i * (n - 1) / (_CLUSTER_SAMPLE - 1))] for i in range(_CLUSTER_SAMPLE)]
    edge = None
    for size in range(len(view) - 1, max(1, math.ceil(smallest * len(view) / max(n, 1))) - 1, -1):
        med, spread = _location_spread(view[:size], config.min_spread)
        # the next lower score is an outlier against the part, and the part holds no outlier of its own (else
        # a part of 4 clean and 3 trojans would pass, its clean majority setting the median and the MAD)
        if (med - view[size]) / spread > config.cutoff >= (med - view[size - 1]) / spread:
            edge = view[size - 1]  # keep looking: a smaller top part still standing apart is the cleaner anchor
    return [v for v in desc if v >= edge] if edge is not None else desc


def assign(rows: list[dict], references: Iterable[str] = (), config: FleetConfig = FleetConfig()) -> list[dict]:
    """Return copies of `rows` with `anomaly_index`, `fleet_peers`, `verdict_basis`, `fleet_anchor`, the
    combined `verdict` and its `suspicion` (above 1 exactly when the verdict is trojaned).

    Only ok rows are scored. A row's verdict is trojaned when its own absolute verdicts (patch or blend) say so,
    or, in a group of at least `min_peers` comparable encoders, when either score's anomaly index exceeds the
    cutoff. In a group anchored by references or a clean cluster, an absolute verdict stands only for a score
    below every anchor's: a known-clean or clustered peer that needs as small a trigger shows that the threshold
    does not fit this architecture and shadow set. References are matched by id or uri.
    """
    refs = set(references)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.get("status") == "ok":
            groups[group_key(r)].append(i)
    out = [dict(r) for r in rows]
    for group in groups.values():
        for judged, members in _units(rows, group, config.min_peers):
            anchored = [i for i in members if rows[i].get("id") in refs or rows[i].get("uri") in refs]
            by_refs = len(anchored) >= config.min_references
            basis = anchored if by_refs else members
            stats = _group_stats(rows, basis, config, by_refs) if len(members) >= config.min_peers else {}
            for i in judged:
                out[i].update(_judge(rows[i], stats, len(members), config))
    return out


def _units(rows: list[dict], group: list[int], min_peers: int) -> list[tuple[list[int], list[int]]]:
    """(who is judged, against whom): each lineage of at least `min_peers` among itself, the rest of the group
    against all of it."""
    lineages: dict[str, list[int]] = defaultdict(list)
    for i in group:
        if isinstance(lineage := rows[i].get("base_group"), str) and lineage:
            lineages[lineage].append(i)
    units = [(m, m) for m in lineages.values() if len(m) >= min_peers]
    own = {i for m, _ in units for i in m}
    if rest := [i for i in group if i not in own]:
        units.append((rest, group))
    return units


@dataclass(frozen=True)
class _Stats:
    median: float
    spread: float
    anchor: str  # "references", "cluster" (the group's clean cluster) or "group" (the whole group)
    floor: float | None  # the anchor's lowest log score; None when the whole group is its own anchor


def _group_stats(rows: list[dict], basis: list[int], config: FleetConfig, by_refs: bool) -> dict[str, _Stats]:
    """Per score column, the group's statistics from its references or its clean cluster, once per group."""
    stats = {}
    for column in SCORES:
        population = [v for j in basis if (v := log_score(rows[j], column)) is not None]
        anchor = "references"
        if not by_refs:
            cluster = clean_cluster(population, config)
            anchor = "cluster" if len(cluster) < len(population) else "group"
            population = cluster
        if len(population) >= config.min_references:
            med, spread = _location_spread(population, config.min_spread)
            stats[column] = _Stats(med, spread, anchor, min(population) if anchor != "group" else None)
    return stats


def _cut(row: dict, column: str) -> float | None:
    """The cut a search's own verdict uses for one score column (decree.scoring, decree.transfer)."""
    if column == "pl1_norm":
        return _positive(row.get("threshold"))
    if column == "blend_pl1":
        return _positive(row.get("blend_threshold"))
    return specific_cut(_positive(row.get("threshold")), _positive(row.get("base_pl1")), base_distance(row))


def base_distance(row: dict) -> float | None:
    """The row's weight distance to the base its specific score was taken against; absent: None (a row from before
    the column, or no base), garbage: NaN, which specific_cut treats as far."""
    v = row.get("base_distance")
    if v is None:
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def margin(row: dict, column: str) -> float | None:
    """A search's own margin: its cut over its score, above 1 exactly when that search flags the encoder by itself;
    None when it has no score or cut, or never reached τ (no trigger found says nothing about a margin)."""
    v, cut = _positive(row.get(column)), _cut(row, column)
    if v is None or cut is None or row.get(SCORES[column]) is False:
        return None
    return cut / v


def below_threshold(row: dict) -> bool:
    """Flagged by a search's own threshold (patch or blend), before the fleet weighs in."""
    return any(_absolute(row, column) for column in SCORES)


def _absolute(row: dict, column: str) -> bool:
    """The search's own verdict for one score column. A row from before the patch_verdict column has its
    verdict as the patch search's."""
    if column == "pl1_norm":
        return (row.get("patch_verdict") or row.get("verdict")) == "trojaned"
    return row.get(_VERDICTS[column]) == "trojaned"


def _judge(row: dict, stats: dict[str, _Stats], peers: int, config: FleetConfig) -> dict:
    """The row's fleet columns and verdict, and its `suspicion`: the largest of its searches' margins (cut / score)
    and its anomaly index over the cutoff, leaving out a threshold its anchor overrules, so that the verdict is
    trojaned exactly when the suspicion exceeds 1. One number that ranks every rule the verdict uses, comparable
    across architectures and shadow sets (each rule is scaled by its own cut), which `decree report`'s ROC ranks."""
    margins = {column: m for column in SCORES if (m := margin(row, column)) is not None}
    if peers < config.min_peers:
        return {"anomaly_index": None, "fleet_peers": peers, "verdict_basis": "threshold", "fleet_anchor": None,
                "verdict": "trojaned" if below_threshold(row) else "clean",
                "suspicion": max(margins.values(), default=0.0)}
    best, flagged, suspicion = None, False, -math.inf
    for column in SCORES:
        st, mine = stats.get(column), log_score(row, column)
        if st is None or st.floor is None or mine is None or mine < st.floor:
            flagged = flagged or _absolute(row, column)
            suspicion = max(suspicion, margins.get(column, -math.inf))
        if st is None or mine is None:
            continue
        index = (st.median - mine) / st.spread  # robust_index against the group, its statistics computed once
        best = index if best is None else max(best, index)
    flagged = flagged or (best is not None and best > config.cutoff)
    if best is not None:  # negative when every score of the row sits above its peers'
        suspicion = max(suspicion, best / config.cutoff)
    anchor = stats["pl1_norm"].anchor if "pl1_norm" in stats else next((s.anchor for s in stats.values()), None)
    return {"anomaly_index": best, "fleet_peers": peers, "verdict_basis": "fleet", "fleet_anchor": anchor,
            "verdict": "trojaned" if flagged else "clean", "suspicion": suspicion if suspicion > -math.inf else 0.0}
