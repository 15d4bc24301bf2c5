"""Image I/O: formats, bit depths, alpha, EXIF orientation and files that are not images."""

import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from lmdir_jax.data.io import (
    IMAGE_EXTENSIONS,
    load_image,
    read_image,
    write_image,
)
from lmdir_jax.errors import UsageError


def _gradient(h=12, w=16):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x / (w - 1), y / (h - 1), (x + y) / (h + w - 2)], -1).astype(np.float32)


def _png_claiming(path, width, height):
    """A valid-looking PNG header that claims a huge size (decompression bomb)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp", ".webp"])
def test_lossless_roundtrip(tmp_path, ext):
    img = _gradient()
    write_image(tmp_path / f"a{ext}", img)
    back = read_image(tmp_path / f"a{ext}")
    assert back.dtype == np.float32 and back.shape == img.shape
    assert np.abs(back - img).max() <= 0.5 / 255 + 1e-6


def test_jpeg_roundtrip_is_close(tmp_path):
    img = _gradient(32, 32)
    write_image(tmp_path / "a.jpg", img)
    assert np.abs(read_image(tmp_path / "a.jpg") - img).mean() < 0.02


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_keeps_precision(tmp_path, ext):
    img = _gradient(20, 300)  # more than 256 distinct levels along x
    write_image(tmp_path / f"a{ext}", img, bit_depth=16)
    loaded = load_image(tmp_path / f"a{ext}")
    assert loaded.bit_depth == 16
    assert np.abs(loaded.rgb - img).max() <= 0.5 / 65535 + 1e-6
    assert len(np.unique(loaded.rgb[0, :, 0])) > 256


def test_16bit_gray_png(tmp_path):
    g = (np.linspace(0, 65535, 400).reshape(20, 20)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g.png"), g)
    loaded = load_image(tmp_path / "g.png")
    assert loaded.bit_depth == 16 and loaded.rgb.shape == (20, 20, 3)
    np.testing.assert_allclose(loaded.rgb[..., 1], g / 65535.0, atol=1e-6)


def test_8bit_reports_depth_8(tmp_path):
    write_image(tmp_path / "a.png", _gradient())
    assert load_image(tmp_path / "a.png").bit_depth == 8


def test_grayscale_becomes_three_channels(tmp_path):
    Image.fromarray(np.full((5, 7), 128, np.uint8), "L").save(tmp_path / "g.jpg")
    img = read_image(tmp_path / "g.jpg")
    assert img.shape == (5, 7, 3)
    assert np.allclose(img[..., 0], img[..., 2])


def test_palette_and_transparent_palette(tmp_path):
    rgb = (np.random.default_rng(0).integers(0, 4, (6, 6, 3)) * 80).astype(np.uint8)
    pal_im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_im.save(tmp_path / "p.png")
    img = read_image(tmp_path / "p.png")
    assert img.shape == (6, 6, 3)
    assert np.abs(img * 255 - np.asarray(pal_im.convert("RGB"))).max() < 1e-3

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    alpha = load_image(tmp_path / "pt.png").alpha
    assert alpha is not None and alpha[0, 0] == 0 and alpha[1, 1] == 1
    # read_image composites the transparent pixel over white
    assert np.allclose(read_image(tmp_path / "pt.png")[0, 0], 1.0)


def test_rgba_alpha_is_exposed_and_written_back(tmp_path):
    img = _gradient()
    alpha = np.zeros(img.shape[:2], np.float32)
    alpha[:, :8] = 1.0
    write_image(tmp_path / "a.png", img, alpha=alpha)
    loaded = load_image(tmp_path / "a.png")
    rgb, a = loaded.rgb, loaded.alpha
    assert np.abs(rgb - img).max() < 1 / 255 and np.array_equal(a, alpha)
    comp = read_image(tmp_path / "a.png")
    assert np.allclose(comp[:, 8:], 1.0) and np.abs(comp[:, :8] - img[:, :8]).max() < 1 / 255


@pytest.mark.parametrize("orientation,expect", [(6, (7, 4)), (8, (7, 4)), (3, (4, 7)), (1, (4, 7))])
def test_exif_rotation_is_applied(tmp_path, orientation, expect):
    a = np.zeros((4, 7, 3), np.uint8)
    a[0, 0] = 255  # marker in the stored top-left corner
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(tmp_path / "r.png", exif=exif)
    img = read_image(tmp_path / "r.png")
    assert img.shape[:2] == expect
    ref = np.asarray(
        __import__("PIL.ImageOps").ImageOps.exif_transpose(Image.open(tmp_path / "r.png"))
    )
    np.testing.assert_allclose(img, ref / 255.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "bomb", "missing"])
def test_unreadable_files_give_none(tmp_path, kind):
    p = tmp_path / "bad.png"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        write_image(tmp_path / "ok.jpg", np.random.default_rng(0).random((64, 64, 3)))
        data = (tmp_path / "ok.jpg").read_bytes()
        p = tmp_path / "bad.jpg"
        p.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        p.write_text("not an image at all")
    elif kind == "bomb":
        _png_claiming(p, 100_000, 100_000)
    assert read_image(p) is None
    assert load_image(p) is None


def test_write_refuses_to_overwrite_inputs(tmp_path):
    p = tmp_path / "in.png"
    write_image(p, _gradient())
    before = p.read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        write_image(tmp_path / "." / "in.png", _gradient() * 0, protect=[p])
    assert p.read_bytes() == before


def test_write_rejects_unknown_extension(tmp_path):
    with pytest.raises(UsageError):
        write_image(tmp_path / "a.gif", _gradient())


def test_extensions():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
