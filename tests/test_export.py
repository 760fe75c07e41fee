"""Exporter contract tests, subclassed per target (nncf's pattern), on real Fashion-MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from edgekt.checkpoint import file_sha256
from edgekt.errors import EdgektError
from edgekt.exporters import Manifest, export_package
from edgekt.exporters.base import get_exporter
from edgekt.metadata import ModelMeta

N_VAL, N_TEST = 300, 500


class ExporterContract:
    """Every target must pass these; subclasses set ``target``."""

    target: str
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")

    @pytest.fixture(scope="class")
    @classmethod
    def package(cls, tiny_checkpoint, fashion_splits, tmp_path_factory) -> Manifest:
        torch.set_num_threads(1)
        out = tmp_path_factory.mktemp(f"pkg_{cls.target}") / "pkg"
        return export_package(tiny_checkpoint, out, targets=[cls.target],
                              precisions=list(cls.precisions), splits=fashion_splits,
                              val_samples=N_VAL, test_samples=N_TEST, threads=1)

    def test_manifest_lists_every_artifact_with_hashes(self, package, tiny_checkpoint):
        on_disk = Manifest.load(package.path.parent)
        assert on_disk.format == "edgekt.package/1"
        assert {(a["runtime"], a["precision"]) for a in on_disk.artifacts} == {
            (get_exporter(self.target).runtime, p) for p in self.precisions}
        names = {p.name for p in package.path.parent.iterdir()} - {"manifest.json"}
        assert set(on_disk.files) == names
        for name, rec in on_disk.files.items():
            assert rec["sha256"] == file_sha256(package.path.parent / name)
        for a in on_disk.artifacts:
            assert set(a["files"]) <= names and a["part"] == "classifier"
        assert on_disk.source["sha256"] == file_sha256(tiny_checkpoint)
        assert on_disk.gate["passed"] and on_disk.calibration["samples"] == 300

    def test_metadata_is_embedded_in_each_file(self, package, tiny_checkpoint):
        exporter = get_exporter(self.target)
        for a in package.artifacts:
            meta = exporter.read_meta(package.path.parent / a["file"])
            assert isinstance(meta, ModelMeta)
            assert meta.precision == a["precision"]
            assert meta.source_sha256 == file_sha256(tiny_checkpoint)
            assert meta.task == "classifier" and meta.input.shape == [1, 1, 28, 28]
            assert meta.preprocess.mean == pytest.approx([0.2860])
            assert len(meta.labels) == 10 and meta.labels[0] == "T-shirt/top"

    def test_fp32_matches_pytorch(self, package):
        p = package.artifact(get_exporter(self.target).runtime, "fp32")["parity"]
        assert p["max_abs_diff"] < 1e-4
        assert p["agreement"] == 1.0 and p["n_val"] == N_VAL and p["n_test"] == N_TEST
        assert p["test_acc"] == pytest.approx(package.reference["test_acc"])

    def test_fp16_is_close_or_refused(self, package, tiny_checkpoint, tmp_path):
        runtime = get_exporter(self.target).runtime
        if "fp16" not in self.precisions:  # refused before any work, naming what exists
            assert "fp16" not in get_exporter(self.target).precisions
            with pytest.raises(EdgektError, match="fp16: no selected target exports it"):
                export_package(tiny_checkpoint, tmp_path / "x", targets=[self.target],
                               precisions=["fp16"])
            assert not (tmp_path / "x").exists()
            return
        p = package.artifact(runtime, "fp16")["parity"]
        assert 0 < p["max_abs_diff"] < 5e-2 and p["agreement"] >= 0.99

    def test_int8_calibrated_on_real_data_keeps_accuracy(self, package):
        a = package.artifact(get_exporter(self.target).runtime, "int8")
        assert a["quantization"]["calib_samples"] == 300
        assert a["parity"]["max_abs_diff"] > 1e-4  # really quantized
        assert abs(a["parity"]["test_acc"] - package.reference["test_acc"]) <= 0.02
        assert a["parity"]["agreement"] >= 0.97
        sizes = {x["precision"]: package.files[x["files"][-1]]["bytes"]
                 for x in package.artifacts}
        assert sizes["int8"] < sizes["fp32"]


class TestOnnxExporter(ExporterContract):
    target = "onnx"

    def test_plain_onnxruntime_reproduces_edgekt_from_raw_images(self, package, fashion_splits,
                                                                 tmp_path, tiny_checkpoint):
        """An app with only onnxruntime + numpy (no edgekt, no torch) gets the same answers."""
        from edgekt.checkpoint import load_checkpoint
        from edgekt.engine.setup import model_from_checkpoint
        from edgekt.exporters.calib import normalised, torch_outputs

        split = fashion_splits.test.subset(torch.arange(200))
        raw = split.images[:, 0].numpy()  # uint8 HW images, as a camera/app would hand them over
        np.save(tmp_path / "raw.npy", raw)
        model, info = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
        expected = torch_outputs(model, normalised(split, info)).argmax(1)
        script = textwrap.dedent(f"""
            import json, sys
            import numpy as np, onnxruntime as ort
            sess = ort.InferenceSession({str(package.path.parent / "model.onnx")!r},
                                        providers=["CPUExecutionProvider"])
            meta = json.loads(sess.get_modelmeta().custom_metadata_map["edgekt"])
            pre, spec = meta["preprocess"], meta["input"]
            raw = np.load({str(tmp_path / "raw.npy")!r})
            mean = np.array(pre["mean"], np.float32)
            std = np.array(pre["std"], np.float32)
            x = (raw[..., None].astype(np.float32) * pre["scale"] - mean) / std  # NHWC
            x = x.transpose(0, 3, 1, 2)  # layout NCHW
            preds = [int(sess.run(None, {{spec["name"]: x[i:i + 1]}})[0].argmax())
                     for i in range(len(x))]
            assert "edgekt" not in sys.modules and "torch" not in sys.modules
            print(json.dumps({{"preds": preds, "labels": meta["labels"],
                              "task": meta["task"], "shape": spec["shape"]}}))
        """)
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["task"] == "classifier" and out["shape"] == [1, 1, 28, 28]
        assert out["labels"] == info.labels
        assert (np.array(out["preds"]) == expected).mean() >= 0.995


class TestOpenVINOExporter(ExporterContract):
    target = "openvino"

    def test_fp32_records_f32_inference_precision(self, package):
        # Without it the CPU plugin may run the FP32 IR in bf16 (it does on this machine).
        assert package.artifact("openvino", "fp32")["runtime_config"] == {
            "INFERENCE_PRECISION_HINT": "f32"}
        assert package.artifact("openvino", "int8")["quantization"]["tool"] == "nncf.quantize"


class TestLiteRTExporter(ExporterContract):
    target = "litert"
    precisions = ("fp32", "int8")

    def test_int8_file_is_fully_quantized_and_self_describing(self, package):
        from ai_edge_litert.interpreter import Interpreter

        a = package.artifact("litert", "int8")
        assert a["quantization"]["tool"].startswith("litert_torch PT2EQuantizer")
        path = package.path.parent / a["file"]
        it = Interpreter(model_path=str(path))
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
        meta = get_exporter("litert").read_meta(path)
        ioq = meta.extra["io_quantization"]
        assert ioq["input"]["scale"] == pytest.approx(float(inp["quantization"][0]))
        assert ioq["output"]["zero_point"] == int(out["quantization"][1])
        assert meta.input.name == inp["name"]

    def test_plain_litert_program_reproduces_edgekt_predictions(self, package, fashion_splits,
                                                                tmp_path):
        """ai_edge_litert + numpy alone (no edgekt, no torch), from the .tflite file alone,
        gives the predictions edgekt's device runtime gives, FP32 and INT8."""
        from edgekt.devices import EdgeModel

        raw = fashion_splits.test.images[:200, 0].numpy()  # uint8 HW images, as an app has them
        np.save(tmp_path / "raw.npy", raw)
        files = [str(package.path.parent / package.artifact("litert", p)["file"])
                 for p in ("fp32", "int8")]
        script = textwrap.dedent(f"""
            import json, sys
            import numpy as np
            from ai_edge_litert import schema_py_generated as schema
            from ai_edge_litert.interpreter import Interpreter

            def edgekt_meta(data):
                m = schema.Model.GetRootAs(data, 0)
                for i in range(m.MetadataLength()):
                    if m.Metadata(i).Name() == b"edgekt":
                        buf = m.Buffers(m.Metadata(i).Buffer())
                        return json.loads(buf.DataAsNumpy().tobytes())

            raw = np.load({str(tmp_path / "raw.npy")!r})
            result = {{}}
            for path in {files!r}:
                data = open(path, "rb").read()
                meta = edgekt_meta(data)
                pre = meta["preprocess"]
                mean = np.array(pre["mean"], np.float32)
                std = np.array(pre["std"], np.float32)
                x = (raw[..., None].astype(np.float32) * pre["scale"] - mean) / std  # NHWC
                x = x.transpose(0, 3, 1, 2)  # layout NCHW
                io = meta["extra"].get("io_quantization")
                it = Interpreter(model_content=data, num_threads=1)
                it.allocate_tensors()
                inp, out = it.get_input_details()[0], it.get_output_details()[0]
                preds = []
                for i in range(len(x)):
                    xi = x[i:i + 1]
                    if io and io["input"]["dtype"] == "int8":
                        q = io["input"]
                        xi = np.clip(np.round(xi / q["scale"]) + q["zero_point"], -128, 127)
                    it.set_tensor(inp["index"], xi.astype(inp["dtype"]))
                    it.invoke()
                    y = it.get_tensor(out["index"]).astype(np.float32)
                    if io and io["output"]["dtype"] == "int8":  # a float head: float out
                        y = (y - io["output"]["zero_point"]) * io["output"]["scale"]
                    preds.append(meta["labels"][int(y.argmax())])
                result[meta["precision"]] = preds
            assert "edgekt" not in sys.modules and "torch" not in sys.modules
            print(json.dumps(result))
        """)
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        plain = json.loads(res.stdout)
        for precision in ("fp32", "int8"):
            model = EdgeModel.load(package.path.parent, backend="litert", precision=precision,
                                   threads=1)
            assert model.artifact.path.suffix == ".tflite"
            assert plain[precision] == model.predict(raw)

    def test_xnnpack_amx_off_changes_kernels_not_outputs(self, package, fashion_splits):
        """``xnnpack_amx: false`` (a seccomp filter, so each setting in its own process) gives
        bit-identical INT8 outputs; the export timed both and recorded the faster one."""
        from edgekt.devices.backends.amx import cpu_has_amx
        from edgekt.exporters.litert_export import AMX_GAIN

        a = package.artifact("litert", "int8")
        path = package.path.parent / a["file"]
        script = textwrap.dedent("""
            import ctypes, json, sys
            import numpy as np
            from edgekt.devices.backends import open_backend
            b = open_backend(sys.argv[1], "litert", threads=1, config=json.loads(sys.argv[2]))
            out = b.run(np.load(sys.argv[3]))[0]
            libc = ctypes.CDLL(None, use_errno=True)
            rc = libc.syscall(158, 0x1023, 18)  # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
            print(json.dumps({"out": out.tolist(), "amx": b.settings()["xnnpack_amx"],
                              "req": [rc, ctypes.get_errno()], "torch": "torch" in sys.modules}))
        """)
        from edgekt.exporters.calib import normalised

        x = normalised(fashion_splits.test.subset(torch.arange(20)), fashion_splits.info)
        np.save(package.path.parent / "x20.npy", x)
        runs = {}
        for key, config in (("default", {}), ("off", {"xnnpack_amx": False})):
            res = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(config),
                                  str(package.path.parent / "x20.npy")], capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 0, res.stderr
            runs[key] = json.loads(res.stdout.strip().splitlines()[-1])
        assert runs["default"]["out"] == runs["off"]["out"]
        assert not runs["off"]["torch"] and runs["default"]["amx"] == "default"
        probe = a["quantization"].get("xnnpack_amx_probe")
        if cpu_has_amx():
            assert runs["off"]["amx"] == "off" and runs["off"]["req"] == [-1, 1]  # EPERM
            assert probe["default_us"] > 0 and probe["off_us"] > 0
            faster = probe["off_us"] < AMX_GAIN * probe["default_us"]
            assert a["runtime_config"] == ({"xnnpack_amx": False} if faster else {})
        else:
            assert runs["off"]["amx"] == "off (this CPU has no AMX)"
            assert probe is None and a["runtime_config"] == {}
        from edgekt.devices.backends import open_backend

        with pytest.raises(EdgektError, match="'xnnpack_amx' must be true or false"):
            open_backend(path, "litert", config={"xnnpack_amx": "no"})

    def test_max_drop_fails_with_the_tries_listed(self, tiny_checkpoint, fashion_splits,
                                                  tmp_path):
        from _export_support import outlier_checkpoint

        hostile = outlier_checkpoint(tiny_checkpoint, tmp_path / "outlier.pt")
        out = tmp_path / "p"
        # max_float_fraction 0 (no float layers allowed) keeps this test at two conversions.
        with pytest.raises(EdgektError, match=r"(?s)INT8 \(LiteRT\) cannot meet --max-drop 1.0 "
                                              r"pt.*keeping up to 0 of.*MinMaxObserver, float -: "
                                              r"val acc.*HistogramObserver, float -: val acc"):
            export_package(hostile, out, targets=["litert"], precisions=["int8"],
                           splits=fashion_splits, val_samples=N_VAL, test_samples=N_VAL,
                           calib_samples=100, max_drop=1.0, max_float_fraction=0.0, threads=1)
        assert not out.exists()

    def test_max_drop_keeps_the_sensitive_layer_in_float(self, tiny_checkpoint, fashion_splits,
                                                         tmp_path):
        """A class bias of -1000 (a class never predicted) stretches the int8 logits' range
        until the other classes share a few levels; keeping the head in float restores them."""
        from edgekt.checkpoint import load_checkpoint, save_checkpoint

        ckpt = load_checkpoint(tiny_checkpoint)
        ckpt["model"]["state_dict"]["head.bias"][9] -= 1000.0
        hostile = tmp_path / "head.pt"
        save_checkpoint(hostile, ckpt)
        manifest = export_package(hostile, tmp_path / "p", targets=["litert"],
                                  precisions=["int8"], splits=fashion_splits, val_samples=N_VAL,
                                  test_samples=N_VAL, calib_samples=100, max_drop=1.0, threads=1)
        a = manifest.artifact("litert", "int8")
        q = a["quantization"]
        full = [t for t in q["tries"] if not t["float_modules"]]
        assert len(full) == 2 and all(t["drop_pt"] > 1.0 for t in full)
        assert q["float_modules"] == ["head"] and q["io"] == "int8 in, float32 out"
        assert a["parity"]["agreement"] >= 0.97 and a["parity"]["passed"]
        assert a["parity"]["agreement"] > max(t["agreement"] for t in full) + 0.2

    @pytest.mark.slow
    def test_torchvision_mobile_model_converts_with_parity(self):
        """MobileNetV3-small (hardswish, squeeze-excite, 1-channel 28 px stem): about 15 s."""
        from ai_edge_litert.interpreter import Interpreter

        from edgekt.exporters.litert_export import convert
        from edgekt.models import create_model

        torch.manual_seed(0)
        net = create_model("mobilenet_v3_small", num_classes=10, in_channels=1, image_size=28)
        with torch.no_grad():  # non-trivial BatchNorm statistics
            for _ in range(2):
                net.train()(torch.randn(16, 1, 28, 28))
        net.eval()
        x = torch.randn(4, 1, 28, 28)
        it = Interpreter(model_content=convert(net, [1, 1, 28, 28]), num_threads=1)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        got = []
        for i in range(len(x)):
            it.set_tensor(inp["index"], x[i:i + 1].numpy())
            it.invoke()
            got.append(it.get_tensor(out["index"]))
        with torch.no_grad():
            ref = net(x).numpy()
        assert np.abs(ref).max() > 1e-3  # a model that outputs something
        np.testing.assert_allclose(np.concatenate(got), ref, rtol=1e-4,
                                   atol=1e-5 * np.abs(ref).max())

    def test_unsupported_operator_is_named_with_its_module(self):
        from edgekt.exporters.litert_export import convert

        class Histogram(torch.nn.Module):
            def forward(self, x):
                return x + torch.histc(x, bins=4).sum()

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(1, 4, 3)
                self.stats = Histogram()

            def forward(self, x):
                return self.stats(self.conv(x)).mean((1, 2, 3))

        with pytest.raises(EdgektError, match=r"operator 'aten\.histc.*' in module "
                                              r"'stats \(Histogram\)'"):
            convert(Net(), [1, 1, 28, 28])


def test_missing_converter_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "litert_torch" else real(name, *a))
    monkeypatch.delitem(sys.modules, "edgekt.exporters.litert_export", raising=False)
    with pytest.raises(EdgektError, match=r"needs a package that is not installed: No module "
                                          r"named 'litert_torch'.*edgekt\[litert-export\]"):
        get_exporter("litert")
