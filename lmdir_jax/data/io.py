"""Reading and writing images: the one place the project decodes or encodes an image file.

Images are float32 HxWx3 RGB in [0, 1]. `read_image` never raises on a bad file: it returns None for
anything that is not a readable image (0-byte, truncated, not an image, a decompression bomb beyond
PIL's guard), so callers can skip and count bad files. A file the user may not read is not a bad
file: it raises `DataError` ("permission denied", exit 1 in the CLI) naming the file. Palette, grayscale, alpha, 16-bit and EXIF
orientation are handled here so no caller has to.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lmdir_jax.errors import UsageError, permission_error
from lmdir_jax.outputs import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # re-exported
from lmdir_jax.outputs import atomic_write_bytes
from lmdir_jax.outputs import is_image_file as is_image_file  # re-exported

WRITE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # BT.601 R, G, B weights of a grayscale write


@dataclass
class LoadedImage:
    """A decoded image: RGB float32 HxWx3 in [0, 1] (colours as stored, alpha not composited),
    alpha float32 HxW in [0, 1] or None, the bit depth of the file (8 or 16), and whether the file
    was grayscale (its three channels are equal; write it back with `grayscale=True`)."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    grayscale: bool = False

    def composited(self, background: float = 1.0) -> np.ndarray:
        """The RGB image composited over a uniform background (white by default)."""
        if self.alpha is None:
            return self.rgb
        a = self.alpha[..., None]
        return (self.rgb * a + background * (1.0 - a)).astype(np.float32)


def check_image_name(path: str | Path) -> Path:
    """The path, or UsageError when its extension is not one `write_image` can write."""
    path = Path(path)
    if path.suffix.lower() not in WRITE_EXTENSIONS:
        raise UsageError(f"cannot write '{path.name}': use one of {', '.join(WRITE_EXTENSIONS)}")
    return path


def apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation tag (1..8) to an HxW[xC] array, as PIL's exif_transpose does."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return np.swapaxes(a, 0, 1)
    if orientation == 6:
        return np.rot90(a, -1)
    if orientation == 7:
        return np.rot90(np.swapaxes(a, 0, 1), 2)
    if orientation == 8:
        return np.rot90(a, 1)
    return a


def _file_bit_depth(im, path: Path) -> int:
    """16 for 16-bit-per-channel PNG/TIFF files (which PIL would silently reduce to 8 bits), else 8."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return 16
    if im.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(25)
        return 16 if len(head) == 25 and head[24] == 16 else 8
    if im.format == "TIFF":
        bits = im.tag_v2.get(258)  # BitsPerSample
        bits = bits[0] if isinstance(bits, tuple) else bits
        return 16 if bits == 16 else 8
    return 8


def _decode_cv2_16(path: Path) -> np.ndarray | None:
    """Decode a 16-bit file with OpenCV (keeps all 16 bits); RGB(A) or gray uint16."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    a = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if a is None:
        return None
    if a.ndim == 3 and a.shape[2] == 3:
        a = a[..., ::-1]
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[..., [2, 1, 0, 3]]
    return a


def _to_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == bool:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):  # PIL mode "I" holding 16-bit values
        return np.clip(a.astype(np.float32) / 65535.0, 0.0, 1.0)
    return np.clip(a.astype(np.float32), 0.0, 1.0)


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(rgb HxWx3, alpha HxW or None) from gray, gray+alpha, RGB or RGBA arrays."""
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2), None
    c = a.shape[2]
    if c == 1:
        return np.repeat(a, 3, axis=2), None
    if c == 2:
        return np.repeat(a[..., :1], 3, axis=2), a[..., 1]
    if c == 3:
        return a, None
    return a[..., :3], a[..., 3]


def load_image(path: str | Path) -> LoadedImage | None:
    """Decode any supported image file into a LoadedImage; None when it is not a readable image."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return None
        with open(path, "rb"):  # a refused permission is the user's to fix, not a bad image
            pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # raises DecompressionBombError past PIL's guard
                orientation = int(im.getexif().get(0x0112, 1) or 1)
                depth = _file_bit_depth(im, path)
                if depth == 16 and im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                    im.load()  # let PIL find truncation/bombs before OpenCV decodes it
                    a = _decode_cv2_16(path)
                    if a is None:
                        return None
                else:
                    im.load()
                    if im.mode == "P" or im.mode == "PA":
                        has_alpha = im.mode == "PA" or "transparency" in im.info
                        im = im.convert("RGBA" if has_alpha else "RGB")
                    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                        im = im.convert("RGB")
                    elif im.mode == "1":
                        im = im.convert("L")
                    elif im.mode == "F":
                        pass
                    a = np.asarray(im)
    except PermissionError:
        raise permission_error(path) from None
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError,
            EOFError, MemoryError):
        return None
    if a.size == 0 or a.ndim not in (2, 3):
        return None
    a = apply_orientation(a, orientation)
    grayscale = a.ndim == 2 or a.shape[2] in (1, 2)
    rgb, alpha = _split(a)
    rgb = np.ascontiguousarray(_to_float(rgb))
    alpha = None if alpha is None else np.ascontiguousarray(_to_float(alpha))
    return LoadedImage(rgb=rgb, alpha=alpha, bit_depth=depth, grayscale=grayscale)


def read_image(path: str | Path) -> np.ndarray | None:
    """Read an image as float32 HxWx3 RGB in [0, 1] (alpha composited over white); None if unreadable."""
    loaded = load_image(path)
    return None if loaded is None else loaded.composited()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def write_image(
    path: str | Path,
    img: np.ndarray,
    bit_depth: int = 8,
    alpha: np.ndarray | None = None,
    *,
    protect: tuple[str | Path, ...] | list[str | Path] = (),
    quality: int = 95,
    grayscale: bool = False,
) -> Path:
    """Write a float [0, 1] HxWx3 (or HxW, grayscale) image as png/jpg/tif/bmp/webp; 16-bit for png/tif.

    `protect` lists input paths that must never be overwritten (UsageError if `path` is one);
    `alpha` (HxW in [0, 1]) is written as a 4th channel where the format allows it (not jpg/bmp).
    `grayscale` writes the BT.601 luma of an RGB image, so a grayscale input comes back grayscale
    (one channel, or equal colour channels beside an alpha). Parent folders are created. Returns
    the path written.
    """
    import cv2

    path = check_image_name(path)
    ext = path.suffix.lower()
    for p in protect:
        if _same_file(path, Path(p)):
            raise UsageError(f"refusing to overwrite the input image {p}")
    if bit_depth not in (8, 16):
        raise UsageError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if bit_depth == 16 and ext not in (".png", ".tif", ".tiff"):
        bit_depth = 8  # jpg/bmp/webp are 8-bit formats
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 2:  # an HxW image is written as a grayscale file
        a, grayscale = np.repeat(a[..., None], 3, axis=2), True
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"write_image expects HxWx3 or HxW, got shape {a.shape}")
    if grayscale:
        a = a @ np.asarray(LUMA_WEIGHTS, np.float32)
        a = a[..., None] if alpha is None or ext in (".jpg", ".jpeg", ".bmp") else np.repeat(a[..., None], 3, axis=2)
    else:
        a = a[..., ::-1]  # RGB -> BGR for OpenCV
    if alpha is not None and ext not in (".jpg", ".jpeg", ".bmp"):
        a = np.concatenate([a, np.asarray(alpha, np.float32)[..., None]], axis=2)
    scale, dtype = (65535.0, np.uint16) if bit_depth == 16 else (255.0, np.uint8)
    q = np.round(np.clip(np.nan_to_num(a), 0.0, 1.0) * scale).astype(dtype)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext in (".jpg", ".jpeg") else []
    if ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 101]  # lossless
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(q), params)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.tobytes())  # a killed run leaves no half-written image
