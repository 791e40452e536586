"""Quality and speed of DECREE on a zoo of labelled encoders: the `fast` profile against the paper's settings.

One run scans every encoder of a zoo (decree.zoo layout: manifest.jsonl, encoders/, shadow.npz) with every
profile, interleaved per encoder (encoder 1 fast, encoder 1 paper, encoder 2 fast, ...) so background load
hits both profiles alike and their speed ratio is measured side by side. Each finished encoder×profile row is
appended to OUT/encoders.csv at once; a rerun skips the rows already there for the same zoo, configuration
and device. Outputs: results.json, encoders.csv, RESULTS.md, roc.png, profile.txt (see benchmark_report).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .encoders import create_encoder
from .inversion import InversionConfig, invert
from .scoring import score
from .shadow import ShadowSet

FAMILIES = ("image-on-image", "image-on-pair", "text-on-pair")
PAIR_FAMILIES = ("image-on-pair", "text-on-pair")
DEFAULT_PAPER_MAX_STEPS = 1200
FPR_TARGET = 0.05
CSV_FIELDS = (
    "id", "families", "attack", "label", "arch", "profile", "status", "pl1_norm", "score_pl1", "l1_norm",
    "similarity", "reached_tau", "steps", "epochs", "seconds", "load_seconds", "verdict", "threshold", "device",
    "zoo", "zoo_hash", "config_hash", "error", "shadow", "condition", "split", "zoo_family", "bucket", "image_size",
)
DEFAULT_SHADOWS = ("shadow.npz",)

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- the zoo


def read_zoo(zoo_dir: str | Path) -> list[dict]:
    path = Path(zoo_dir) / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.jsonl in {zoo_dir}: not a zoo folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_zoos(zoo_dirs) -> list[dict]:
    """Entries of one or more zoos (e.g. an image-on-image zoo and a CLIP zoo), each tagged with its folder.

    Zoos built with other seeds reuse ids (`i2i-00` ...): when any id is in two zoos, every id is qualified by its
    zoo's folder name (`zoo-report/i2i-00`); folders of the same name are then an error."""
    dirs = [Path(zoo_dirs)] if isinstance(zoo_dirs, (str, Path)) else [Path(z) for z in zoo_dirs]
    per = [(zoo, read_zoo(zoo)) for zoo in dirs]
    ids = [e["id"] for _, es in per for e in es]
    qualify = len(ids) != len(set(ids))
    if qualify and len({z.name for z in dirs}) != len(dirs):
        raise ValueError(f"encoder ids repeat across zoos whose folders share a name: {[str(z) for z in dirs]}")
    return [{**e, "id": f"{zoo.name}/{e['id']}" if qualify else e["id"], "_zoo": zoo} for zoo, es in per for e in es]


def families_of(entry: dict) -> tuple[str, ...]:
    """The benchmark families an encoder counts in.

    A trojan counts in its attack's family (BadEncoder on an image encoder: image-on-image). A clean encoder
    counts in every family of its architecture: a clean CLIP tower is a negative for both CLIP attacks.
    """
    arch = str(entry.get("arch", ""))
    clip = arch.startswith("open_clip/") or entry.get("family") == "clip"
    attack = entry.get("attack")
    if entry.get("label") == "trojaned":
        if attack in FAMILIES:
            return (attack,)
        return ("image-on-pair",) if clip else ("image-on-image",)
    return PAIR_FAMILIES if clip else ("image-on-image",)


def select_entries(entries: list[dict], families: Iterable[str] | None = None, limit: int | None = None) -> list[dict]:
    """Filter by family ("clip" = both pair families) and keep at most `limit`, balanced over family×label."""
    if families:
        wanted = set()
        for f in families:
            wanted.update(PAIR_FAMILIES if f == "clip" else (f,))
        unknown = wanted - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown families {sorted(unknown)}; choose from {FAMILIES} or 'clip'")
        entries = [e for e in entries if wanted.intersection(families_of(e))]
    if limit is None or limit >= len(entries):
        return list(entries)
    # Round-robin over (family, label) groups so a limited run still has positives and negatives.
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault((families_of(e)[0], e.get("label")), []).append(e)
    picked, queues = [], [list(g) for _, g in sorted(groups.items())]
    while len(picked) < limit and any(queues):
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    order = {id(e): i for i, e in enumerate(entries)}
    return sorted(picked, key=lambda e: order[id(e)])


def zoo_hash(zoo_dir: str | Path) -> str:
    """Content hash of the manifest, the shadow set and every checkpoint: a rebuilt zoo is a new zoo."""
    zoo = Path(zoo_dir)
    h = hashlib.sha256()
    photos = [zoo / "shadow-photos.npz"] if (zoo / "shadow-photos.npz").is_file() else []
    for path in [zoo / "manifest.jsonl", zoo / "shadow.npz", *photos, *(zoo / e["uri"] for e in read_zoo(zoo))]:
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def config_hash(cfg: InversionConfig, device: str) -> str:
    config = cfg.to_dict()
    if not config["screen_images"]:  # screen off: the same search as before the screen existed, the same hash
        del config["screen_images"], config["screen_side"]
    blob = json.dumps({"config": config, "device": device, "decree": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def profile_configs(profiles, fast_overrides=None, paper_overrides=None,
                    paper_max_steps: int | None = DEFAULT_PAPER_MAX_STEPS) -> dict[str, InversionConfig]:
    configs = {}
    for p in profiles:
        overrides = dict(fast_overrides or {}) if p == "fast" else {}
        if p.startswith("paper"):
            # The paper's schedule runs up to 1000 epochs; a step cap keeps the benchmark bounded on CPU.
            overrides = {"max_steps": paper_max_steps, **(paper_overrides or {})}
        configs[p] = InversionConfig.from_profile(p, **overrides)
    return configs


# ------------------------------------------------------------------------------------------ the CSV rows


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _coerce(row: dict) -> dict:
    """CSV strings -> typed values (rows read back on resume look like fresh ones)."""
    out = dict(row)
    for k in ("pl1_norm", "score_pl1", "l1_norm", "similarity", "seconds", "load_seconds", "threshold"):
        v = out.get(k)
        out[k] = float(v) if v not in (None, "") else None
    for k in ("steps", "epochs", "image_size"):
        v = out.get(k)
        out[k] = int(float(v)) if v not in (None, "") else None
    rt = out.get("reached_tau")
    out["reached_tau"] = rt if isinstance(rt, bool) else (str(rt) == "True")
    return out


class RowLog:
    """encoders.csv, appended and flushed row by row; rows of another zoo/config are moved aside."""

    def __init__(self, path: Path, keys: dict[tuple[str, str], str], resume: bool = True):
        self.path = path
        old = _read_rows(path) if resume else []
        self.done = {}
        stale = []
        for r in old:
            if r.get("status") == "ok" and keys.get((r.get("zoo_hash"), r.get("profile"))) == r.get("config_hash"):
                self.done[(r["id"], r["profile"], r.get("shadow") or DEFAULT_SHADOWS[0])] = _coerce(r)
            else:
                stale.append(r)
        if path.is_file() and (stale or not resume):
            path.replace(path.with_suffix(".previous.csv"))
        if not path.is_file() or stale or not resume:
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.done.values())

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore").writerow(row)
            fh.flush()
            os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------ scans


def scan_row(entry: dict, shadow: ShadowSet, profile: str, cfg: InversionConfig, device: torch.device,
             threshold: float, shadow_file: str = DEFAULT_SHADOWS[0]) -> dict:
    """One encoder × one profile × one shadow set -> a CSV row; a failure becomes an error row, never an abort."""
    from .generalization import bucket_of, condition_of, zoo_split

    zoo = entry["_zoo"]
    row = {"id": entry["id"], "zoo": str(zoo), "families": "|".join(families_of(entry)), "attack": entry.get("attack") or "",
           "label": entry.get("label", ""), "arch": entry.get("arch", ""), "profile": profile,
           "device": str(device), "threshold": threshold, "shadow": shadow_file,
           "condition": condition_of(shadow_file), "split": zoo_split(zoo),
           "zoo_family": entry.get("family") or "", "bucket": bucket_of(entry) or "",
           "image_size": entry.get("image_size")}
    t0 = time.perf_counter()
    try:
        enc = create_encoder(entry["arch"], zoo / entry["uri"], image_size=entry.get("image_size"),
                             mean=entry.get("mean"), std=entry.get("std"))
        pixels = shadow.pixels(enc.preprocess.image_size, device)
        load_s = time.perf_counter() - t0
        res = invert(enc, pixels, cfg, device=device)
        scored = score(res, threshold)
        verdict = scored.verdict
        row["threshold"] = scored.threshold
    except Exception as e:  # noqa: BLE001 - any failure of one encoder is that encoder's result
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:500], seconds=time.perf_counter() - t0)
        row["_traceback"] = traceback.format_exc()
        return row
    # pl1_norm: the best mask, or the closest one when τ was never reached (the primary score, -PL1).
    # score_pl1: the verdict's reading, where an inversion that never reached τ found no trigger (PL1 1.0).
    row.update(status="ok", pl1_norm=res.pl1_norm, score_pl1=res.pl1_norm if res.reached_tau else 1.0,
               l1_norm=res.l1_norm, similarity=res.similarity, reached_tau=res.reached_tau, steps=res.steps,
               epochs=res.epochs, seconds=res.seconds, load_seconds=load_s, verdict=verdict, error="")
    return row


# ---------------------------------------------------------------------------------------------- metrics


def roc_metrics(labels: list[int], pl1: list[float]) -> dict:
    """ROC-AUC and TPR at 5% FPR of score = -PL1 (a smaller trigger is more suspicious); trojaned = 1."""
    from sklearn.metrics import roc_auc_score, roc_curve

    n_pos, n_neg = sum(labels), len(labels) - sum(labels)
    out = {"n_clean": n_neg, "n_trojaned": n_pos, "auc": None, "tpr_at_5fpr": None, "roc": None}
    if n_pos == 0 or n_neg == 0:
        return out
    s = -np.asarray(pl1, dtype=float)
    fpr, tpr, _ = roc_curve(labels, s)
    out["auc"] = float(roc_auc_score(labels, s))
    out["tpr_at_5fpr"] = float(max(t for f, t in zip(fpr, tpr) if f <= FPR_TARGET + 1e-12))
    out["roc"] = {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}
    return out


def _seconds(rows: list[dict]) -> dict:
    secs = [r["seconds"] for r in rows]
    if not secs:
        return {"mean": None, "median": None, "total": 0.0, "n": 0}
    return {"mean": statistics.fmean(secs), "median": statistics.median(secs), "total": sum(secs), "n": len(secs)}


def summarize(rows: list[dict], profiles: list[str], max_steps: dict[str, int | None] | None = None) -> dict:
    """Per-profile and per-family quality, speed and the agreement between the first two profiles."""
    ok = [r for r in rows if r.get("status") == "ok"]
    by_profile = {p: [r for r in ok if r["profile"] == p] for p in profiles}
    out: dict = {"families": {}, "profiles": {}}
    groups = {"overall": None, **{f: f for f in FAMILIES}}
    for group, fam in groups.items():
        g: dict = {}
        for p in profiles:
            sel = [r for r in by_profile[p] if fam is None or fam in r["families"].split("|")]
            y = [int(r["label"] == "trojaned") for r in sel]
            m = roc_metrics(y, [r["pl1_norm"] for r in sel])
            g.update({f"auc_{p}": m["auc"], f"tpr_at_5fpr_{p}": m["tpr_at_5fpr"], f"roc_{p}": m["roc"],
                      "n_clean": m["n_clean"], "n_trojaned": m["n_trojaned"]})
            # The verdict's reading: an inversion that never reached τ found no trigger (PL1 counted as 1.0).
            mt = roc_metrics(y, [r["score_pl1"] for r in sel])
            g.update({f"auc_tau_{p}": mt["auc"], f"tpr_at_5fpr_tau_{p}": mt["tpr_at_5fpr"]})
            if sel:
                g[f"accuracy_{p}"] = statistics.fmean(
                    float((r["verdict"] == "trojaned") == (r["label"] == "trojaned")) for r in sel)
        if group == "overall":
            out.update({k: v for k, v in g.items() if not k.startswith("roc_")})
            out["roc"] = {p: g[f"roc_{p}"] for p in profiles}
        elif g["n_clean"] or g["n_trojaned"]:
            out["families"][group] = g
    for p in profiles:
        sec = _seconds(by_profile[p])
        steps = [r["steps"] for r in by_profile[p]]
        out["profiles"][p] = {"seconds": sec, "mean_steps": statistics.fmean(steps) if steps else None,
                              "reached_tau": sum(bool(r["reached_tau"]) for r in by_profile[p]),
                              # stopped by the step cap rather than by the profile's own early stop
                              "at_step_cap": sum(1 for r in by_profile[p] if (max_steps or {}).get(p)
                                                 and r["steps"] >= max_steps[p]),
                              "errors": sum(1 for r in rows if r["profile"] == p and r.get("status") != "ok")}
        out[f"seconds_per_encoder_{p}"] = sec["mean"]
        out[f"median_seconds_per_encoder_{p}"] = sec["median"]
    if len(profiles) >= 2:
        a, b = ("fast", "paper") if {"fast", "paper"} <= set(profiles) else profiles[:2]
        ra = {r["id"]: r for r in by_profile[a]}
        rb = {r["id"]: r for r in by_profile[b]}
        both = sorted(set(ra) & set(rb))
        out["verdict_agreement"] = statistics.fmean(float(ra[i]["verdict"] == rb[i]["verdict"]) for i in both) if both else None
        # over the encoders both profiles ran (a profile may skip some, e.g. paper at 224 px)
        sa, sb = _seconds([ra[i] for i in both]), _seconds([rb[i] for i in both])
        out["speedup"] = sb["mean"] / sa["mean"] if sa["mean"] and sb["mean"] else None
        out["speedup_median"] = sb["median"] / sa["median"] if sa["median"] and sb["median"] else None
        paired = [rb[i]["seconds"] / ra[i]["seconds"] for i in both if ra[i]["seconds"]]
        out["speedup_paired_median"] = statistics.median(paired) if paired else None
        out["speedup_of"] = f"{b}/{a}"
    ids = {r["id"]: r["label"] for r in ok}
    out["n_clean"] = sum(1 for v in ids.values() if v == "clean")
    out["n_trojaned"] = sum(1 for v in ids.values() if v == "trojaned")
    return out


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "decree": __version__, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "platform": platform.platform()}
    try:
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        env["loadavg_start"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ------------------------------------------------------------------------------------------------ the run


def run_benchmark(zoo_dir, out_dir: str | Path = "bench", profiles=("fast", "paper"), *,
                  paper_overrides: dict | None = None, fast_overrides: dict | None = None, device=None,
                  paper_max_steps: int | None = DEFAULT_PAPER_MAX_STEPS, limit: int | None = None,
                  families: Iterable[str] | None = None, threshold: float | None = None, resume: bool = True,
                  profile_steps: int = 5, shadows: Iterable[str] = DEFAULT_SHADOWS,
                  paper_max_size: int | None = None, paper_skip_archs: Iterable[str] = (), log: Log = _print) -> dict:
    """Scan every encoder of the zoo(s) with every profile on every shadow set its zoo has (`shadows`: file names
    in the zoo folder; the first is the condition RESULTS.md summarizes); write OUT/{results.json, encoders.csv,
    RESULTS.md, GENERALIZATION.md (with more than one condition or a tune/report split), roc.png, profile.txt};
    return the results dict. `zoo_dir`: a zoo folder or a list of them (ids must be distinct). `paper_max_size`:
    the paper profiles skip encoders with a larger input (a 224-px paper inversion is ~20 CPU-minutes);
    `paper_skip_archs`: ... and encoders whose arch starts with one of these (a CIFAR ResNet-18 paper run is
    ~4 CPU-minutes at the step cap)."""
    from . import generalization
    from .benchmark_report import profile_inversion, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    profiles = list(profiles)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    thr = None if threshold is None else float(threshold)  # None: each profile's own threshold
    entries = select_entries(read_zoos(zoo_dir), families, limit)
    if not entries:
        raise ValueError(f"no encoders to benchmark in {zoo_dir} (families={families}, limit={limit})")
    zoos = list(dict.fromkeys(e["_zoo"] for e in entries))
    configs = profile_configs(profiles, fast_overrides, paper_overrides, paper_max_steps)
    zhashes = {z: zoo_hash(z) for z in zoos}
    chashes = {p: config_hash(c, str(dev)) for p, c in configs.items()}
    keys = {(zh, p): ch for zh in zhashes.values() for p, ch in chashes.items()}
    rows_log = RowLog(out / "encoders.csv", keys, resume=resume)
    shadows = list(shadows)
    sets = {(z, s): ShadowSet(z / s) for z in zoos for s in shadows if (z / s).is_file()}
    if not any(k[1] == shadows[0] for k in sets):
        raise ValueError(f"no zoo has the shadow set {shadows[0]}")
    env = environment(dev)
    log(f"benchmark: {len(entries)} encoders x {profiles} on {dev} ({env['torch_threads']} threads), "
        f"zoo {', '.join(f'{z} ({h})' for z, h in zhashes.items())}, {len(rows_log.done)} rows already done")
    rows: list[dict] = []
    t_start = time.perf_counter()
    skip_archs = tuple(paper_skip_archs)

    def wanted(entry, p):
        if not p.startswith("paper"):
            return True
        too_big = paper_max_size and int(entry.get("image_size") or 0) > paper_max_size
        return not (too_big or (skip_archs and str(entry.get("arch") or "").startswith(skip_archs)))

    jobs = [(e, s, p) for e in entries for s in shadows if (e["_zoo"], s) in sets for p in profiles if wanted(e, p)]
    total = len(jobs)
    for entry, sfile, p in jobs:  # interleaved: both profiles see the same background load
        k = len(rows) + 1
        done = rows_log.done.get((entry["id"], p, sfile))
        if done is not None:
            rows.append(done)
            log(f"[{k}/{total}] {entry['id']} {sfile} {p}: done before (pl1 {done['pl1_norm']:.4f})")
            continue
        row = scan_row(entry, sets[(entry["_zoo"], sfile)], p, configs[p], dev, thr, sfile)
        row.update(zoo_hash=zhashes[entry["_zoo"]], config_hash=chashes[p])
        tb = row.pop("_traceback", None)
        rows_log.append(row)
        rows.append(row)
        elapsed = time.perf_counter() - t_start
        if row["status"] == "ok":
            log(f"[{k}/{total}] {entry['id']} {entry.get('label')} {row['condition']} {p}: pl1 {row['pl1_norm']:.4f} "
                f"sim {row['similarity']:.3f} tau {'yes' if row['reached_tau'] else 'no'} "
                f"{row['steps']} steps {row['seconds']:.1f}s -> {row['verdict']}  (elapsed {elapsed:.0f}s)")
        else:
            log(f"[{k}/{total}] {entry['id']} {p}: ERROR {row['error']}\n{tb or ''}")
    main_rows = [r for r in rows if (r.get("shadow") or shadows[0]) == shadows[0]]
    summary = summarize(main_rows, profiles, {p: c.max_steps for p, c in configs.items()})
    general = generalization.summarize(rows)
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "zoo": ", ".join(str(z) for z in zoos), "zoo_hash": "+".join(zhashes.values()),
        "zoos": {str(z): h for z, h in zhashes.items()}, "profiles_run": profiles,
        "threshold": thr, "thresholds": {p: (thr if thr is not None else configs[p].threshold) for p in profiles},
        "paper_max_steps": paper_max_steps, "fpr_target": FPR_TARGET,
        "configs": {p: c.to_dict() for p, c in configs.items()},
        "wall_seconds": time.perf_counter() - t_start,
        **env, "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, **summary,
        "errors": [{"id": r["id"], "profile": r["profile"], "error": r.get("error")} for r in rows
                   if r.get("status") != "ok"],
        "shadows": shadows, "paper_max_size": paper_max_size, "paper_skip_archs": list(skip_archs), "splits": {str(z): generalization.zoo_split(z) for z in zoos},
        "generalization": general,
    }
    if profile_steps and "fast" in configs:
        try:
            first = entries[0]
            results["profile"] = profile_inversion(first, sets[(first["_zoo"], shadows[0])], configs["fast"], out / "profile.txt",
                                                   steps=profile_steps)
        except Exception as e:  # noqa: BLE001 - the profile is a side product; the numbers stand without it
            results["profile"] = {"error": f"{type(e).__name__}: {e}"}
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1))
    write_report(results, main_rows, out)
    if len(shadows) > 1 or len(set(results["splits"].values())) > 1:
        (out / "GENERALIZATION.md").write_text(generalization.markdown(general, profiles))
    log(f"benchmark done in {results['wall_seconds']:.0f}s: " + ", ".join(
        f"auc_{p} {_fmt(results.get(f'auc_{p}'))}" for p in profiles) + f", speedup {_fmt(results.get('speedup'))}"
        f" -> {out}/results.json")
    return results


def rejudge(out_dir: str | Path) -> dict:
    """Re-derive the verdicts that come from the whole table (fleet and folder, decree.generalization) from
    OUT/encoders.csv: no zoo, no scan. Rewrites results.json's `generalization` and GENERALIZATION.md."""
    out = Path(out_dir)
    rows = [_coerce(r) for r in _read_rows(out / "encoders.csv")]
    if not rows:
        raise FileNotFoundError(f"no rows in {out / 'encoders.csv'}: run the benchmark first")
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    from . import generalization

    results["generalization"] = generalization.summarize(rows)
    results_path.write_text(json.dumps(_finite(results), indent=1))
    profiles = results.get("profiles_run") or sorted({r["profile"] for r in rows})
    (out / "GENERALIZATION.md").write_text(generalization.markdown(results["generalization"], profiles))
    return results


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _finite(obj):
    """JSON without NaN/Infinity (strict parsers reject them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj

