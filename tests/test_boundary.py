"""decree/ is plain PyTorch: the scale layer's dependencies must never leak into it."""

import subprocess
import sys

FORBIDDEN = ("ray", "boto3", "botocore", "pyarrow", "typer")


def test_core_imports_none_of_the_scale_layer_dependencies():
    code = (
        "import sys, pkgutil, importlib, decree\n"
        "for m in pkgutil.walk_packages(decree.__path__, 'decree.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted({{n.split('.')[0] for n in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"decree/ imported {out.stdout.strip()}"
