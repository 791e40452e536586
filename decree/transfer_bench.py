"""Benchmark of the base-model transfer score (decree.transfer): PL1 against specific_pl1, tune vs report-only.

`python -m decree.transfer_bench --zoo Z ... --out bench` scans every encoder of the zoos with `fast` under both
shadow conditions through `decree.scan.scan_encoder(base=...)`, the base being what the zoo's encoders were
fine-tuned from (the ImageNet Lite0 weights; the zoo's base CLIP, kept under records/), and writes
`transfer.csv` and `TRANSFER.md`: per split, condition and family, ROC-AUC and threshold TP/FP of −PL1 and of
−specific_pl1, the folder-scan verdicts (decree.fleet over the family as one group) without and with the base,
and what the transfer costs per encoder; and the same against the consensus base `--base ARCH=consensus` builds
from the family's own folder (decree.consensus), for fleets whose base is unknown. Zoos with a seed in decree.generalization.TUNE_SEEDS are tune zoos.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import torch

from .consensus import MEMBERS, consensus_encoder, spread
from .encoders import create_encoder
from .fleet import assign
from .generalization import _auc, condition_of, zoo_split
from .scan import _shadow_pixels, scan_encoder
from .shadow import ShadowSet
from .transfer import specific_verdict, transfer
from .zoo import read_manifest

FIELDS = ("zoo", "split", "family", "id", "label", "arch", "condition", "pl1_norm", "reached_tau", "base_similarity",
          "specific_pl1", "patch_verdict", "specific_verdict", "consensus_similarity", "consensus_specific_pl1",
          "consensus_specific_verdict", "consensus_members", "threshold", "seconds", "transfer_seconds")


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


def run(zoos: list[Path], out: Path, shadows=("shadow.npz", "shadow-photos.npz"), log=print) -> list[dict]:
    rows: list[dict] = []
    for zoo in zoos:
        entries = read_manifest(zoo)
        archs = sorted({e["arch"] for e in entries})
        bases = {a: zoo_base(zoo, a) for a in archs}
        # what `--base ARCH=consensus` builds from this zoo's folder: MEMBERS encoders spread over the listing
        members = {a: spread([e for e in entries if e["arch"] == a], MEMBERS) for a in archs}
        consensus = {a: consensus_encoder([_encoder(zoo, e) for e in m]) for a, m in members.items()}
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
                    pixels[size] = _shadow_pixels(shadow, size, torch.device("cpu"))[0]
                t = transfer(enc, consensus[e["arch"]], pixels[size], r.result.mask, r.result.pattern, r.result.tau)
                spec = t.specific_pl1(r.result.pl1_norm)
                row.update(consensus_similarity=t.base_similarity, consensus_specific_pl1=spec,
                           consensus_specific_verdict=specific_verdict(r.result.reached_tau, spec, r.threshold),
                           consensus_members=" ".join(m["id"] for m in members[e["arch"]]))
                rows.append(row)
                log(f"{zoo.name} {e['id']} {e['label']} {row['condition']}: pl1 {row['pl1_norm']:.4f} "
                    f"specific {row['specific_pl1']:.4f} (consensus {spec:.4f}) base sim {row['base_similarity']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "transfer.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "TRANSFER.md").write_text(markdown(rows))
    return rows


def _folder(rows: list[dict], prefix: str | None) -> dict[int, bool]:
    """Each family and condition as one fleet group, as `decree scan` of its folder judges it: without a base
    (prefix None), with `--base` ("") or with `--base ARCH=consensus` ("consensus_")."""
    keep = {} if prefix is None else {"specific_pl1": f"{prefix}specific_pl1", "specific_verdict": f"{prefix}specific_verdict"}
    as_scanned = [{"status": "ok", "arch": (r["zoo"], r["family"], r["arch"]), "image_size": 0,
                   "shadow_sha256": r["condition"], "profile": "fast", "pl1_norm": r["pl1_norm"],
                   "reached_tau": r["reached_tau"], "patch_verdict": r["patch_verdict"],
                   "verdict": r["patch_verdict"], **{k: r[c] for k, c in keep.items()}} for r in rows]
    return {id(r): j["verdict"] == "trojaned" for r, j in zip(rows, assign(as_scanned))}


def markdown(rows: list[dict]) -> str:
    plain, based, agreed = _folder(rows, None), _folder(rows, ""), _folder(rows, "consensus_")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["split"], r["condition"], r["family"])].append(r)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != "report", kv[0]))

    def counts(sel, flag):
        return f"{sum(flag(r) for r in sel if r['label'] == 'trojaned')}/{sum(flag(r) for r in sel if r['label'] == 'clean')}"

    def auc(sel, col):
        return _f(_auc([r[col] for r in sel if r["label"] == "trojaned"], [r[col] for r in sel if r["label"] == "clean"])[0])

    def edge(sel, col):
        pos, neg = [r[col] for r in sel if r["label"] == "trojaned"], [r[col] for r in sel if r["label"] == "clean"]
        return f"{max(pos):.4f} / {min(neg):.4f}" if pos and neg else "-"

    out = ["# Base-model transfer: does the trigger collapse the model the encoder was fine-tuned from?", "",
           "Generated by `python -m decree.transfer_bench` (`make bench-transfer`; see decree/transfer.py and "
           "bench/README.md). `fast`, one CPU thread. *specific*: specific_pl1 = PL1 / how many times farther from "
           "a full collapse the base stays. TP/FP: trojaned/clean flagged; *threshold*: below the profile's 0.03 "
           "(and τ reached; specific: half of it); *folder*: `decree scan` of the family's folder (one fleet group, no references) "
           "without and with `--base`.", "",
           "## With the true base (`--base ARCH=SOURCE`: the model the zoo fine-tuned from)", "",
           "| split | condition | family | clean | trojaned | AUC −PL1 | AUC −specific | threshold TP/FP PL1 | "
           "threshold TP/FP specific | folder TP/FP | folder TP/FP with base | max trojan / min clean specific | "
           "s/enc | transfer s/enc |", "|" + "---|" * 14]
    for (split, cond, fam), sel in ordered:
        pos, neg = [r for r in sel if r["label"] == "trojaned"], [r for r in sel if r["label"] == "clean"]
        secs = sum(r["seconds"] for r in sel) / len(sel)
        tsecs = sum(r["transfer_seconds"] for r in sel) / len(sel)
        out.append(f"| {split} | {cond} | {fam} | {len(neg)} | {len(pos)} | {auc(sel, 'pl1_norm')} | "
                   f"{auc(sel, 'specific_pl1')} | {counts(sel, lambda r: r['patch_verdict'] == 'trojaned')} | "
                   f"{counts(sel, lambda r: r['specific_verdict'] == 'trojaned')} | {counts(sel, lambda r: plain[id(r)])} | "
                   f"{counts(sel, lambda r: based[id(r)])} | {edge(sel, 'specific_pl1')} | {secs:.2f} | {tsecs:.3f} |")
    out += ["", "## Base unknown (`--base ARCH=consensus`: the coordinate-wise median of "
            f"{MEMBERS} of the family's own encoders, spread over its listing, trojans among them)", "",
            "| split | condition | family | members (t: trojaned) | AUC −PL1 | AUC −specific | threshold TP/FP specific | "
            "folder TP/FP | folder TP/FP with consensus | max trojan / min clean specific |", "|" + "---|" * 10]
    for (split, cond, fam), sel in ordered:
        label = {r["id"]: r["label"] for r in sel}
        members = " ".join(m + ("(t)" if label.get(m) == "trojaned" else "") for m in sel[0]["consensus_members"].split())
        out.append(f"| {split} | {cond} | {fam} | {members} | {auc(sel, 'pl1_norm')} | {auc(sel, 'consensus_specific_pl1')} | "
                   f"{counts(sel, lambda r: r['consensus_specific_verdict'] == 'trojaned')} | "
                   f"{counts(sel, lambda r: plain[id(r)])} | {counts(sel, lambda r: agreed[id(r)])} | "
                   f"{edge(sel, 'consensus_specific_pl1')} |")
    return "\n".join(out) + "\n"


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", action="append", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a.zoo, a.out)
    print(json.dumps({"wrote": [str(a.out / "transfer.csv"), str(a.out / "TRANSFER.md")]}))


if __name__ == "__main__":
    main()
