"""LiteRT target: PyTorch module -> ``.tflite`` with litert-torch (FP32, INT8), metadata embedded.

FP32 is ``litert_torch.convert(module, (sample,))``. INT8 is static PT2E quantization with
litert-torch's quantizer (weights per-channel symmetric, activations per-tensor), calibrated on
the real training images every target uses; the file then takes int8 input and gives int8
output, which the ``litert`` device backend quantizes and dequantizes (the scale and zero
point are also written into the metadata, ``extra.io_quantization``).

The edgekt metadata JSON goes into the flatbuffer's ``metadata`` list under ``edgekt``, the
place TFLite reserves for it, so a plain ``ai_edge_litert`` program can read it (see
``edgekt.devices.backends.litert.read_tflite_metadata``). LiteRT models have a static batch:
``--dynamic-batch`` gives a batch-1 file here (the device runtime loops over larger batches).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from edgekt.errors import EdgektError
from edgekt.exporters.base import EXPORTERS, Artifact, ExportContext, Exporter, meta_for
from edgekt.io import atomic_write
from edgekt.metadata import METADATA_KEY, ModelMeta

# litert-torch is imported inside the conversion (it prints C++ logs when loaded); checking for
# it here lets get_exporter() name the extra to install before any work is done.
for _needed in ("litert_torch", "ai_edge_litert"):
    if importlib.util.find_spec(_needed) is None:
        raise ImportError(f"No module named {_needed!r}", name=_needed)

FILES = {"fp32": "model.tflite", "int8": "model.int8.tflite"}
# Activation observers of the PT2E quantizer; litert-torch's default is the histogram one
# (it minimises the L2 quantization error of the observed histogram).
OBSERVERS = {"minmax": "MinMaxObserver", "entropy": "HistogramObserver",
             "percentile": "HistogramObserver"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence litert-torch's progress lines and the C++ logs of TF/absl it triggers (they go
    straight to file descriptors 1 and 2); errors still surface as exceptions."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            import litert_torch

            old = litert_torch.config.show_progress
            litert_torch.config.show_progress = False
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    yield
            finally:
                litert_torch.config.show_progress = old
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def convert(module: torch.nn.Module, shape: list[int], quantizer: Any = None,
            calib: np.ndarray | None = None) -> bytes:
    """The .tflite bytes of ``module`` for a static input ``shape`` (INT8 when ``quantizer``)."""
    module = module.eval().cpu()
    sample = torch.zeros(shape)
    try:
        with _quiet():
            import litert_torch

            if quantizer is None:
                return litert_torch.convert(module, (sample,)).model_content()
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e import quantize_pt2e

            graph = torch.export.export(module, (sample,)).module()
            prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for i in range(0, len(calib), shape[0]):
                    chunk = calib[i:i + shape[0]]
                    if len(chunk) == shape[0]:
                        prepared(torch.from_numpy(np.ascontiguousarray(chunk)))
            quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            return litert_torch.convert(quantized, (sample,), quant_config=QuantConfig(
                pt2e_quantizer=quantizer)).model_content()
    except Exception as exc:  # the converter raises many types; all mean "cannot convert"
        raise EdgektError(_unsupported_message(module, sample, exc)) from None


def _unsupported_message(module: torch.nn.Module, x: torch.Tensor, exc: Exception) -> str:
    """Name the operator litert-torch could not lower and the module that calls it."""
    text = str(exc)
    op = re.search(r"target=(?:torch\.ops\.)?([\w.]+)", text) or \
        re.search(r"Lowering not found: ([\w.]+)", text)
    where = ""
    if op:
        where = _module_of_op(module, x, op.group(1))
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ("LiteRT conversion failed" + (f" at operator {op.group(1)!r}" if op else "")
            + (f" in module {where!r}" if where else "") + f": {first}\n"
            "  Nothing was written. Replace that operation in the model with one LiteRT "
            "supports, or export to --to onnx/openvino instead.")


def _module_of_op(module: torch.nn.Module, x: torch.Tensor, op: str) -> str:
    """The submodule (path and type) whose forward calls ``op``, from torch.export's trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (x,))
    except Exception:  # noqa: BLE001 - tracing itself failed: the root module it is
        return type(module).__name__
    short = op.removeprefix("aten.")
    for node in program.graph.nodes:
        if node.op == "call_function" and short in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, kind = list(stack.values())[-1]
                name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
                return f"{path} ({name.rsplit('.', 1)[-1]})" if path else name
    return type(module).__name__


def embed_metadata(data: bytes, text: str, key: str = METADATA_KEY) -> bytes:
    """``data`` with ``text`` stored under ``key`` in the flatbuffer's ``metadata`` list."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    if any((b.offset or 0) > 1 for b in model.buffers or []):
        raise EdgektError("this .tflite keeps its weights outside the flatbuffer (a model over "
                          "2 GB); edgekt cannot embed its metadata")
    name = key.encode()
    model.metadata = [m for m in model.metadata or []
                      if (m.name.encode() if isinstance(m.name, str) else m.name) != name]
    buf = schema.BufferT()
    buf.data = np.frombuffer(text.encode("utf-8"), np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = key, len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(len(data) + len(text) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def io_quantization(data: bytes) -> tuple[str, dict[str, Any] | None]:
    """The input tensor's name, and the int8 input/output scale and zero point (None if float)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def q(d: dict[str, Any]) -> dict[str, Any]:
        scale, zero = d["quantization"]
        return {"dtype": np.dtype(d["dtype"]).name, "scale": float(scale),
                "zero_point": int(zero)}

    quantized = np.dtype(inp["dtype"]).kind in "iu" or np.dtype(out["dtype"]).kind in "iu"
    return inp["name"], ({"input": q(inp), "output": q(out)} if quantized else None)


@EXPORTERS.register("litert")
class LiteRTExporter(Exporter):
    """``model.tflite`` (FP32) and ``model.int8.tflite`` (PT2E static INT8, int8 input/output)."""

    name = "litert"
    runtime = "litert"
    precisions = ("fp32", "int8")

    def export(self, ctx: ExportContext, precision: str) -> Artifact:
        shape = list(ctx.meta.input.shape)
        shape[0] = shape[0] if shape[0] > 0 else 1  # LiteRT keeps no symbolic batch for CNNs
        quant = None
        if precision == "fp32":
            data = convert(ctx.module, shape)
        else:
            data, quant = self._int8(ctx, shape)
        out = ctx.workdir / FILES[precision]
        self._write(out, data, ctx.meta, precision, shape, quant)
        return Artifact(file=out.name, files=[out.name], target=self.name, runtime=self.runtime,
                        precision=precision, part=ctx.meta.task, quantization=quant)

    def _write(self, out: Any, data: bytes, meta: ModelMeta, precision: str, shape: list[int],
               quant: dict[str, Any] | None) -> None:
        name, ioq = io_quantization(data)
        extra: dict[str, Any] = {}
        if quant:
            extra["quantization"] = {k: quant[k] for k in ("tool", "calib_method",
                                                           "activation_observer",
                                                           "calib_samples")}
        if ioq:
            extra["io_quantization"] = ioq
        m = meta_for(meta, precision, **extra)
        m = replace(m, input=replace(m.input, name=name, shape=shape))
        blob = embed_metadata(data, m.to_json())
        atomic_write(out, lambda f: f.write(blob))

    def _int8(self, ctx: ExportContext, shape: list[int]) -> tuple[bytes, dict[str, Any]]:
        from litert_torch.quantize import pt2e_quantizer as pq

        opts, data = ctx.options, ctx.data
        ref_acc = data.val_accuracy(data.ref_val)
        ref_top1 = data.logits(data.ref_val).argmax(1)
        first = OBSERVERS[opts.calib_method]
        order = [first] + [o for o in dict.fromkeys(OBSERVERS.values()) if o != first]
        tries: list[dict[str, Any]] = []
        best: tuple[float, float, bytes, str] | None = None
        # Neither observer wins everywhere (on a small Fashion-MNIST CNN min-max agreed with
        # PyTorch on 94.7% of validation images, the histogram on 97.7%): try both, keep the
        # better agreement, like the OpenVINO target's two bias-correction tries.
        for observer in order:
            quantizer = pq.PT2EQuantizer().set_global(_config(pq, observer))
            blob = convert(ctx.module, shape, quantizer, data.calib_x)
            path = ctx.scratch / f"int8.{observer}.tflite"
            self._write(path, blob, ctx.meta, "int8", shape, None)
            out = self.runner(path, threads=opts.threads)(data.val_x)
            acc = data.val_accuracy(out)
            agreement = float((data.logits(out).argmax(1) == ref_top1).mean())
            tries.append({"activation_observer": observer, "val_acc": acc,
                          "agreement": agreement, "drop_pt": round(100 * (ref_acc - acc), 4)})
            if best is None or (agreement, acc) > best[:2]:
                best = (agreement, acc, blob, observer)
        assert best is not None
        _, acc, blob, observer = best
        if opts.max_drop is not None and 100 * (ref_acc - acc) > opts.max_drop:
            report = "\n".join(f"    {t['activation_observer']}: val acc {t['val_acc']:.4f} "
                               f"(drop {t['drop_pt']:.2f} pt)" for t in tries)
            raise EdgektError(
                f"INT8 (LiteRT) cannot meet --max-drop {opts.max_drop} pt: reference validation "
                f"accuracy {ref_acc:.4f}. Tries:\n{report}\n  Raise --max-drop, more "
                "--calib-samples, or ship the LiteRT FP32 artifact.")
        info = {"tool": "litert_torch PT2EQuantizer (static)", "weights": "int8 per-channel "
                "symmetric", "activations": "int8 per-tensor", "io": "int8",
                "calib_method": opts.calib_method, "activation_observer": observer,
                "calib_samples": len(data.calib_x), "max_drop_pt": opts.max_drop,
                "ref_val_acc": ref_acc, "val_acc": acc, "tries": tries}
        return blob, info


def _config(pq: Any, observer: str) -> Any:
    """litert-torch's symmetric per-channel config with ``observer`` for the activations."""
    from dataclasses import replace as dc_replace

    import torchao.quantization.pt2e as obs

    cfg = pq.get_symmetric_quantization_config(is_per_channel=True)
    if observer == "HistogramObserver":
        return cfg
    ctr = getattr(obs, observer).with_args(eps=2**-12)
    act = dc_replace(cfg.input_activation, observer_or_fake_quant_ctr=ctr)
    return dc_replace(cfg, input_activation=act, output_activation=act)


__all__ = ["LiteRTExporter", "convert", "embed_metadata"]
