"""``manifest.json`` of an edge package (torch-free: devices and apps read it with plain json).

Schema ``edgekt.package/1`` (stable; new keys may be added, none renamed)::

    format          "edgekt.package/1"
    created, edgekt_version
    source          {checkpoint, sha256, model, dataset, method}
    part            "classifier" | "embedding"
    meta            the ModelMeta embedded in every model file (precision: fp32)
    artifacts       [{file, files, target, runtime, precision, part, runtime_config,
                      quantization, parity, export_s}]
                    file: what the runtime opens; runtime: "onnxruntime" | "openvino";
                    precision: "fp32" | "fp16" | "int8"; runtime_config: settings to pass
                    when compiling (OpenVINO FP32: {"INFERENCE_PRECISION_HINT": "f32"});
                    parity: {max_abs_diff, mean_abs_diff, agreement, test_agreement, val_acc,
                    test_acc, n_val, n_test, min_agreement, passed}
    head            {file: "head.npz", keys: [weight, bias, labels]} | null
    reference       PyTorch's {val_acc, test_acc, n_val, n_test}
    calibration     {split, samples, method, seed, indices_sha256}
    options, gate   export options and the parity thresholds / verdict
    files           {name: {sha256, bytes}} for every file except manifest.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekt.errors import EdgektError
from edgekt.io import atomic_write_text

FORMAT = "edgekt.package/1"


@dataclass
class Manifest:
    format: str
    created: str
    edgekt_version: str
    source: dict[str, Any]
    part: str
    meta: dict[str, Any]
    artifacts: list[dict[str, Any]]
    head: dict[str, Any] | None
    reference: dict[str, Any]
    calibration: dict[str, Any]
    options: dict[str, Any]
    gate: dict[str, Any]
    files: dict[str, dict[str, Any]]
    path: Path | None = field(default=None, compare=False)
    """Where it was read from or written to (not serialised)."""

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps(data, indent=2)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        p = Path(path)
        if p.is_dir():
            p = p / "manifest.json"
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgektError(f"{p}: cannot read the package manifest ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EdgektError(f"{p}: not an edgekt package manifest (format {FORMAT})")
        return cls(**data, path=p)

    def artifact(self, runtime: str, precision: str) -> dict[str, Any]:
        """The artifact for ``runtime`` and ``precision``; a clear error lists what exists."""
        for a in self.artifacts:
            if a["runtime"] == runtime and a["precision"] == precision:
                return a
        have = ", ".join(f"{a['runtime']}/{a['precision']}" for a in self.artifacts)
        raise EdgektError(f"{self.path}: no {runtime}/{precision} artifact (has: {have})")
