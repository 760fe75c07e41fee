"""``export_package``: checkpoint -> parity-checked edge package (model files + manifest.json).

Package layout (the names are stable; ``manifest.json`` lists what is present)::

    model.onnx  model.fp16.onnx  model.int8.onnx          ONNX target (onnxruntime)
    model.fp32.xml/.bin  model.fp16.xml/.bin  model.int8.xml/.bin   OpenVINO target
    model.tflite  model.int8.tflite                                 LiteRT target (no fp16)
    head.npz        --part embedding only: weight (C, D), bias (C,), labels (C,)
    config.yaml     the training config stored in the checkpoint
    manifest.json   see ``edgekt.metadata`` (the package schema)

The package is assembled in a hidden temp directory next to ``out_dir`` and renamed into place
only after every artifact passed the parity gate, so a failure never leaves a partial package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import edgekt
from edgekt.data import Splits
from edgekt.errors import EdgektError
from edgekt.exporters.base import ExportContext, get_exporter
from edgekt.exporters.config import ExportConfig, export_config
from edgekt.exporters.parity import ParityError, apply_gate, measure, reference
from edgekt.io import atomic_write, atomic_write_text, check_writable
from edgekt.metadata import PACKAGE_FORMAT, Manifest


def export_package(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: ExportConfig | str | Path | None = None,
    *,
    force: bool = False,
    data_dir: str | None = None,
    splits: Splits | None = None,
    log: Callable[[str], None] | None = None,
    **changes: Any,
) -> Manifest:
    """Export a checkpoint to every (target, precision) pair and gate each artifact on parity.

    Args:
        checkpoint: an edgekt checkpoint (``last.pt``/``best.pt``).
        out_dir: the package directory; refused if it exists unless ``force``.
        config: what to export (an :class:`ExportConfig`, a YAML file of one, or the defaults).
        data_dir: where the checkpoint's dataset lives (calibration and parity use real data).
        splits: already loaded splits of the checkpoint's dataset (skips loading).
        log: receives one line per step (the CLI prints them).
        **changes: :class:`ExportConfig` fields that override ``config`` (``targets``,
            ``precisions``, ``calib_samples``, ``max_drop``, ...).

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    from edgekt.checkpoint import file_sha256, load_checkpoint
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.exporters.calib import build_eval_data
    from edgekt.exporters.meta import build_meta
    from edgekt.models import Embedding
    from edgekt.models.timm_zoo import fuse_for_export

    say = log or (lambda _msg: None)
    opts = export_config(config, **changes)
    targets, precisions = _check_selection(opts)
    part = opts.part
    val_samples, test_samples = opts.val_samples or None, opts.test_samples or None
    out = check_writable(out_dir, "output directory", directory=True)
    if out.exists() and not force:
        raise EdgektError(f"output directory {out} exists; pass --force to replace it")

    ckpt = load_checkpoint(checkpoint)
    net, info = model_from_checkpoint(ckpt, str(checkpoint))
    sha = file_sha256(checkpoint)
    splits = splits or _load_splits(ckpt, str(checkpoint), data_dir)
    if splits.info.num_classes != info.num_classes or splits.info.labels != info.labels:
        raise EdgektError(f"the data given has classes {splits.info.labels}, the checkpoint "
                          f"{info.labels}: pass the checkpoint's own dataset")
    module = net if part == "classifier" else Embedding(net).eval()
    head = (net.head.weight.detach().numpy().astype(np.float32),
            net.head.bias.detach().numpy().astype(np.float32))
    meta = build_meta(info, part=part, model_name=ckpt["model"]["name"],  # type: ignore[arg-type]
                      embedding_dim=net.embedding_dim, dynamic_batch=opts.dynamic_batch,
                      source_sha256=sha)
    say(f"data: {opts.calib_samples} calibration (train), {val_samples or 'all'} validation, "
        f"{test_samples or 'all'} test images of {info.name}")
    data = build_eval_data(module, splits, calib_samples=opts.calib_samples,
                           val_samples=val_samples, test_samples=test_samples,
                           head=head if part == "embedding" else None)
    ref = reference(data)
    # Re-parameterisable blocks (RepViT, MobileOne, ...) are fused only now: the parity gate
    # then compares the fused export against the unfused PyTorch reference computed above.
    module = fuse_for_export(module)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    scratch = Path(tempfile.mkdtemp(prefix="edgekt-export-"))
    try:
        ctx = ExportContext(module=module, meta=meta, workdir=work, scratch=scratch, data=data,
                            options=opts)
        artifacts = []
        for target in targets:
            exporter = get_exporter(target)
            for precision in precisions:
                if precision not in exporter.precisions:
                    say(f"{target}: no {precision} artifact (it exports "
                        f"{', '.join(exporter.precisions)})")
                    continue
                t0 = time.perf_counter()
                art = exporter.export(ctx, precision)
                art.export_s = round(time.perf_counter() - t0, 3)
                # Parity runs the file on the edgekt.devices backend that ships it.
                run = exporter.runner(work / art.file, runtime_config=art.runtime_config,
                                      threads=opts.threads)
                threshold = opts.min_agreement_int8 if precision == "int8" else opts.min_agreement
                art.parity = apply_gate(measure(run, data), threshold)
                artifacts.append(asdict(art))
                say(f"{art.file}: agreement {art.parity['agreement']:.4f}, test acc "
                    f"{art.parity['test_acc']:.4f} ({art.export_s:.1f} s)")
        failed = [a for a in artifacts if not a["parity"]["passed"]]
        if part == "embedding":
            _write_head(work / "head.npz", head, info.labels)
        atomic_write_text(work / "config.yaml", yaml.safe_dump(ckpt.get("config", {}),
                                                               sort_keys=False))
        manifest = Manifest(
            format=PACKAGE_FORMAT, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            edgekt_version=edgekt.__version__,
            source={"checkpoint": str(checkpoint), "sha256": sha, "model": meta.model_name,
                    "dataset": info.name, "method": ckpt.get("method", {}).get("method")},
            part=part, meta=asdict(meta), artifacts=artifacts,
            head={"file": "head.npz", "keys": ["weight", "bias", "labels"]}
            if part == "embedding" else None,
            reference={"runtime": "torch", **ref},
            calibration={"split": "train", "samples": int(len(data.calib_x)),
                         "method": opts.calib_method, "seed": 0,
                         "indices_sha256": _sha(data.calib_indices)},
            options=opts.model_dump(),
            gate={"min_agreement": opts.min_agreement,
                  "min_agreement_int8": opts.min_agreement_int8,
                  "allow_mismatch": opts.allow_mismatch, "passed": not failed},
            files={},
        )
        if failed and not opts.allow_mismatch:
            names = ", ".join(f"{a['file']} ({a['parity']['agreement']:.4f} < "
                              f"{a['parity']['min_agreement']})" for a in failed)
            raise ParityError(f"parity gate failed: {names}; nothing was written to {out}. "
                              "Pass --allow-mismatch to write the package anyway.", artifacts, ref)
        manifest.files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                          for p in sorted(work.iterdir())}
        manifest.save(work / "manifest.json")
        _publish(work, out)
        manifest.path = out / "manifest.json"
        return manifest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)  # gone already when published


def _check_selection(opts: ExportConfig) -> tuple[list[str], list[str]]:
    targets = list(dict.fromkeys(opts.targets))
    precisions = list(dict.fromkeys(opts.precisions))
    if not targets or not precisions:
        raise EdgektError("give at least one --to target and one --precision")
    # Unknown or uninstalled targets fail before any work is done.
    exporters = [get_exporter(t) for t in targets]
    orphans = [p for p in precisions if not any(p in e.precisions for e in exporters)]
    if orphans:
        have = "; ".join(f"{e.name}: {', '.join(e.precisions)}" for e in exporters)
        raise EdgektError(f"--precision {','.join(orphans)}: no selected target exports it "
                          f"({have})")
    return targets, precisions


def _load_splits(ckpt: dict[str, Any], source: str, data_dir: str | None) -> Splits:
    from edgekt.data import build_splits
    from edgekt.evaluation import checkpoint_data_config

    cfg = checkpoint_data_config(ckpt, source, data_dir)
    try:
        return build_splits(cfg)
    except EdgektError as exc:
        raise EdgektError(f"export needs the checkpoint's dataset ({cfg.name}) for INT8 "
                          f"calibration and the parity gate, and could not load it:\n{exc}") \
            from None


def _write_head(path: Path, head: tuple[np.ndarray, np.ndarray], labels: list[str]) -> None:
    # Plain arrays only (labels as a unicode array) so np.load(allow_pickle=False) reads it.
    w, b = head
    atomic_write(path, lambda f: np.savez(f, weight=w, bias=b, labels=np.array(labels)))


def _sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _publish(work: Path, out: Path) -> None:
    """Rename the finished temp dir to ``out`` (replacing an old package only at the end)."""
    # mkdtemp/mkstemp create owner-only entries; a package is meant to be copied and shared.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)
    for p in work.iterdir():
        os.chmod(p, 0o666 & ~umask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(work, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
