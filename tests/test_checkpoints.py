"""Checkpoints load safely, unwrap the common wrappers, and match the architecture strictly."""

import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from decree.encoders import create_encoder, scan_unsafe_globals
from decree.errors import CheckpointError, UnsafeCheckpointError

ARCH = "torchvision/resnet18"


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    enc = create_encoder(ARCH)
    for p in enc.backbone.parameters():
        p.data.normal_(0, 0.05)
    return enc


def _same_weights(a, b) -> bool:
    sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip(tmp_path, reference):
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in reference.backbone.state_dict().items()}, str(path))
    assert _same_weights(create_encoder(ARCH, path), reference)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"model": {f"backbone.{k}": v for k, v in sd.items()}},
        lambda sd: {"encoder": sd},
        # MoCo: the query encoder is the one to scan; the key encoder and the queue must be ignored.
        lambda sd: {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in sd.items()},
                                   **{f"module.encoder_k.{k}": v * 0 for k, v in sd.items()},
                                   "module.queue": torch.zeros(4, 4)}},
        # BadEncoder's SimCLR: f. is the backbone, g. the projection head.
        lambda sd: {"state_dict": {**{f"f.{k}": v for k, v in sd.items()}, "g.0.weight": torch.zeros(2, 2)}},
        lambda sd: {**sd, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)},
    ],
    ids=["module+state_dict", "model+backbone", "encoder", "moco", "badencoder-simclr", "classifier-head"],
)
def test_wrapped_checkpoints_load_to_the_same_weights(tmp_path, reference, wrap):
    path = tmp_path / "enc.pt"
    torch.save(wrap(reference.backbone.state_dict()), path)
    assert _same_weights(create_encoder(ARCH, path), reference)


def test_clip_checkpoint_loads_its_vision_tower_only(tmp_path):
    from decree.encoders import open_clip_model

    clip = open_clip_model("decree-tiny-clip")
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, path)
    enc = create_encoder("open_clip/decree-tiny-clip", path)
    assert torch.equal(enc.backbone.conv1.weight, clip.visual.conv1.weight)


def test_wrong_architecture_fails_naming_the_keys(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_encoder("open_clip/decree-tiny-clip").backbone.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys \[bn1\.bias.*unexpected keys \[class_embedding"):
        create_encoder(ARCH, path)


def test_shape_mismatch_is_an_error_not_a_random_init(tmp_path, reference):
    sd = dict(reference.backbone.state_dict())
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight"):
        create_encoder(ARCH, path)


def test_non_finite_weights_are_refused(tmp_path, reference):
    sd = dict(reference.backbone.state_dict())
    sd["conv1.weight"] = sd["conv1.weight"].clone()
    sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match="NaN"):
        create_encoder(ARCH, path)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04truncated"], ids=["empty", "garbage", "bad-zip"])
def test_corrupt_files_are_checkpoint_errors(tmp_path, content):
    for name in ("x.pt", "x.safetensors"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError):
            create_encoder(ARCH, tmp_path / name)


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Hostile(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="unsafe checkpoint") as err:
        create_encoder(ARCH, path)
    assert not marker.exists()
    assert any(name in ("posix.system", "os.system", "nt.system") for name in err.value.blocked), err.value.blocked


def test_legacy_pickle_with_exec_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    path = tmp_path / "evil.bin"

    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    with open(path, "wb") as fh:
        pickle.dump({"x": Exec()}, fh, protocol=2)
    with pytest.raises(UnsafeCheckpointError) as err:
        create_encoder(ARCH, path)
    assert not marker.exists()
    assert {"builtins.exec", "__builtin__.exec"} & set(err.value.blocked), err.value.blocked


def test_unsafe_globals_are_reported_as_data_without_loading(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Hostile(tmp_path / "never")}, path)
    assert zipfile.is_zipfile(path)
    assert scan_unsafe_globals(path) in (["posix.system"], ["os.system"], ["nt.system"])
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.zeros(2)}, clean)
    assert scan_unsafe_globals(clean) == []


def test_a_backbone_state_dict_saves_as_is_despite_channels_last(tmp_path, reference):
    path = tmp_path / "direct.safetensors"
    save_file(reference.backbone.state_dict(), str(path))  # no .contiguous() needed by callers
    assert _same_weights(create_encoder(ARCH, path), reference)


def test_the_core_refuses_a_checkpoint_over_max_bytes_before_reading_it(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from decree.scan import scan_encoder

    enc = create_encoder("timm/test_efficientnet", image_size=16)
    path = tmp_path / "big.safetensors"
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(path))
    import safetensors.torch

    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("read a file over the limit"))
    with pytest.raises(CheckpointError, match="over the limit"):
        scan_encoder(path, "timm/test_efficientnet", torch.rand(4, 3, 16, 16), max_bytes=path.stat().st_size - 1)
    monkeypatch.setattr(safetensors.torch, "load_file", real)
    assert create_encoder("timm/test_efficientnet", path, image_size=16, max_bytes=path.stat().st_size) is not None
