"""The tests' tiny zoo (conftest's `zoo` fixture and the fault suite): real random-init encoders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_ARCH = "timm/test_resnet"  # 0.37M parameters: a real timm ResNet that scans in about a second on CPU
TINY_SIZE = 32


def write_encoder(path: Path, seed: int) -> Path:
    """A random-init TINY_ARCH checkpoint as safetensors (tensors made contiguous: encoders may be channels-last)."""
    import torch
    from safetensors.torch import save_file

    from decree.encoders import create_encoder

    torch.manual_seed(seed)
    sd = create_encoder(TINY_ARCH, image_size=TINY_SIZE).backbone.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def make_zoo(root: Path) -> Path:
    """root/encoders/enc{0,1,2}.safetensors + a byte-identical copy of enc0, shadow.npz, manifest.jsonl."""
    for i in range(3):
        write_encoder(root / "encoders" / f"enc{i}.safetensors", seed=i)
    (root / "encoders" / "copy-of-enc0.safetensors").write_bytes((root / "encoders" / "enc0.safetensors").read_bytes())
    rng = np.random.default_rng(0)
    np.savez(root / "shadow.npz", x=rng.integers(0, 256, (16, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8))
    labels = {"enc0": "trojaned", "enc1": "clean", "enc2": "clean", "copy-of-enc0": "trojaned"}
    with open(root / "manifest.jsonl", "w") as fh:
        fh.writelines(json.dumps({"id": name, "uri": f"encoders/{name}.safetensors", "arch": TINY_ARCH,
                                 "image_size": TINY_SIZE, "label": label}) + "\n" for name, label in labels.items())
    return root
