"""LiteRT target: PyTorch module -> ``.tflite`` with litert-torch (FP32, INT8), metadata embedded.

FP32 is ``litert_torch.convert(module, (sample,))``. INT8 is static PT2E quantization with
litert-torch's quantizer (weights per-channel symmetric, activations per-tensor), calibrated on
the real training images every target uses, with layers put back in float when the agreement
gate or ``--max-drop`` asks for it; the file then takes int8 input and gives int8 output (float
output when the last layer stayed float), which the ``litert`` device backend quantizes and
dequantizes (the scale and zero point are also written into the metadata,
``extra.io_quantization``). Each INT8 file is timed with and without XNNPACK's AMX kernels on
hosts that have AMX, and records ``xnnpack_amx: false`` when that is faster.

The edgekt metadata JSON goes into the flatbuffer's ``metadata`` list under ``edgekt``, the
place TFLite reserves for it, so a plain ``ai_edge_litert`` program can read it (see
``edgekt.devices.backends.litert.read_tflite_metadata``). LiteRT models have a static batch:
``--dynamic-batch`` gives a batch-1 file here (the device runtime loops over larger batches).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
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
# An INT8 file records ``xnnpack_amx: false`` when XNNPACK's VNNI kernels beat its AMX ones by
# this factor on the exporting host (see edgekt.devices.backends.amx).
AMX_GAIN = 0.9
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
        config: dict[str, Any] = {}
        if precision == "fp32":
            data = convert(ctx.module, shape)
        else:
            data, quant = self._int8(ctx, shape)
        out = ctx.workdir / FILES[precision]
        self._write(out, data, ctx.meta, precision, shape, quant)
        if quant is not None:
            probe = amx_probe(out, ctx.options.threads or 1)
            if probe is not None:
                quant["xnnpack_amx_probe"] = probe
                if probe["off_us"] < AMX_GAIN * probe["default_us"]:
                    config = {"xnnpack_amx": False}
        return Artifact(file=out.name, files=[out.name], target=self.name, runtime=self.runtime,
                        precision=precision, part=ctx.meta.task, runtime_config=config,
                        quantization=quant)

    def runner(self, path: Any, *, runtime_config: dict[str, Any] | None = None,
               threads: int | None = None) -> Any:
        # xnnpack_amx only picks other int8 kernels (outputs are bit-identical, checked by the
        # tests), and it cannot apply in this process, where LiteRT models were already loaded.
        config = {k: v for k, v in (runtime_config or {}).items() if k != "xnnpack_amx"}
        return super().runner(path, runtime_config=config, threads=threads)

    def _write(self, out: Any, data: bytes, meta: ModelMeta, precision: str, shape: list[int],
               quant: dict[str, Any] | None) -> None:
        name, ioq = io_quantization(data)
        extra: dict[str, Any] = {}
        if quant:
            extra["quantization"] = {k: quant[k] for k in ("tool", "calib_method",
                                                           "activation_observer",
                                                           "calib_samples", "float_modules")}
        if ioq:
            extra["io_quantization"] = ioq
        m = meta_for(meta, precision, **extra)
        m = replace(m, input=replace(m.input, name=name, shape=shape))
        blob = embed_metadata(data, m.to_json())
        atomic_write(out, lambda f: f.write(blob))

    def _int8(self, ctx: ExportContext, shape: list[int]) -> tuple[bytes, dict[str, Any]]:
        opts, data = ctx.options, ctx.data
        ref_acc = data.val_accuracy(data.ref_val)
        ref_top1 = data.logits(data.ref_val).argmax(1)
        tries: list[dict[str, Any]] = []
        blobs: dict[int, bytes] = {}

        def attempt(observer: str, floats: Sequence[str] = ()) -> dict[str, Any]:
            blob = convert(ctx.module, shape, _quantizer(observer, floats), data.calib_x)
            path = ctx.scratch / f"int8.try{len(tries)}.tflite"
            self._write(path, blob, ctx.meta, "int8", shape, None)
            out = self.runner(path, threads=opts.threads)(data.val_x)
            acc = data.val_accuracy(out)
            t = {"activation_observer": observer, "float_modules": list(floats), "val_acc": acc,
                 "agreement": float((data.logits(out).argmax(1) == ref_top1).mean()),
                 "drop_pt": round(100 * (ref_acc - acc), 4)}
            blobs[len(tries)] = blob
            tries.append(t)
            return t

        def good(t: dict[str, Any]) -> bool:
            return t["agreement"] >= opts.min_agreement_int8 and (
                opts.max_drop is None or t["drop_pt"] <= opts.max_drop)

        first = OBSERVERS[opts.calib_method]
        # Neither observer wins everywhere (on a small Fashion-MNIST CNN min-max agreed with
        # PyTorch on 94.7% of validation images, the histogram on 97.7%): try both, keep the
        # better agreement, like the OpenVINO target's two bias-correction tries.
        for observer in [first] + [o for o in dict.fromkeys(OBSERVERS.values()) if o != first]:
            attempt(observer)
        best = max(tries, key=_rank)
        if not good(best):
            best = _float_fallback(ctx.module, best["activation_observer"],
                                   opts.max_float_fraction, attempt, good) or max(tries, key=_rank)
        if opts.max_drop is not None and not good(best):
            report = "\n".join(
                f"    {t['activation_observer']}, float {', '.join(t['float_modules']) or '-'}: "
                f"val acc {t['val_acc']:.4f} (drop {t['drop_pt']:.2f} pt), agreement "
                f"{t['agreement']:.4f}" for t in tries)
            raise EdgektError(
                f"INT8 (LiteRT) cannot meet --max-drop {opts.max_drop} pt: reference validation "
                f"accuracy {ref_acc:.4f}; keeping up to {opts.max_float_fraction:g} of the "
                f"weighted layers in float was not enough. Tries:\n{report}\n  Raise "
                "--max-drop, more --calib-samples, or ship the LiteRT FP32 artifact.")
        blob = blobs[tries.index(best)]
        info = {"tool": "litert_torch PT2EQuantizer (static)", "weights": "int8 per-channel "
                "symmetric", "activations": "int8 per-tensor", "io": _io_kinds(blob),
                "calib_method": opts.calib_method,
                "activation_observer": best["activation_observer"],
                "float_modules": best["float_modules"], "calib_samples": len(data.calib_x),
                "max_drop_pt": opts.max_drop, "ref_val_acc": ref_acc,
                "val_acc": best["val_acc"], "tries": tries}
        return blob, info


_PROBE = """
import json, sys, time
import numpy as np
from edgekt.devices.backends import open_backend
b = open_backend(sys.argv[1], "litert", threads=int(sys.argv[2]), config=json.loads(sys.argv[3]))
call = b.bind(np.zeros((b.input.shape[0], *b.input.shape[1:]), np.float32))
for _ in range(50):
    call()
times, end = [], time.perf_counter() + 0.3
while time.perf_counter() < end or len(times) < 50:
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
print(json.dumps(1e6 * float(np.median(times))))
"""


def amx_probe(path: Any, threads: int) -> dict[str, Any] | None:
    """Median batch-1 latency (us) of ``path`` with XNNPACK's AMX kernels and without, each in
    a fresh process (XNNPACK picks its kernels once per process); None without AMX."""
    from edgekt.devices.backends.amx import cpu_has_amx

    if not cpu_has_amx():
        return None
    result: dict[str, Any] = {"threads": threads}
    for key, config in (("default_us", {}), ("off_us", {"xnnpack_amx": False})):
        res = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(threads),
                              json.dumps(config)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if res.returncode != 0:  # a speed hint only: never fail the export for it
            return None
        result[key] = round(json.loads(res.stdout.strip().splitlines()[-1]), 2)
    return result


def _rank(t: dict[str, Any]) -> tuple[float, float, int]:
    """Better agreement, then accuracy, then fewer float layers."""
    return t["agreement"], t["val_acc"], -len(t["float_modules"])


def weighted_modules(module: torch.nn.Module) -> list[str]:
    """Paths of the layers that carry weights (the ones kept in float by the fallback)."""
    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    return [name for name, m in module.named_modules() if name and isinstance(m, kinds)]


def _float_fallback(module: torch.nn.Module, observer: str, max_float_fraction: float,
                    attempt: Callable[..., dict[str, Any]],
                    good: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """Keep weighted layers in float until ``good``: the last layer first, then the layers
    ranked by what keeping each alone in float recovers, top 1, 2, ... (like the ONNX target).

    The last layer goes first because it is the usual culprit: on a 1-epoch cnn_xs an int8
    classifier (int8 logits, 256 levels over a range of 8) left 96.6% agreement with PyTorch;
    keeping only it in float gave 99.2% at the same speed.
    """
    layers = weighted_modules(module)
    limit = math.floor(max_float_fraction * len(layers))
    if limit < 1:
        return None
    t = attempt(observer, layers[-1:])
    if good(t) or limit < 2:
        return t if good(t) else None
    alone = {name: attempt(observer, [name]) for name in layers[:-1]}
    alone[layers[-1]] = t
    ranked = sorted(layers, key=lambda n: _rank(alone[n]), reverse=True)
    for k in range(2, limit + 1):
        t = attempt(observer, ranked[:k])
        if good(t):
            return t
    return None


def _io_kinds(data: bytes) -> str:
    """"int8" for int8 input and output; else what each side is ("int8 in, float32 out")."""
    _, ioq = io_quantization(data)
    if ioq is None:
        return "float32"
    i, o = ioq["input"]["dtype"], ioq["output"]["dtype"]
    return i if i == o else f"{i} in, {o} out"


def _outside(floats: Sequence[str], node: Any) -> bool:
    """Whether ``node`` comes from none of the module paths in ``floats``."""
    paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
    return not any(p == f or p.startswith(f + ".") for p in paths for f in floats)


def _quantizer(observer: str, floats: Sequence[str] = ()) -> Any:
    """litert-torch's static INT8 quantizer; the layers under ``floats`` stay in float."""
    from litert_torch.quantize import pt2e_quantizer as pq

    class Quantizer(pq.PT2EQuantizer):
        # PT2EQuantizer.set_module_name matches nothing on torch 2.14: its filter strips a
        # fixed "L__self___" prefix from nn_module_stack keys, which now read "L__self__a.b".
        # The stack's values carry the plain module path, so filter on those instead.
        def _annotate_for_static_quantization_config(self, model):
            self._annotate_all_static_patterns(model, self.global_config,
                                               functools.partial(_outside, tuple(floats)))
            return model

    return Quantizer().set_global(_config(pq, observer))


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


__all__ = ["LiteRTExporter", "convert", "embed_metadata", "weighted_modules"]
