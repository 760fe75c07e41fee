"""What the service accepts: size limits, label rules and safe decoding of images and arrays.

Everything here is pure (no HTTP, no model): an upload becomes a uint8 image of the model's
colour mode, or a numpy array, or a :class:`ServeError` with the HTTP status it deserves.
"""

from __future__ import annotations

import io
import json
import math
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edgekt.errors import EdgektError

# Image formats a camera, a browser or a script sends; others (SVG, PDF, EPS...) are refused
# before any decoder runs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class ServeError(EdgektError):
    """A request the service refuses; ``status`` is the HTTP status code, ``code`` a stable
    machine-readable name."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def too_large(message: str) -> ServeError:
    return ServeError(message, 413, "payload_too_large")


def unsupported(message: str) -> ServeError:
    return ServeError(message, 415, "unsupported_media_type")


def invalid(message: str) -> ServeError:
    return ServeError(message, 422, "invalid_input")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may cost the device."""

    max_body_bytes: int = 8 * 2**20
    """Largest request body (all images of an enrollment together)."""
    max_pixels: int = 24_000_000
    """Largest image (width x height) decoded: refuses decompression bombs from the header,
    before any pixel is decoded."""
    max_images: int = 32
    """Most images in one enrollment."""
    max_label_chars: int = 64
    max_array_values: int = 4_000_000
    """Most numbers in a raw array (JSON or .npy) input."""

    def __post_init__(self) -> None:
        bad = [k for k, v in vars(self).items() if not (isinstance(v, int) and v > 0)]
        if bad:
            raise EdgektError(f"serve limits must be positive integers: {bad}")


def check_label(label: object, limits: Limits) -> str:
    """A label is data: a short printable string. Returns it unchanged, or raises 422.

    Labels never reach a file name or a path, but they reach logs, pages and MQTT topics'
    payloads, so control and format characters (newlines, bidi overrides, NUL) are refused.
    """
    if not isinstance(label, str) or not label.strip():
        raise invalid(f"a label must be a non-empty string, got {_short(label)}")
    if len(label) > limits.max_label_chars:
        raise invalid(f"a label may have at most {limits.max_label_chars} characters, got "
                      f"{len(label)}")
    if label != label.strip():
        raise invalid(f"a label may not start or end with white space: {label!r}")
    bad = sorted({c for c in label if unicodedata.category(c)[0] == "C"})
    if bad:
        names = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
        raise invalid(f"a label may not contain control or format characters ({names})")
    return label


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def decode_image(data: bytes, *, mode: Literal["L", "RGB"], size: tuple[int, int] | None,
                 limits: Limits, name: str = "image") -> np.ndarray:
    """Decode an uploaded image file to a uint8 array (H, W) for ``L`` or (H, W, 3) for ``RGB``.

    The image is turned upright (EXIF orientation, as phones write it) and resized to ``size``
    (height, width) with Pillow's bilinear filter, the resize the runtime itself would do.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise invalid(f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the policy; Pillow's bomb warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise unsupported(f"{name} is not an image in a supported format "
                          f"({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise too_large(f"{name}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise invalid(f"{name} cannot be read as an image ({exc})") from None
    with img:
        w, h = img.size
        if w * h > limits.max_pixels:
            raise too_large(f"{name} is {w}x{h} pixels ({w * h / 1e6:.1f} MP); the limit is "
                            f"{limits.max_pixels / 1e6:.1f} MP (a larger image, or a "
                            "decompression bomb)")
        if w == 0 or h == 0:
            raise invalid(f"{name} has no pixels ({w}x{h})")
        try:
            if size is not None and img.format == "JPEG":
                # Let the JPEG decoder scale down by 2/4/8 first: a 12 MP photo decodes fast.
                img.draft(mode, (size[1] * 2, size[0] * 2))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = img.convert(mode)
            if size is not None and (img.height, img.width) != tuple(size):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
        except Image.DecompressionBombError as exc:
            raise too_large(f"{name}: {exc}") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise invalid(f"{name} is damaged or truncated ({exc})") from None
    return arr


# The header numpy itself writes for a plain C-order array (format 1.0 or 2.0): parsed with one
# regular expression instead of np.load's ast.literal_eval, which costs ~50 us per request.
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[uif][1248])', 'fortran_order': False, "
    rb"'shape': \(((?:\d{1,18}, ?)*\d{0,18})\), \} *\n")


def _npy_fast(data: bytes) -> np.ndarray | None:
    """The array of a plain numeric C-order ``.npy``, or None (then np.load decides)."""
    if data[:6] != b"\x93NUMPY" or data[6:7] not in (b"\x01", b"\x02"):
        return None
    start = 10 if data[6] == 1 else 12
    size = int.from_bytes(data[8:start], "little")
    m = _NPY_HEADER.fullmatch(data, start, start + size)
    if m is None:
        return None
    shape = tuple(int(d) for d in m.group(2).split(b",") if d.strip())
    dtype = np.dtype(m.group(1).decode())
    count = math.prod(shape)
    if len(data) - start - size != count * dtype.itemsize:
        return None  # truncated or trailing bytes: let np.load word the error
    return np.frombuffer(data, dtype, count, start + size).reshape(shape).copy()


def array_from_npy(data: bytes, limits: Limits, name: str = "array") -> np.ndarray:
    """A ``.npy`` body (numpy's own format, no pickles) -> array."""
    if not data:
        raise invalid(f"{name} is empty (0 bytes)")
    fast = _npy_fast(data)
    if fast is not None:
        return _check_array(fast, limits, name)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise invalid(f"{name} is not a .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise invalid(f"{name} must hold one array (.npy), not an archive (.npz)")
    return _check_array(arr, limits, name)


def array_from_json(value: Any, dtype: str, limits: Limits, name: str = "array") -> np.ndarray:
    """A nested JSON list -> array of ``dtype`` (``uint8`` raw pixels or ``float32`` model
    input)."""
    if dtype not in ("uint8", "float32"):
        raise invalid(f"dtype must be 'uint8' (raw pixels) or 'float32' (normalised model "
                      f"input), got {_short(dtype)}")
    if not isinstance(value, list):
        raise invalid(f"{name} must be a nested list of numbers")
    try:
        raw = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise invalid(f"{name} is not a rectangular nested list of numbers ({exc})") from None
    if dtype == "uint8":
        if raw.size and (not np.isfinite(raw).all() or raw.min() < 0 or raw.max() > 255
                         or (raw != np.round(raw)).any()):
            raise invalid(f"{name}: uint8 pixels must be integers in 0..255")
        arr = raw.astype(np.uint8)
    else:
        arr = raw.astype(np.float32)
    return _check_array(arr, limits, name)


def _check_array(arr: np.ndarray, limits: Limits, name: str) -> np.ndarray:
    if arr.size == 0:
        raise invalid(f"{name} has no values (shape {arr.shape})")
    if arr.size > limits.max_array_values:
        raise too_large(f"{name} has {arr.size} values; the limit is {limits.max_array_values}")
    if arr.dtype.kind not in "uif":
        raise invalid(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise invalid(f"{name} contains NaN or infinite values")
    if arr.dtype.kind in "ui" and arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise invalid(f"{name}: integer pixels must lie in 0..255 (dtype {arr.dtype})")
        arr = arr.astype(np.uint8)
    return arr


def parse_json(data: bytes) -> Any:
    """A JSON body, or a 400 that says where it broke."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServeError(f"the body is not valid JSON ({exc})") from None
