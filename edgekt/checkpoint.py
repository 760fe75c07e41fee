"""Self-contained, atomically written checkpoints that load without unpickling code.

A checkpoint is a dict of tensors and plain Python values (``torch.load(weights_only=True)``
accepts nothing else): model weights and how to rebuild the model, optimiser, scheduler, AMP
scaler, epoch/step, RNG states, the method's own state, the resolved config and metrics.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekt.errors import EdgektError
from edgekt.io import atomic_write

FORMAT = "edgekt.checkpoint/1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write(Path(path), lambda f: f.write(buf.getbuffer()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or weights file safely; bad files raise a clear EdgektError."""
    p = Path(path)
    if not p.is_file():
        raise EdgektError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = re.search(r"(?:unsupported GLOBAL|Unsupported global)[^\n]*", str(exc))
        if detail is None:
            raise EdgektError(f"{p}: corrupt or truncated checkpoint (not a torch file)") from None
        raise EdgektError(
            f"{p}: refused to load: the file holds Python objects other than tensors and plain "
            f"values ({detail.group(0).strip()}). edgekt never unpickles such files; re-save the "
            f"weights as a state dict or safetensors."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise EdgektError(f"{p}: corrupt or truncated checkpoint ({str(exc)[:200]})") from None
    if not isinstance(obj, dict):
        raise EdgektError(f"{p}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Capture python, numpy and torch RNG states as checkpoint-safe values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_lists_to_tuples(state["python"]))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32),
                         state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(x: Any) -> Any:
    return [_tuples_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _lists_to_tuples(x: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x
