"""Encoder families, preprocessing, and the registry."""

import subprocess
import sys

import pytest
import torch

from decree.encoders import Preprocess, create_encoder, families, register_family
from decree.errors import ArchitectureError


@pytest.mark.parametrize(
    "arch,size,dim",
    [
        ("torchvision/resnet18", 224, 512),
        ("timm/tf_efficientnet_lite0", 224, 1280),
        ("open_clip/decree-tiny-clip", 32, 128),
        ("open_clip/RN50", 224, 1024),
    ],
)
def test_each_family_builds_an_embedding_model_with_its_preprocessing(arch, size, dim):
    enc = create_encoder(arch)
    assert enc.preprocess.image_size == size
    out = enc(torch.rand(2, 3, 64, 64) if arch.startswith(("torchvision", "timm")) else torch.rand(2, 3, size, size))
    assert out.shape == (2, dim)
    assert not any(p.requires_grad for p in enc.parameters()), "the inverter must not build weight gradients"
    assert not enc.training


def test_family_default_normalization_is_imagenet_or_open_clip():
    import open_clip

    assert create_encoder("torchvision/resnet18").preprocess.mean == (0.485, 0.456, 0.406)
    assert create_encoder("open_clip/decree-tiny-clip").preprocess.std == pytest.approx(open_clip.OPENAI_DATASET_STD)


def test_overrides_replace_only_what_is_given():
    base = create_encoder("timm/tf_efficientnet_lite0").preprocess
    enc = create_encoder("timm/tf_efficientnet_lite0", image_size=32, mean=None, std=[0.25])
    assert enc.preprocess == Preprocess(32, base.mean, (0.25, 0.25, 0.25))


def test_normalize_uses_the_encoders_own_mean_and_std():
    enc = create_encoder("torchvision/resnet18", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((1, 3, 4, 4), 0.75)
    assert torch.allclose(enc.normalize(x), torch.ones_like(x))


@pytest.mark.parametrize("arch", ["resnet18", "nope/resnet18", "timm/not_a_model", "torchvision/not_a_model", "open_clip/nope"])
def test_unknown_arch_is_an_architecture_error(arch):
    with pytest.raises(ArchitectureError):
        create_encoder(arch)


def test_registry_rejects_a_duplicate_family():
    assert {"timm", "torchvision", "open_clip"} <= set(families())
    with pytest.raises(ValueError, match="already registered"):
        register_family("timm")(lambda name: None)


@pytest.mark.parametrize(
    "override",
    [{"image_size": 1}, {"image_size": 0}, {"image_size": 100_000}, {"std": [float("inf")]}, {"std": [0.0]},
     {"mean": [float("nan")]}, {"mean": ["red"]}, {"image_size": "big"}],
)
def test_degenerate_preprocessing_is_refused_rather_than_scanned(override):
    with pytest.raises(ArchitectureError):
        create_encoder("torchvision/resnet18", **override)


def test_warming_an_arch_imports_only_its_registered_familys_library():
    """A worker imports the queued families' libraries at start; the arch is the audited party's string, so it must
    never name a module itself (`this` prints on import: a sentinel)."""
    code = (
        "import sys\n"
        "from decree.encoders.registry import warm_family\n"
        "assert 'timm' not in sys.modules\n"
        "assert warm_family('timm/test_resnet') and 'timm' in sys.modules\n"
        "assert not warm_family('this/x') and not warm_family('cifar/resnet18') and not warm_family('no-slash')\n"
        "assert 'this' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
