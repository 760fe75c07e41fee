"""Raw inputs -> model input, exactly as recorded in the model's ``edgekt`` metadata.

Accepted: uint8 images ``(H, W)``, ``(H, W, C)``, a batch ``(N, H, W, C)`` (or ``(N, H, W)`` for a
grey model), a list of such images or PIL images; or float arrays that are already normalised
model input ``(C, H, W)`` / ``(N, C, H, W)``. Anything else is refused with what was expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekt.devices.backends.base import TensorInfo
from edgekt.errors import EdgektError
from edgekt.metadata import Preprocess

# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L (so results match PIL conversions).
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class Preprocessor:
    """Validates and converts inputs for one model (stateless after construction, thread-safe)."""

    def __init__(self, pre: Preprocess | None, spec: TensorInfo) -> None:
        self.pre = pre
        self.spec = spec
        if pre is not None:
            mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
            # (raw * scale - mean) / std == raw * a + b, one fused multiply-add per pixel.
            self._a = (pre.scale / std).astype(np.float32)
            self._b = (-mean / std).astype(np.float32)
            self.range = (float(np.min(self._b)), float(np.max(255 * self._a + self._b)))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Expected shape of one normalised sample (C, H, W); -1 where any size is accepted."""
        return self.spec.shape[1:]

    def __call__(self, x: Any) -> tuple[np.ndarray, bool]:
        """Returns (model input batch, whether the caller passed a single sample)."""
        if isinstance(x, (list, tuple)):
            if not x:
                raise EdgektError("empty list of inputs")
            parts = [self(_as_array(item)) for item in x]
            if not all(single for _, single in parts):
                raise EdgektError("a list must hold single images, not batches")
            return np.concatenate([b for b, _ in parts]), False
        arr = _as_array(x)
        if arr.size == 0:
            # Resizing would invent pixels and the model would "classify" nothing.
            raise EdgektError(f"empty input of shape {arr.shape}: an image needs at least one "
                              "pixel and a batch at least one image")
        if arr.dtype == np.uint8:
            return self._images(arr)
        if arr.dtype.kind == "f":
            return self._floats(arr)
        raise EdgektError(
            f"unsupported input dtype {arr.dtype}: pass uint8 images (0..255, H x W [x C], "
            f"channels last) or float32 normalised input of shape {self._shape_text()}; for "
            "integer pixel arrays use x.astype(np.uint8)")

    def _shape_text(self) -> str:
        dims = ", ".join("any" if d == -1 else str(d) for d in self.sample_shape)
        return f"(N, {dims}) or ({dims})"

    def _images(self, arr: np.ndarray) -> tuple[np.ndarray, bool]:
        pre = self.pre
        if pre is None:
            raise EdgektError(
                "this model carries no edgekt metadata, so its preprocessing is unknown: raw "
                f"uint8 images cannot be converted. Pass normalised float32 input of shape "
                f"{self._shape_text()}, or re-export the model with edgekt")
        single = arr.ndim in (2, 3) and not (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4))
        if arr.ndim == 2:
            arr = arr[None, :, :, None]
        elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            arr = arr[None]
        elif arr.ndim == 3 and pre.channels == 1 and list(arr.shape[1:]) == list(pre.image_size):
            arr = arr[..., None]  # (N, H, W) batch of grey images (of the exact size: unambiguous)
        elif arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
            hint = (" (looks channels-first; uint8 images are channels-last: "
                    "x.transpose(0, 2, 3, 1))" if arr.ndim == 4 and arr.shape[1] in (1, 3) else "")
            raise EdgektError(
                f"uint8 input of shape {arr.shape}: expected an image (H, W) or (H, W, C) or a "
                f"batch (N, H, W, C) with C in 1/3/4; this model wants {pre.color} "
                f"{pre.image_size[0]}x{pre.image_size[1]}{hint}")
        arr = _convert_channels(arr, pre.channels)
        if list(arr.shape[1:3]) != list(pre.image_size):
            arr = _resize(arr, tuple(pre.image_size))
        out = arr.astype(np.float32) * self._a + self._b
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), single

    def _floats(self, arr: np.ndarray) -> tuple[np.ndarray, bool]:
        want = self.sample_shape

        def fits(shape: tuple[int, ...]) -> bool:
            return len(shape) == len(want) and all(
                w in (-1, d) for w, d in zip(want, shape, strict=True))

        if fits(arr.shape):
            arr, single = arr[None], True
        elif arr.ndim == len(want) + 1 and fits(arr.shape[1:]):
            single = False
        else:
            raise EdgektError(
                f"float input of shape {arr.shape}: expected normalised model input of shape "
                f"{self._shape_text()} (channels first); raw images should be uint8 "
                "(H, W[, C]) and are then preprocessed for you")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise EdgektError("float input contains NaN or infinite values")
        if self.pre is not None:
            lo, hi = self.range
            margin = 0.25 * (hi - lo)
            got_lo, got_hi = float(arr.min()), float(arr.max())
            if got_lo < lo - margin or got_hi > hi + margin:
                raise EdgektError(
                    f"float input values span [{got_lo:.3g}, {got_hi:.3g}], but normalised input "
                    f"of this model lies in [{lo:.3g}, {hi:.3g}] "
                    f"((x*{self.pre.scale:.4g} - mean) / std). Pass raw pixels as uint8 to have "
                    "them normalised")
        return arr, single


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "mode") and hasattr(x, "size") and hasattr(x, "convert"):  # a PIL image
        return np.asarray(x.convert("RGB") if x.mode not in ("L", "RGB", "RGBA") else x)
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise EdgektError(f"cannot read input of type {type(x).__name__} as an array "
                              f"({exc})") from None
    return x


def _convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    if arr.shape[-1] == 4:
        arr = arr[..., :3]  # RGBA: drop alpha
    have = arr.shape[-1]
    if have == channels:
        return arr
    if channels == 1:
        return (arr.astype(np.float32) @ _LUMA).round().clip(0, 255).astype(np.uint8)[..., None]
    return np.repeat(arr, channels, axis=-1)


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an NHWC uint8 batch with Pillow (needed only when sizes differ)."""
    try:
        from PIL import Image
    except ImportError:
        raise EdgektError(f"images of size {arr.shape[1]}x{arr.shape[2]} need resizing to "
                          f"{size[0]}x{size[1]}, which uses Pillow: python -m pip install "
                          "pillow (or pass images of the right size)") from None
    h, w = size
    out = np.empty((arr.shape[0], h, w, arr.shape[3]), np.uint8)
    for i, img in enumerate(arr):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = np.asarray(pil.resize((w, h), Image.BILINEAR)).reshape(h, w, -1)
    return out
