"""Capture intermediate outputs of a model by module name, with forward hooks.

Besides every name in ``model.named_modules()``, two names are always available: ``logits``
(the model's output) and ``embedding`` (the input of ``model.head``, i.e. ``forward_features``).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from edgekt.errors import EdgektError

SPECIAL = ("logits", "embedding")


def available_taps(model: nn.Module) -> list[str]:
    return [*SPECIAL, *(name for name, _ in model.named_modules() if name)]


class FeatureTaps:
    """Records the outputs of the named modules of ``model`` during each forward pass.

    Not an ``nn.Module`` on purpose: it holds no state worth saving, only hook handles and the
    tensors of the current step.
    """

    def __init__(self, model: nn.Module, names: list[str], role: str) -> None:
        self.names = list(dict.fromkeys(names))
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in self.names:
            if name == "logits":
                continue
            if name == "embedding":
                head = getattr(model, "head", None)
                if not isinstance(head, nn.Module):
                    raise EdgektError(f"{role} model has no .head, so it has no 'embedding' tap")
                self._handles.append(head.register_forward_pre_hook(self._pre_hook(name)))
                continue
            if name not in modules or not name:
                valid = available_taps(model)
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise EdgektError(f"{role} has no layer {name!r}{hint}. Available taps: "
                                  f"{', '.join(valid)}")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output

        return hook

    def _pre_hook(self, name: str):
        def hook(_module, inputs):
            self.outputs[name] = inputs[0]

        return hook

    def collect(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tapped tensors of the forward pass that produced ``logits``; clears the record."""
        out, self.outputs = self.outputs, {}
        if "logits" in self.names:
            out["logits"] = logits
        for name, value in out.items():
            if not isinstance(value, torch.Tensor):
                raise EdgektError(f"tap {name!r} outputs a {type(value).__name__}, not a tensor; "
                                  f"tap a layer that returns one tensor")
        missing = [n for n in self.names if n not in out]
        if missing:
            raise EdgektError(f"taps {missing} did not run in the forward pass (unused layers?)")
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
