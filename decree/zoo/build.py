"""build_zoo: a benchmark of clean and trojaned encoders with a manifest, a shadow set and a build cache."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .data import make_splits
from .photos import TRAINED_ON_PHOTOS, natural_crops, natural_splits
from .spec import ZOO_CODE_VERSION, BuildContext, EncoderSpec, ZooConfig, digest

log = logging.getLogger("decree.zoo")

PHOTO_SHADOW = "shadow-photos.npz"
FAMILIES = ("image-on-image", "clip")  # what a build makes when no family is named
# Every family: its module and its id prefix. The order is part of each family's seed: never reorder, only append.
_TABLE = {"image-on-image": ("i2i", "i2i"), "clip": ("clip", "clip"), "i2i-large": ("i2i", "large"),
          "i2i-global": ("i2i", "glob"), "i2i-224": ("i2i", "r224"),
          "cifar-r18": ("cifar", "r18"), "i2i-shapes": ("i2i", "shape"), "i2i-long": ("i2i", "long"),
          "i2i-heavy": ("i2i", "heavy"), "i2i-drupe": ("i2i", "drupe"), "i2i-ctrl": ("i2i", "ctrl"),
          "clip-ctrl": ("clip", "clipctrl"),
          "clip-badclip": ("clip", "badclip"), "i2i-natural": ("i2i", "nat"), "cifar-natural": ("cifar", "r18n")}
# Families trained on another distribution than Fashion-MNIST; one zoo holds families of one training distribution
TRAIN_DATA = dict.fromkeys(TRAINED_ON_PHOTOS, "photos")
FMNIST_SHADOW = "shadow-fmnist.npz"  # a photo-trained zoo's out-of-distribution set: Fashion-MNIST's test images
PHOTO_SIZES = {"i2i-224": 224}  # photo crops are cut at the largest input size of the families built
ALL_FAMILIES = tuple(_TABLE)
_SHORT = {name: short for name, (_, short) in _TABLE.items()}


def _family_module(name: str):
    if name not in _TABLE:
        raise ValueError(f"unknown zoo family {name!r}; known: {ALL_FAMILIES}")
    import importlib

    return importlib.import_module(f".{_TABLE[name][0]}", __package__)


def train_data(families) -> str:
    """The one training distribution of a zoo's families ("fashion-mnist" or "photos")."""
    sources = {TRAIN_DATA.get(f, "fashion-mnist") for f in families}
    if len(sources) > 1:
        raise ValueError(f"families trained on different data ({', '.join(sorted(sources))}) go in different zoos: "
                         f"{', '.join(f for f in families if f in TRAIN_DATA)} apart from the others")
    return sources.pop() if sources else "fashion-mnist"


def build_params(clean: int, trojaned: int, families, seed: int, config: ZooConfig) -> dict:
    return {"clean": clean, "trojaned": trojaned, "families": list(families), "seed": seed,
            "config": config.recipe(families=families), "code": ZOO_CODE_VERSION}


def read_manifest(out: str | Path) -> list[dict]:
    path = Path(out) / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_cached(out: Path, params: dict) -> bool:
    try:
        meta = json.loads((out / "zoo.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("params_hash") != digest(params):
        return False
    try:
        entries = read_manifest(out)
    except (OSError, ValueError):
        return False
    shadows = ["shadow.npz", PHOTO_SHADOW] + ([FMNIST_SHADOW] if train_data(params["families"]) == "photos" else [])
    return all((out / f).is_file() for f in shadows) and all((out / e["uri"]).is_file() for e in entries)


def _assign_ids(specs: list[EncoderSpec], family: str, rng: np.random.Generator) -> dict:
    # ids are shuffled so that an id never gives a label away
    order = rng.permutation(len(specs))
    return {specs[i].key: f"{_SHORT[family]}-{rank:02d}" for rank, i in enumerate(order)}


def save_encoder(state: dict, path: Path, *, arch: str, eid: str) -> None:
    """Write a zoo checkpoint whose bytes depend on its weights alone. One metadata key: safetensors writes the
    metadata from a hash map, so two keys came out in either order and the same weights hashed differently."""
    save_file(state, str(path), metadata={"decree.zoo": json.dumps({"arch": arch, "id": eid}, sort_keys=True)})


def _build_one(module, spec: EncoderSpec, ctx: BuildContext, seed: int, cache: bool) -> dict:
    eid = ctx.ids[spec.key]
    spec_hash = spec.digest(ctx.cfg, seed)
    record_path = ctx.out / "records" / f"{eid}.json"
    ckpt = ctx.checkpoint(eid)
    if cache and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("spec_hash") == spec_hash and (ckpt.is_file() or not record.get("kept", True)):
            log.info("cached %s (%s)", eid, spec.label)
            return record
    log.info("building %s: %s %s (seed %d, lr %g, %d steps)", eid, spec.family, spec.label, spec.seed, spec.lr,
             spec.steps)
    state, fields = module.build(spec, ctx)
    kept = spec.label == "clean" or fields.get("attack_took", True)
    record = {"id": eid, "uri": f"encoders/{eid}.safetensors", "family": spec.family, "label": spec.label,
              "seed": spec.seed, "lr": spec.lr, "steps": spec.steps, **fields, "spec_hash": spec_hash, "kept": kept}
    if kept:
        tmp = ckpt.with_suffix(".tmp")
        save_encoder(state, tmp, arch=fields["arch"], eid=eid)
        tmp.replace(ckpt)
    else:
        ckpt.unlink(missing_ok=True)
        log.warning("dropped %s: attack strength %.3f < %.2f", eid, fields["attack_strength"], ctx.cfg.min_strength)
    record_path.write_text(json.dumps(record, indent=1))
    log.info("done %s in %.0fs: strength=%s fidelity=%.3f", eid, fields["seconds"], fields.get("attack_strength"),
             fields["clean_fidelity"])
    return record


def _write_data(out: Path, source: str, families, config: ZooConfig, seed: int):
    """The zoo's training splits, with its shadow sets written and described for zoo.json: (Splits, fields)."""
    n = config.n_shadow
    if source == "photos":
        # trained on photo crops: held-out crops are its in-distribution set (and its photos condition),
        # Fashion-MNIST's test images its out-of-distribution one
        splits = natural_splits(config.n_train, config.n_eval, n, seed=seed)
        np.savez_compressed(out / PHOTO_SHADOW, x=splits.shadow_x)
        np.savez_compressed(out / FMNIST_SHADOW, x=make_splits(0, 0, n, seed=seed).shadow_x)
        meta = {"shadow": {"n": n, "source": "photo crops drawn apart from the training crops"},
                "shadow_photos": {"file": PHOTO_SHADOW, "source": "the same as shadow.npz"},
                "shadow_fmnist": {"file": FMNIST_SHADOW, "source": "fashion-mnist test split"},
                "train_source": "crops of scikit-image / scikit-learn photos"}
    else:
        splits = make_splits(config.n_train, config.n_eval, n, seed=seed)
        # the out-of-distribution condition: natural-photo crops (a 32-px encoder sees them downsampled)
        photo_size = max([32, *(PHOTO_SIZES.get(f, 32) for f in families)])
        np.savez_compressed(out / PHOTO_SHADOW, x=natural_crops(n, photo_size, seed=seed))
        meta = {"shadow": {"n": n, "source": "fashion-mnist test split, disjoint from eval"},
                "shadow_photos": {"file": PHOTO_SHADOW, "source": "crops of scikit-image / scikit-learn photos"},
                "train_source": "fashion-mnist train split"}
    np.savez_compressed(out / "shadow.npz", x=splits.shadow_x)
    return splits, meta


def build_zoo(out: str | Path, *, clean: int = 8, trojaned: int = 8, families=FAMILIES, seed: int = 0,
              cache: bool = True, config: ZooConfig | None = None) -> Path:
    """Build (or reuse) a zoo of `clean` + `trojaned` encoders per family into `out`; returns `out`.

    Layout: encoders/<id>.safetensors (backbone state dict), manifest.jsonl, shadow.npz (x: uint8 N,H,W,3,
    disjoint from every image used to train or attack), zoo.json (parameter hash, timings), records/ (per-encoder
    build records: an interrupted build resumes where it stopped).
    """
    config = config or ZooConfig()
    families = tuple(families)
    for fam in families:
        _family_module(fam)  # fail early on an unknown family
    source = train_data(families)
    out = Path(out)
    params = build_params(clean, trojaned, families, seed, config)
    if cache and is_cached(out, params):
        log.info("zoo at %s is up to date (params %s)", out, digest(params))
        return out
    (out / "encoders").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(exist_ok=True)
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        splits, data_meta = _write_data(out, source, families, config, seed)
        records, timings, notes = [], {}, {}
        for fam in families:
            module = _family_module(fam)
            # seeded by the family's own place, so a family builds the same alone or beside others
            rng = np.random.default_rng([seed, ALL_FAMILIES.index(fam)])
            specs = module.plan(clean, trojaned, rng, config, family=fam)
            ctx = BuildContext(config, splits, out, ids=_assign_ids(specs, fam, rng))
            f0 = time.time()
            for spec in specs:  # clean ones come first: trojans start from them
                records.append(_build_one(module, spec, ctx, seed, cache))
            timings[fam] = round(time.time() - f0, 1)
            # e.g. how long the CLIP base took to train, when this run trained it
            notes[fam] = {k: v for k, v in ctx.cache.items() if isinstance(v, (int, float))}
    finally:
        torch.set_num_threads(threads)
    kept = sorted((r for r in records if r["kept"]), key=lambda r: r["id"])
    with open(out / "manifest.jsonl", "w") as fh:
        for r in kept:
            fh.write(json.dumps({k: v for k, v in r.items() if k not in ("spec_hash", "kept")}) + "\n")
    meta = {"params_hash": digest(params), "params": params, "seconds": round(time.time() - t0, 1),
            "family_seconds": timings, "family_notes": notes, "encoders": len(kept),
            "dropped": [r["id"] for r in records if not r["kept"]], **data_meta}
    (out / "zoo.json").write_text(json.dumps(meta, indent=1))
    return out
