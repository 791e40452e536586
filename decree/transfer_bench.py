"""Benchmark of the base-model transfer score (decree.transfer): PL1 against specific_pl1, tune vs report-only.

`python -m decree.transfer_bench --zoo Z ... --out bench` scans every encoder of the zoos with `fast` under both
shadow conditions through `decree.scan.scan_encoder(base=...)`, the base being what the zoo's encoders were
fine-tuned from (the ImageNet Lite0 weights; the zoo's base CLIP, kept under records/), and writes
`transfer.csv` and `TRANSFER.md`: per split, condition and family, ROC-AUC and threshold TP/FP of −PL1 and of
−specific_pl1, the folder-scan verdicts (decree.fleet over the family as one group) without and with the base,
and what the transfer costs per encoder; and the same against the consensus bases a scan builds by default from
the family's own folder (decree.consensus: MEMBERS picked as a scan picks them, grouped into fine-tunes of one model),
for fleets whose base is unknown; and once more with every zoo's encoders of an architecture in one listing (a
fleet holding fine-tunes of several bases). Zoos with a seed in decree.generalization.TUNE_SEEDS are tune zoos.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import torch

from .consensus import MEMBERS, consensus_bases, nearest, pick
from .encoders import create_encoder
from .fleet import assign
from .generalization import _auc, condition_of, zoo_split
from .inversion import InversionConfig
from .scan import _shadow_pixels, base_pl1, scan_encoder
from .shadow import ShadowSet
from .transfer import DRIFT_LIMIT, RELATIVE_DRIFT_LIMIT, specific_verdict, transfer
from .zoo import read_manifest

FIELDS = ("zoo", "split", "family", "id", "label", "arch", "condition", "pl1_norm", "reached_tau", "base_similarity",
          "specific_pl1", "patch_verdict", "specific_verdict", "consensus_similarity", "consensus_specific_pl1",
          "consensus_specific_verdict", "consensus_members", "consensus_distance", "mixed_specific_pl1",
          "mixed_specific_verdict", "mixed_members", "mixed_distance", "mixed_group", "consensus_group", "threshold",
          "seconds", "transfer_seconds", "base_pl1", "consensus_base_pl1", "mixed_base_pl1", "base_distance")


def zoo_base(zoo: Path, arch: str):
    """The model this zoo's encoders of `arch` were fine-tuned from, or None (trained from scratch)."""
    if arch.startswith("timm/"):
        return create_encoder(arch, pretrained=True)
    if arch.startswith("open_clip/"):
        from safetensors.torch import load_file

        state = load_file(str(next((zoo / "records").glob("clip-base-*.safetensors"))))
        return create_encoder(arch, {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    return None


def _encoder(zoo: Path, e: dict):
    return create_encoder(e["arch"], str(zoo / e["uri"]), image_size=e.get("image_size"), mean=e.get("mean"),
                          std=e.get("std"))


def _pick(listing: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """The members a scan of this listing picks (decree.consensus.pick, on the encoders' paths)."""
    by_name = {str(z / e["uri"]): (z, e) for z, e in listing}
    return [by_name[n] for n in pick(list(by_name), MEMBERS)]


def _consensus(members: list[tuple[Path, dict]]) -> list[tuple[object, list[str]]]:
    """(Consensus, its members' ids) per group, as a worker builds them from these members."""
    found = consensus_bases([_encoder(z, e) for z, e in members], [f"{z.name}/{e['uri']}" for z, e in members])
    return [(b, [f"{members[i][0].name}:{members[i][1]['id']}" for i in b.indices]) for b in found]


def _compare(row: dict, prefix: str, enc, bases, pixels, digest, result, threshold) -> None:
    """The consensus columns `prefix`*: the specific score against the group median `enc` is a fine-tune of (None
    when it is near none: judged by PL1 alone, as a scan does)."""
    chosen, distance = nearest(enc, [b for b, _ in bases])
    row[f"{prefix}distance"] = distance
    row[f"{prefix}members"] = ""
    row[f"{prefix}specific_pl1"] = row[f"{prefix}specific_verdict"] = row[f"{prefix}group"] = None
    row[f"{prefix}base_pl1"] = None
    if chosen is None:
        return
    t = transfer(enc, chosen.encoder, pixels, result.mask, result.pattern, result.tau)
    spec = t.specific_pl1(result.pl1_norm)
    own = base_pl1(chosen.encoder, enc.preprocess, pixels, digest, InversionConfig.from_profile("fast"),
                   torch.device("cpu"))  # as scan_encoder searches: the default `fast` settings
    row[f"{prefix}members"] = " ".join(next(ids for b, ids in bases if b is chosen))
    row[f"{prefix}group"] = chosen.name
    row[f"{prefix}specific_pl1"] = spec
    row[f"{prefix}base_pl1"] = own
    row[f"{prefix}specific_verdict"] = specific_verdict(result.reached_tau, spec, threshold, own, distance)
    if prefix == "consensus_":
        row["consensus_similarity"] = t.base_similarity


SHADOWS = ("shadow.npz", "shadow-photos.npz")  # each zoo's shadow files scanned unless --shadow names others


def run(zoos: list[Path], out: Path, shadows=SHADOWS, log=print) -> list[dict]:
    rows: list[dict] = []
    entries_of = {zoo: read_manifest(zoo) for zoo in zoos}
    # every zoo's encoders of an architecture in one listing, zoo after zoo: the mixed fleet's consensus
    listing: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for zoo, entries in entries_of.items():
        for e in entries:
            listing[e["arch"]].append((zoo, e))
    mixed = {a: _consensus(_pick(m)) for a, m in listing.items()}
    for zoo, entries in entries_of.items():
        archs = sorted({e["arch"] for e in entries})
        bases = {a: zoo_base(zoo, a) for a in archs}
        # what a scan of this zoo's folder builds by default: MEMBERS encoders picked by digest, grouped
        consensus = {a: _consensus(_pick([(zoo, e) for e in entries if e["arch"] == a])) for a in archs}
        for sfile in shadows:
            shadow = ShadowSet(zoo / sfile)
            pixels = {}  # input size -> the shadow images as scan_encoder decodes them
            for e in entries:
                base = bases[e["arch"]]
                if base is None:
                    continue
                r = scan_encoder(str(zoo / e["uri"]), e["arch"], shadow, image_size=e.get("image_size"),
                                 mean=e.get("mean"), std=e.get("std"), base=base, device="cpu", encoder_id=e["id"])
                row = {"zoo": zoo.name, "split": zoo_split(zoo), "family": e.get("family"), "id": e["id"],
                       "label": e["label"], "arch": e["arch"], "condition": condition_of(sfile),
                       **{k: v for k, v in r.to_row().items() if k in FIELDS}, "transfer_seconds": r.transfer_seconds}
                enc = _encoder(zoo, e)  # scan_encoder keeps none: the consensus sees the trigger in its pixel space
                size = enc.preprocess.image_size
                if size not in pixels:
                    pixels[size] = _shadow_pixels(shadow, size, torch.device("cpu"))
                px, digest = pixels[size]
                _compare(row, "consensus_", enc, consensus[e["arch"]], px, digest, r.result, r.threshold)
                _compare(row, "mixed_", enc, mixed[e["arch"]], px, digest, r.result, r.threshold)
                rows.append(row)
                log(f"{zoo.name} {e['id']} {e['label']} {row['condition']}: pl1 {row['pl1_norm']:.4f} "
                    f"specific {row['specific_pl1']:.4f} (consensus {_f(row['consensus_specific_pl1'])}, mixed "
                    f"{_f(row['mixed_specific_pl1'])}) distance {_f(row['consensus_distance'])}")
    write(rows, out)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "transfer.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "TRANSFER.md").write_text(markdown(rows))


_TEXT = {"zoo", "split", "family", "id", "label", "arch", "condition", "patch_verdict", "reached_tau",
         *(f"{p}{c}" for p in ("", "consensus_", "mixed_") for c in ("specific_verdict", "members", "group"))}


def rejudge(out: Path) -> list[dict]:
    """Re-derive every specific verdict of OUT/transfer.csv by decree.transfer's current rules (no zoo, no scan)
    and rewrite it and TRANSFER.md. Each verdict uses the distance to the base it was compared with; a row written
    before the true base's distance was recorded keeps the verdict its scan gave (it knew the distance)."""
    with open(out / "transfer.csv", newline="") as fh:
        rows = [{k: None if v in ("", None) else v if k in _TEXT else float(v) for k, v in r.items()}
                for r in csv.DictReader(fh)]
    for r in rows:
        r["reached_tau"] = r["reached_tau"] == "True"
        for prefix, distance in (("", "base_distance"), ("consensus_", "consensus_distance"),
                                 ("mixed_", "mixed_distance")):
            if r.get(f"{prefix}specific_pl1") is not None and r.get(distance) is not None:
                r[f"{prefix}specific_verdict"] = specific_verdict(r["reached_tau"], r[f"{prefix}specific_pl1"],
                                                                  r["threshold"], r.get(f"{prefix}base_pl1"),
                                                                  r.get(distance))
    write(rows, out)
    return rows


def _folder(rows: list[dict], prefix: str | None, pooled: bool = False) -> dict[int, bool]:
    """Each family and condition as one fleet group, as `decree scan` of its folder judges it: without a base
    (prefix None), with `--base` (""), with the default consensus ("consensus_"); or each architecture of every
    zoo as one group, as a scan of them all in one listing judges it ("mixed_")."""
    keep = {} if prefix is None else {"specific_pl1": f"{prefix}specific_pl1", "specific_verdict": f"{prefix}specific_verdict"}
    if prefix in ("consensus_", "mixed_"):
        keep["base_group"] = f"{prefix}group"
    pooled = pooled or prefix == "mixed_"  # one listing of every zoo: one fleet group per architecture
    as_scanned = [{"status": "ok", "arch": (r["arch"],) if pooled else (r["zoo"], r["family"], r["arch"]), "image_size": 0,
                   "shadow_sha256": r["condition"], "profile": "fast", "pl1_norm": r["pl1_norm"],
                   "reached_tau": r["reached_tau"], "patch_verdict": r["patch_verdict"],
                   "verdict": r["patch_verdict"], **{k: r[c] for k, c in keep.items()}} for r in rows]
    return {id(r): j["verdict"] == "trojaned" for r, j in zip(rows, assign(as_scanned))}


def markdown(rows: list[dict]) -> str:
    plain, based = _folder(rows, None), _folder(rows, "")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["split"], r["condition"], r["family"])].append(r)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != "report", kv[0]))

    def counts(sel, flag):
        return f"{sum(flag(r) for r in sel if r['label'] == 'trojaned')}/{sum(flag(r) for r in sel if r['label'] == 'clean')}"

    def values(sel, col, label):  # col: a column, or a function of the row (read only: rows stay as given)
        return [col(r) if callable(col) else r[col] for r in sel if r["label"] == label]

    def auc(sel, col):
        return _f(_auc(values(sel, col, "trojaned"), values(sel, col, "clean"))[0])

    def edge(sel, col):  # rows without a value (e.g. a distance, before that column) are left out
        pos, neg = ([v for v in values(sel, col, label) if v is not None] for label in ("trojaned", "clean"))
        return f"{max(pos):.4f} / {min(neg):.4f}" if pos and neg else "-"

    zoos = " ".join(f"--zoo {z}" for z in dict.fromkeys(r["zoo"] for r in rows))

    out = ["# Base-model transfer: does the trigger collapse the model the encoder was fine-tuned from?", "",
           f"Generated by `python -m decree.transfer_bench {zoos}` (the Makefile's bench-* target that names these "
           "zoos; see decree/transfer.py and bench/README.md). `fast`, one CPU thread. *specific*: specific_pl1 = "
           "PL1 / how many times farther from a full collapse the base stays. TP/FP: trojaned/clean flagged; *threshold*: below the profile's 0.03 "
           "(and τ reached; specific: half of it, or within a distance of "
           f"{RELATIVE_DRIFT_LIMIT} a tenth of the base's own PL1 on that shadow set); *folder*: `decree scan` of the "
           "family's folder (one fleet group, no references) without and with `--base`; *distance*: weight distance "
           f"to the true base (the specific verdict holds within {DRIFT_LIMIT}).", "",
           "## With the true base (`--base ARCH=SOURCE`: the model the zoo fine-tuned from)", "",
           "| split | condition | family | clean | trojaned | AUC −PL1 | AUC −specific | threshold TP/FP PL1 | "
           "threshold TP/FP specific | folder TP/FP | folder TP/FP with base | max trojan / min clean specific | "
           "max trojan / min clean distance | s/enc | transfer s/enc |", "|" + "---|" * 15]
    for (split, cond, fam), sel in ordered:
        pos, neg = [r for r in sel if r["label"] == "trojaned"], [r for r in sel if r["label"] == "clean"]
        secs = sum(r["seconds"] for r in sel) / len(sel)
        tsecs = sum(r["transfer_seconds"] for r in sel) / len(sel)
        out.append(f"| {split} | {cond} | {fam} | {len(neg)} | {len(pos)} | {auc(sel, 'pl1_norm')} | "
                   f"{auc(sel, 'specific_pl1')} | {counts(sel, lambda r: r['patch_verdict'] == 'trojaned')} | "
                   f"{counts(sel, lambda r: r['specific_verdict'] == 'trojaned')} | {counts(sel, lambda r: plain[id(r)])} | "
                   f"{counts(sel, lambda r: based[id(r)])} | {edge(sel, 'specific_pl1')} | {edge(sel, lambda r: r.get('base_distance'))} | {secs:.2f} | "
                   f"{tsecs:.3f} |")
    label = {f"{r['zoo']}:{r['id']}": r["label"] for r in rows}  # a member's label, by the id its group names
    for prefix, title in (("consensus_", "## Base unknown: the default consensus (each family's own folder)"),
                          ("mixed_", "## Base unknown, several bases: every zoo's encoders of an architecture in one listing")):
        out += ["", title, "", f"{MEMBERS} encoders picked as a scan picks them (decree.consensus.pick), trojans among them, grouped into fine-tunes of "
                "one model (decree.consensus); each encoder compared with the median of its group, or judged by PL1 "
                "alone when it is near none. *effective*: specific_pl1 where compared, else PL1.", "",
                "| split | condition | family | its group (t: trojaned) | near a group clean/trojaned | AUC −PL1 | "
                "AUC −effective | threshold TP/FP | folder TP/FP | folder TP/FP with consensus | "
                "max trojan / min clean effective |", "|" + "---|" * 11]
        folder = _folder(rows, prefix)
        without = plain if prefix == "consensus_" else _folder(rows, None, pooled=True)
        def effective(r, prefix=prefix):
            return r[f"{prefix}specific_pl1"] if r[f"{prefix}specific_pl1"] is not None else r["pl1_norm"]

        for (split, cond, fam), sel in ordered:
            named = sorted({r[f"{prefix}members"] for r in sel if r[f"{prefix}members"]})
            members = "; ".join(" ".join(m.replace("zoo-", "") + ("(t)" if label.get(m) == "trojaned" else "") for m in g.split())
                                for g in named) or "none"
            near = counts(sel, lambda r: r[f"{prefix}specific_pl1"] is not None).split("/")
            flagged = counts(sel, lambda r: r["patch_verdict"] == "trojaned" or r[f"{prefix}specific_verdict"] == "trojaned")
            out.append(f"| {split} | {cond} | {fam} | {members} | {near[1]}/{near[0]} | {auc(sel, 'pl1_norm')} | "
                       f"{auc(sel, effective)} | {flagged} | {counts(sel, lambda r: without[id(r)])} | "
                       f"{counts(sel, lambda r: folder[id(r)])} | {edge(sel, effective)} |")
    return "\n".join(out) + "\n"


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", action="append", type=Path, default=[])
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rejudge", action="store_true", help="re-derive the verdicts of OUT/transfer.csv; no scan")
    p.add_argument("--shadow", action="append", help=f"a shadow file in each zoo folder (repeat; default {SHADOWS})")
    a = p.parse_args(argv)
    if a.rejudge:
        if not (a.out / "transfer.csv").is_file():
            p.error(f"--rejudge: no {a.out / 'transfer.csv'} (run the benchmark first)")
        rejudge(a.out)
    elif not a.zoo:
        p.error("--zoo is required (or --rejudge)")
    else:
        torch.set_num_threads(a.threads)
        run(a.zoo, a.out, shadows=tuple(a.shadow or SHADOWS))
    print(json.dumps({"wrote": [str(a.out / "transfer.csv"), str(a.out / "TRANSFER.md")]}))


if __name__ == "__main__":
    main()
