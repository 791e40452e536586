"""Hugging Face cache folders as they are: `models--org--name/snapshots/<rev>/...` (a `~/.cache/huggingface/hub`
tree or a `huggingface-cli download --cache-dir` folder).

Snapshot files are symlinks into the repo's own `blobs/`; they are followed only inside that repo folder (the
listing never follows a link out of it), and `blobs/`, `refs/`, `.no_exist/` are the storage behind the
snapshots, never listed themselves. The encoder's id is `org/name@rev`; its architecture comes from the files the
publishers ship next to the weights: timm's `config.json` (`architecture`, `pretrained_cfg`) or open_clip's
`open_clip_config.json` (its `model_cfg`, matched to open_clip's built-in configs).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = re.compile(r"^models--[^/]+$")
STORAGE_DIRS = ("blobs", "refs", ".no_exist")
# The same weights in two formats: the loaders that consume a snapshot take the safetensors one.
TWINS = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
PRIMARY = ("model.safetensors.index.json", "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
           "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".tar", ".safetensors.index.json")
INDEX_SUFFIX = ".safetensors.index.json"  # decree.encoders.checkpoint.SHARD_INDEX_SUFFIX (kept torch-free here)
MAX_CONFIG_BYTES = 256 << 10


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    revision: str
    snapshot: Path
    name: str  # path inside the snapshot

    @property
    def encoder_id(self) -> str:
        """`org/name@rev` for the snapshot's main weights file, `org/name@rev/<file>` for any other."""
        return f"{self.repo_id}@{self.revision}" if self.name in PRIMARY else self.file_id

    @property
    def file_id(self) -> str:
        return f"{self.repo_id}@{self.revision}/{self.name}"


def repo_id(folder_name: str) -> str:
    """`models--timm--resnet50.a1_in1k` -> `timm/resnet50.a1_in1k` (the hub writes `/` as `--`)."""
    return "/".join(folder_name[len("models--"):].split("--"))


def hub_file(path: str) -> HubFile | None:
    parts = Path(path).parts
    for i in range(len(parts) - 3, -1, -1):
        if REPO_DIR.match(parts[i]) and parts[i + 1] == "snapshots" and i + 3 < len(parts):
            return HubFile(repo_id(parts[i]), parts[i + 2], Path(*parts[: i + 3]), "/".join(parts[i + 3:]))
    return None


def repo_root(folder: str) -> str | None:
    """The `models--*` folder that holds `folder` (or is it): the boundary its snapshot links may point into."""
    parts = Path(os.path.abspath(folder)).parts
    for i in range(len(parts) - 1, -1, -1):
        if REPO_DIR.match(parts[i]):
            return str(Path(*parts[: i + 1]))
    return None


def is_storage_dir(parent: str, name: str) -> bool:
    return name in STORAGE_DIRS and REPO_DIR.match(os.path.basename(parent)) is not None


def is_weights(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES)


def skip_reason(path: str, hf: HubFile | None) -> str | None:
    """Why a weights file is not scanned on its own, else None: a shard named by an index beside it (scanned
    as one checkpoint), or in a hub snapshot the .bin twin of a safetensors file (what loaders take)."""
    folder, name = os.path.split(path)
    siblings = _siblings(Path(folder))
    twin = TWINS.get(name) if hf is not None else None
    if twin and twin in siblings:
        return f"the same weights as {twin} in this snapshot, which is scanned"
    if name.endswith(".safetensors"):
        for index in sorted(s for s in siblings if s.endswith(INDEX_SUFFIX)):
            if name in _shards(Path(folder) / index):
                return f"a shard of {index}, scanned as one checkpoint"
    return None


def _siblings(snapshot: Path) -> set[str]:
    try:
        return set(os.listdir(snapshot))
    except OSError:
        return set()


def _shards(index: Path) -> set[str]:
    """The shard names an index lists (as the core's loader reads and checks them), or none if it is broken."""
    from decree.encoders.checkpoint import shard_files
    from decree.errors import CheckpointError

    try:
        return {p.name for p in shard_files(index)}
    except (OSError, CheckpointError):
        return set()


def _read_json(path: Path) -> dict | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def hub_metadata(hf: HubFile) -> dict | None:
    """{arch, image_size, mean, std} from the snapshot's timm or open_clip config, or None."""
    timm_cfg = _read_json(hf.snapshot / "config.json")
    if timm_cfg and isinstance(timm_cfg.get("architecture"), str):
        pre = timm_cfg.get("pretrained_cfg") if isinstance(timm_cfg.get("pretrained_cfg"), dict) else {}
        size = pre.get("input_size")
        return {"arch": f"timm/{timm_cfg['architecture']}",
                "image_size": size[-1] if isinstance(size, list) and size else None,
                "mean": pre.get("mean"), "std": pre.get("std")}
    clip_cfg = _read_json(hf.snapshot / "open_clip_config.json")
    if clip_cfg and isinstance(clip_cfg.get("model_cfg"), dict):
        name = _open_clip_name(clip_cfg["model_cfg"])
        if name is None:
            raise ValueError("open_clip_config.json: its model_cfg matches no open_clip built-in config")
        pre = clip_cfg.get("preprocess_cfg") if isinstance(clip_cfg.get("preprocess_cfg"), dict) else {}
        vision = clip_cfg["model_cfg"].get("vision_cfg") or {}
        size = vision.get("image_size") if isinstance(vision, dict) else None
        return {"arch": f"open_clip/{name}", "image_size": size if isinstance(size, int) else None,
                "mean": pre.get("mean"), "std": pre.get("std")}
    return None


def _open_clip_name(model_cfg: dict) -> str | None:
    import open_clip

    for name in open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return name
    return None
