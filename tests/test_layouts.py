"""Checkpoints in their publishers' exact layouts load the same weights as the reference model, or are
refused with a one-line reason: MoCo v2/v3, DINO, timm train checkpoints (args + EMA), BYOL, BadEncoder's
and DECREE's CIFAR SimCLR encoders, TorchScript archives; files are recognized by content, not by name."""

import argparse

import pytest
import torch
import torchvision
from torch import nn

from decree.encoders import create_encoder
from decree.encoders.checkpoint import MAX_BLOCKED_SHOWN, read_state_dict
from decree.errors import CheckpointError, UnsafeCheckpointError

ARCH = "torchvision/resnet18"


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    enc = create_encoder(ARCH)
    for p in enc.backbone.parameters():
        p.data.normal_(0, 0.05)
    return enc


def _sd(enc):
    return dict(enc.backbone.state_dict())


def _same_weights(a, sd) -> bool:
    got = a.backbone.state_dict()
    return got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def _zeros(sd):
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def _optimizer_state(sd):
    params = [nn.Parameter(v.float().clone()) for v in list(sd.values())[:3]]
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


LAYOUTS = {
    # MoCo v2 release (moco_v2_800ep_pretrain.pth.tar): query encoder under module.encoder_q., its fc is the MLP
    "moco-v2.pth.tar": lambda sd: {"epoch": 800, "arch": "resnet50", "optimizer": _optimizer_state(sd),
                                   "state_dict": {**{f"module.encoder_q.{k}": v for k, v in sd.items()},
                                                  "module.encoder_q.fc.0.weight": torch.zeros(8, 512),
                                                  **{f"module.encoder_k.{k}": v * 0 for k, v in sd.items()},
                                                  "module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1)}},
    # MoCo v3: base_encoder (scanned) next to momentum_encoder (never mixed in)
    "moco-v3.pth.tar": lambda sd: {"epoch": 300, "arch": "resnet50", "optimizer": _optimizer_state(sd),
                                   "state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                                                  "module.base_encoder.fc.0.weight": torch.zeros(8, 512),
                                                  **{f"module.momentum_encoder.{k}": v * 0 for k, v in sd.items()},
                                                  "module.predictor.0.weight": torch.zeros(8, 8)}},
    # DINO checkpoint.pth: the teacher's backbone is the model; the student and args ride along
    "dino-checkpoint.pth": lambda sd: {"student": {**{f"module.backbone.{k}": v * 0 for k, v in sd.items()},
                                                   "module.head.last_layer.weight_g": torch.zeros(1, 1)},
                                       "teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                                                   "head.mlp.0.weight": torch.zeros(4, 512)},
                                       "optimizer": _optimizer_state(sd), "epoch": 100,
                                       "args": argparse.Namespace(arch="resnet18", out_dim=65536, lr=0.0005),
                                       "dino_loss": {"center": torch.zeros(1, 8)}},
    # timm's train.py: state_dict and state_dict_ema side by side, with args
    "timm-model_best.pth.tar": lambda sd: {"epoch": 10, "arch": "resnet18", "state_dict": sd,
                                           "state_dict_ema": _zeros(sd), "optimizer": _optimizer_state(sd),
                                           "args": argparse.Namespace(model="resnet18", lr=0.1), "metric": 71.2},
    # an EMA-only export (ModelEmaV2 keeps its module. prefix)
    "ema-only.pth": lambda sd: {"model_ema": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    # BYOL: the online network's encoder, never the target network
    "byol.pt": lambda sd: {"online_network": {**{f"encoder.{k}": v for k, v in sd.items()},
                                              "projector.net.0.weight": torch.zeros(4, 512)},
                           "target_network": {f"encoder.{k}": v * 0 for k, v in sd.items()}},
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_publisher_layouts_load_the_scanned_weights(tmp_path, reference, name):
    sd = _sd(reference)
    path = tmp_path / name
    torch.save(LAYOUTS[name](sd), path)
    assert _same_weights(create_encoder(ARCH, path), sd)


def test_argparse_namespace_is_allowed_only_for_our_own_load(tmp_path, reference):
    path = tmp_path / "with-args.pth"
    torch.save({"state_dict": _sd(reference), "args": argparse.Namespace(lr=0.1)}, path)
    create_encoder(ARCH, path)
    # the allow-list is scoped to the call: torch's own weights-only load still refuses it afterwards
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)


class _Gadget:
    def __reduce__(self):
        import os

        return (os.getcwd, ())  # harmless, and not a builtin that a Ray session patches (print)


def test_a_namespace_holding_code_is_still_refused(tmp_path, reference):
    path = tmp_path / "evil-args.pth"
    torch.save({"state_dict": _sd(reference), "args": argparse.Namespace(hook=_Gadget())}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|nt)\.getcwd"):
        create_encoder(ARCH, path)


def test_no_top_level_tensors_error_names_the_nested_dicts(tmp_path, reference):
    path = tmp_path / "odd.pth"
    torch.save({"weights": {"ours": {"conv1.weight": torch.zeros(1)}}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"nested dicts that hold tensors: weights\.ours \(1\)"):
        create_encoder(ARCH, path)


def test_torchscript_archive_is_refused_in_one_line(tmp_path):
    path = tmp_path / "ViT-B-32.pt"  # OpenAI's CLIP releases are TorchScript archives under such names
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), str(path))
    with pytest.raises(CheckpointError, match="TorchScript archive") as err:
        read_state_dict(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_blocked_names_are_capped_in_the_error(tmp_path):
    import pickle

    # a pickle that asks for many globals (as a TorchScript-like object graph does)
    body = b"".join(f"cmod{i}\nfn{i}\n".encode() + b"0" for i in range(40))
    path = tmp_path / "many.pt"
    path.write_bytes(b"\x80\x02" + body + pickle.dumps(None, protocol=2)[2:])
    with pytest.raises(UnsafeCheckpointError) as err:
        read_state_dict(path)
    assert len(err.value.blocked) == 40
    assert f"and {40 - MAX_BLOCKED_SHOWN} more" in str(err.value) and "mod39.fn39" not in str(err.value)


def test_checkpoints_are_recognized_by_content_not_by_name(tmp_path, reference):
    sd = _sd(reference)
    odd = tmp_path / "weights.model"
    torch.save({"state_dict": sd}, odd)
    assert _same_weights(create_encoder(ARCH, odd), sd)
    (tmp_path / "notes.model").write_text("not weights")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        create_encoder(ARCH, tmp_path / "notes.model")


def test_folder_scan_lists_pth_tar_and_unnamed_checkpoints_and_names_the_rest(tmp_path, reference):
    from decree_ray.sources import SourceStats, iter_tasks

    torch.save({"state_dict": _sd(reference)}, tmp_path / "model_best.pth.tar")
    torch.save({"state_dict": _sd(reference)}, tmp_path / "checkpoint_0199")  # no suffix at all
    (tmp_path / "model_best.pth.tar.json").write_text('{"arch": "torchvision/resnet18"}')
    (tmp_path / "README.md").write_text("# weights")
    stats = SourceStats()
    tasks = {t.id: t for t in iter_tasks(str(tmp_path), stats=stats)}
    assert {k for k, t in tasks.items() if t.status == "pending"} == {"model_best.pth.tar", "checkpoint_0199"}
    assert tasks["README.md"].status == "skipped" and "not a checkpoint" in tasks["README.md"].error
    assert stats.skipped_keys == 1 and stats.skipped_examples == [str(tmp_path / "README.md")]


# ------------------------------------------------------------------ the paper's CIFAR SimCLR encoders


class _BadEncoderSimCLR(nn.Module):
    """BadEncoder's models/simclr_model.py layout, rebuilt here: f.f = Sequential of a torchvision ResNet's
    children with a 3x3 stride-1 conv1, no max-pool and no fc; g = the projection head."""

    def __init__(self, depth: str):
        super().__init__()
        net = getattr(torchvision.models, depth)()
        children = []
        for name, module in net.named_children():
            if name == "conv1":
                module = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
                children.append(module)
        self.f = nn.Module()
        self.f.f = nn.Sequential(*children)
        dim = 2048 if depth == "resnet50" else 512
        self.g = nn.Sequential(nn.Linear(dim, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 128))

    def features(self, x):
        return torch.flatten(self.f.f(x), 1)


@pytest.mark.parametrize("depth", ["resnet18", "resnet34", "resnet50"])
def test_badencoder_cifar_simclr_checkpoints_load_and_embed_like_the_original(tmp_path, depth):
    torch.manual_seed(1)
    model = _BadEncoderSimCLR(depth).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so a misplaced layer shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "model_200.pth"
    torch.save({"epoch": 200, "state_dict": model.state_dict(), "optimizer": _optimizer_state(model.state_dict())}, path)
    enc = create_encoder(f"cifar/{depth}", path)
    assert enc.preprocess.image_size == 32 and enc.preprocess.mean == (0.4914, 0.4822, 0.4465)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), model.features(x), rtol=1e-4, atol=1e-5)


def test_decree_backdoored_resnet50_layout_without_the_inner_f_loads(tmp_path):
    torch.manual_seed(2)
    model = _BadEncoderSimCLR("resnet50").eval()
    sd = {f"f.{k}": v for k, v in model.f.f.state_dict().items()}
    sd.update({f"g.{k}": v for k, v in model.g.state_dict().items()})
    path = tmp_path / "backdoored_resnet50.pth"
    torch.save({"state_dict": sd}, path)
    enc = create_encoder("cifar/resnet50-stl10", path)
    assert enc.preprocess.mean[0] == pytest.approx(0.44087798)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), model.features(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ torchvision heads


TORCHVISION_FAMILIES = ["resnet18", "convnext_tiny", "vgg11", "alexnet", "mobilenet_v3_small", "efficientnet_b0",
                        "vit_b_16", "swin_t", "maxvit_t", "densenet121", "regnet_x_400mf", "mnasnet0_5",
                        "shufflenet_v2_x0_5", "googlenet", "inception_v3"]


@pytest.mark.parametrize("name", TORCHVISION_FAMILIES)
def test_torchvision_embedding_is_the_input_of_the_final_classifier_layer(name):
    torch.manual_seed(0)
    full = torchvision.models.get_model(name, weights=None).eval()
    enc = create_encoder(f"torchvision/{name}")
    assert not enc.backbone.load_state_dict(full.state_dict(), strict=False).missing_keys
    final = [m for m in full.modules() if isinstance(m, nn.Linear)][-1]
    seen = {}
    final.register_forward_hook(lambda m, inputs, out: seen.setdefault("x", inputs[0]))
    size = enc.preprocess.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full(x)
        got = enc(x)
    want = seen["x"].flatten(1)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_convnext_keeps_its_final_layernorm():
    enc = create_encoder("torchvision/convnext_tiny")
    assert "classifier.0.weight" in enc.backbone.state_dict()  # the LayerNorm before the dropped Linear
