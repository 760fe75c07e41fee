"""One contract every runtime backend meets, subclassed per backend (nncf-style)."""

from __future__ import annotations

import threading
from typing import ClassVar

import _devices_support
import numpy as np
import pytest

from edgekt.devices.backends import BACKENDS, backend_class, canonical_name, open_backend
from edgekt.errors import EdgektError
from edgekt.metadata import ModelMeta

device_models = _devices_support.device_models  # the session fixture


def normalised(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255 - 0.2860) / 0.3530)[:, None]


class BackendContract:
    name: ClassVar[str]
    atol: ClassVar[float] = 1e-4

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, device_models):
        return open_backend(device_models.classifier, cls.name, threads=1)

    def test_registered_and_versioned(self):
        assert self.name in BACKENDS.names()
        cls = backend_class(self.name)
        assert cls.name == self.name and cls.version()[0].isdigit()

    def test_input_spec_and_metadata(self, backend):
        assert backend.input.shape == (-1, 1, 28, 28)
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

    def test_no_metadata_is_none(self, device_models):
        assert open_backend(device_models.nometa, self.name).metadata() is None

    def test_corrupt_file_is_a_clear_error(self, tmp_path, device_models):
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(device_models.classifier.read_bytes()[:300])
        with pytest.raises(EdgektError, match="cannot"):
            open_backend(bad, self.name)

    def test_threads_must_be_positive(self, device_models):
        with pytest.raises(EdgektError, match="threads must be >= 1"):
            open_backend(device_models.classifier, self.name, threads=0)


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


def test_aliases_and_unknown_names():
    assert canonical_name("ORT") == "onnxruntime" and canonical_name("ov") == "openvino"
    with pytest.raises(EdgektError, match="did you mean 'openvino'"):
        canonical_name("openvin")


def test_onnxruntime_refuses_ir(device_models):
    with pytest.raises(EdgektError, match="opens .onnx files"):
        open_backend(device_models.package / "model.fp32.xml", "onnxruntime")
