"""Shadow sets: every accepted format reads to the same pixels; bad input is a clear ShadowError."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from decree.errors import ShadowError
from decree.shadow import ShadowSet, load_shadow, read_images


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(5, 20, 20, 3), dtype=np.uint8)


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_npz_and_parquet_read_the_same_images(tmp_path, images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(_png(im))
    (folder / "notes.txt").write_text("not an image")
    np.savez(tmp_path / "s.npz", x=images)
    pq.write_table(pa.table({"image": [_png(im) for im in images]}), tmp_path / "s.parquet")
    for src in (folder, tmp_path / "s.npz", tmp_path / "s.parquet"):
        assert np.array_equal(read_images(src), images), src


def test_grayscale_becomes_three_channels_and_is_resized(tmp_path):
    gray = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
    np.savez(tmp_path / "g.npz", x=gray)
    px = load_shadow(tmp_path / "g.npz", 32)
    assert px.shape == (4, 3, 32, 32) and px.dtype == torch.float32
    assert torch.equal(px[:, 0], px[:, 1]) and torch.equal(px[:, 1], px[:, 2])
    assert 0.0 <= float(px.min()) and float(px.max()) <= 1.0


def test_limit_keeps_a_seeded_subset(tmp_path, images):
    np.savez(tmp_path / "s.npz", x=images)
    a = load_shadow(tmp_path / "s.npz", 20, limit=3, seed=1)
    b = load_shadow(tmp_path / "s.npz", 20, limit=3, seed=1)
    assert a.shape[0] == 3 and torch.equal(a, b)


def test_shadow_set_caches_pixels_per_size(images):
    s = ShadowSet(images)
    assert s.pixels(16) is s.pixels(16)
    assert s.pixels(24).shape == (5, 3, 24, 24)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: np.savez(p / "s.npz", x=np.zeros((0, 8, 8, 3), np.uint8)) or p / "s.npz", "empty"),
        (lambda p: np.savez(p / "s.npz", x=np.zeros((4, 8, 8, 3), np.float32)) or p / "s.npz", "uint8"),
        (lambda p: np.savez(p / "s.npz", y=np.zeros((4, 8, 8, 3), np.uint8)) or p / "s.npz", "no array 'x'"),
        (lambda p: np.savez(p / "s.npz", x=np.zeros((4, 8, 8, 5), np.uint8)) or p / "s.npz", "N,H,W,3"),
        (lambda p: np.savez(p / "s.npz", x=np.zeros((1, 8, 8, 3), np.uint8)) or p / "s.npz", "at least 2"),
        (lambda p: ((p / "s.npz").write_bytes(b"PK\x03\x04 not really"), p / "s.npz")[1], "corrupt"),
        (lambda p: (p / "d").mkdir() or p / "d", "empty"),
        (lambda p: ((p / "d").mkdir(), (p / "d" / "a.png").write_bytes(b"\x89PNG broken"), p / "d")[2], "corrupt image"),
        (lambda p: p / "missing.npz", "not found"),
        (lambda p: ((p / "s.txt").write_text("x"), p / "s.txt")[1], "unsupported"),
    ],
    ids=["empty", "float", "no-x", "five-channels", "one-image", "corrupt-npz", "empty-folder", "corrupt-png", "missing", "txt"],
)
def test_bad_shadow_input_is_a_clear_error(tmp_path, make, match):
    with pytest.raises(ShadowError, match=match):
        load_shadow(make(tmp_path), 16)


def test_a_shadow_image_is_decoded_only_as_png_jpeg_bmp_or_webp_whatever_its_name(tmp_path):
    import pytest
    from PIL import Image

    from decree.errors import ShadowError
    from decree.shadow import read_images

    folder = tmp_path / "shadow"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / f"ok{i}.png")
    # an EPS/PostScript file named .png: PIL would hand it to Ghostscript
    (folder / "evil.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(ShadowError, match="PNG, JPEG, BMP or WEBP"):
        read_images(folder)
    (folder / "evil.png").unlink()
    Image.new("RGB", (8, 8)).save(folder / "gif.png", format="GIF")
    with pytest.raises(ShadowError):
        read_images(folder)


def test_one_huge_shadow_image_does_not_upscale_the_others_and_a_bomb_is_refused(tmp_path, monkeypatch):
    import pytest
    from PIL import Image

    import decree.shadow as shadow_mod
    from decree.errors import ShadowError

    folder = tmp_path / "shadow"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 12)).save(folder / f"small{i}.png")
    Image.new("RGB", (900, 700)).save(folder / "big.png")
    x = shadow_mod.read_images(folder)
    assert x.shape == (4, 12, 16, 3)  # the common size, not the largest
    monkeypatch.setattr(shadow_mod, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ShadowError, match="over 10000 pixels"):
        shadow_mod.read_images(folder)
