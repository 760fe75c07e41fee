"""One contract every runtime backend meets, subclassed per backend (nncf-style)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import _devices_support
import numpy as np
import pytest

from edgekt.devices.backends import BACKENDS, backend_class, canonical_name, open_backend
from edgekt.errors import EdgektError
from edgekt.metadata import ModelMeta

device_models = _devices_support.device_models  # the session fixtures
litert_models = _devices_support.litert_models


def normalised(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255 - 0.2860) / 0.3530)[:, None]


class BackendContract:
    name: ClassVar[str]
    atol: ClassVar[float] = 1e-4
    batch: ClassVar[int] = -1
    """The classifier's batch dimension in this runtime's file (-1: dynamic)."""

    @pytest.fixture(scope="class")
    @classmethod
    def files(cls, device_models) -> tuple[Path, Path]:
        """(classifier with edgekt metadata, the same without) in this runtime's format."""
        return device_models.classifier, device_models.nometa

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, files):
        return open_backend(files[0], cls.name, threads=1)

    def test_registered_and_versioned(self):
        assert self.name in BACKENDS.names()
        cls = backend_class(self.name)
        assert cls.name == self.name and cls.version()[0].isdigit()

    def test_input_spec_and_metadata(self, backend):
        assert backend.input.shape == (self.batch, 1, 28, 28)
        assert backend.input.dtype == "float32"
        meta = ModelMeta.from_json(backend.metadata())
        assert meta.task == "classifier" and meta.preprocess.image_size == [28, 28]

    def test_run_matches_pytorch(self, backend, device_models):
        out = backend.run(normalised(device_models.images))
        assert isinstance(out, list) and out[0].shape == (16, 10)
        np.testing.assert_allclose(out[0], device_models.logits, atol=self.atol)

    def test_bind_runs_the_bound_input(self, backend, device_models):
        x = normalised(device_models.images[:1])
        run = backend.bind(x)
        for _ in range(3):
            run()
        np.testing.assert_allclose(backend.run(x)[0], device_models.logits[:1], atol=self.atol)

    def test_threads_are_applied(self, backend):
        assert backend.settings()["threads"] == 1

    def test_fp32_models_run_in_fp32(self, backend):
        # OpenVINO would pick bf16 on AVX512-BF16/AMX CPUs; ORT always runs FP32 as FP32.
        assert backend.settings().get("inference_precision_hint", "f32") == "f32"

    def test_concurrent_runs(self, backend, device_models):
        x = normalised(device_models.images)
        outs: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            for _ in range(5):
                outs[i] = backend.run(x[i:i + 1])[0]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(8):
            np.testing.assert_allclose(outs[i][0], device_models.logits[i], atol=self.atol)

    def test_no_metadata_is_none(self, files):
        assert open_backend(files[1], self.name).metadata() is None

    def test_corrupt_file_is_a_clear_error(self, tmp_path, files):
        bad = tmp_path / f"bad{files[0].suffix}"
        bad.write_bytes(files[0].read_bytes()[:300])
        with pytest.raises(EdgektError, match="cannot"):
            open_backend(bad, self.name)

    def test_threads_must_be_positive(self, files):
        with pytest.raises(EdgektError, match="threads must be >= 1"):
            open_backend(files[0], self.name, threads=0)


class TestOnnxRuntime(BackendContract):
    name = "onnxruntime"


class TestOpenVINO(BackendContract):
    name = "openvino"

    def test_reads_ir_with_its_metadata(self, device_models):
        b = open_backend(device_models.package / "model.fp32.xml", "openvino", threads=1)
        assert ModelMeta.from_json(b.metadata()).task == "classifier"
        out = b.run(normalised(device_models.images))[0]
        np.testing.assert_allclose(out, device_models.logits, atol=self.atol)

    def test_ir_without_weights_file(self, tmp_path, device_models):
        xml = tmp_path / "m.xml"
        xml.write_bytes((device_models.package / "model.fp32.xml").read_bytes())
        with pytest.raises(EdgektError, match="m.bin is missing"):
            open_backend(xml, "openvino")


class TestLiteRT(BackendContract):
    name = "litert"
    batch = 1  # litert-torch keeps no symbolic batch for CNNs; run() loops over chunks

    @pytest.fixture(scope="class")
    @classmethod
    def files(cls, litert_models) -> tuple[Path, Path]:
        return litert_models.classifier, litert_models.nometa

    def test_foreign_file_and_wrong_inputs_are_clear_errors(self, tmp_path, backend,
                                                            device_models):
        onnx_bytes = tmp_path / "foreign.tflite"
        onnx_bytes.write_bytes(device_models.classifier.read_bytes())
        with pytest.raises(EdgektError, match="LiteRT cannot open it as a .tflite model"):
            open_backend(onnx_bytes, "litert")
        x = normalised(device_models.images[:2])
        with pytest.raises(EdgektError, match=r"input of shape \(2, 1, 28, 14\); expected"):
            backend.run(x[..., :14])
        with pytest.raises(EdgektError, match="expected a float32 array"):
            backend.run(x.astype(np.float64))


def test_tflite_metadata_reader_matches_the_generated_schema(litert_models):
    """The struct-based reader (no flatbuffers import on the load path) reads what LiteRT's
    generated schema module reads, and None where the edgekt entry is missing."""
    from ai_edge_litert import schema_py_generated as schema

    from edgekt.devices.backends.litert import read_tflite_metadata

    for path in (litert_models.classifier, litert_models.nometa):
        data = path.read_bytes()
        m = schema.Model.GetRootAs(data, 0)
        want = next((m.Buffers(m.Metadata(i).Buffer()).DataAsNumpy().tobytes().decode()
                     for i in range(m.MetadataLength()) if m.Metadata(i).Name() == b"edgekt"),
                    None)
        assert read_tflite_metadata(data) == want
        assert read_tflite_metadata(data, key="other") is None
    assert read_tflite_metadata(litert_models.classifier.read_bytes()) is not None


def test_aliases_and_unknown_names():
    assert canonical_name("ORT") == "onnxruntime" and canonical_name("ov") == "openvino"
    assert canonical_name("tflite") == "litert"
    with pytest.raises(EdgektError, match="did you mean 'openvino'"):
        canonical_name("openvin")


def test_onnxruntime_refuses_ir(device_models):
    with pytest.raises(EdgektError, match="opens .onnx files"):
        open_backend(device_models.package / "model.fp32.xml", "onnxruntime")
