"""Third-party encoder families reach every process through the `decree.encoders` entry point group."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _install_plugin(site: Path, body: str, name: str = "decree_plugin_demo") -> None:
    """What `pip install` leaves behind: the package and its dist-info with entry_points.txt."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(textwrap.dedent(body))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[decree.encoders]\ndemo = {name}\n")


PLUGIN = '''
    import torch
    from torch import nn
    from decree.encoders import register_family
    from decree.encoders.registry import Preprocess

    @register_family("demo")
    def build(name):
        if name != "tiny":
            raise ValueError(name)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), Preprocess(16, (0.5,) * 3, (0.5,) * 3)
'''


def _run(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_installed_plugin_family_builds_loads_and_scans_with_no_import_by_the_user(tmp_path):
    site = tmp_path / "site"
    _install_plugin(site, PLUGIN)
    ckpt = tmp_path / "demo.safetensors"
    proc = _run(site, f'''
        import json, numpy as np, torch
        from safetensors.torch import save_file
        from decree.encoders import create_encoder, families
        from decree.scan import scan_encoder
        from decree.shadow import ShadowSet
        enc = create_encoder("demo/tiny")
        save_file({{k: v.contiguous() for k, v in enc.backbone.state_dict().items()}}, {str(ckpt)!r})
        np.savez({str(tmp_path / "s.npz")!r}, x=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
        from decree.inversion import InversionConfig
        r = scan_encoder({str(ckpt)!r}, "demo/tiny", ShadowSet({str(tmp_path / "s.npz")!r}),
                         config=InversionConfig.from_profile("fast", max_steps=2, min_steps=1, eval_images=8))
        print(json.dumps({{"families": families(), "size": enc.preprocess.image_size, "pl1": r.to_row()["pl1_norm"]}}))
    ''')
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "demo" in out["families"] and out["size"] == 16 and out["pl1"] > 0


def test_a_broken_plugin_is_reported_and_the_built_in_families_still_work(tmp_path):
    site = tmp_path / "site"
    _install_plugin(site, "raise RuntimeError('this plugin is broken')\n")
    proc = _run(site, '''
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from decree.encoders import create_encoder, families
            fams = families()
        assert "timm" in fams and "demo" not in fams, fams
        assert any("failed to load" in str(w.message) for w in caught), [str(w.message) for w in caught]
        create_encoder("cifar/resnet18")
        print("ok")
    ''')
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
