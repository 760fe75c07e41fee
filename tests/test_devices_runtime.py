"""EdgeModel on exported models: parity with PyTorch, input handling, errors, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import _devices_support
import numpy as np
import pytest

from edgekt.devices import EdgeModel
from edgekt.devices.artifacts import find_artifacts, select_artifact
from edgekt.errors import EdgektError

device_models = _devices_support.device_models  # the session fixtures
litert_models = _devices_support.litert_models


@pytest.fixture(scope="module", params=["onnxruntime", "litert"])
def model(request, device_models):
    """The same classifier as .onnx and as .tflite (static batch 1): one behaviour."""
    if request.param == "litert":
        path = request.getfixturevalue("litert_models").classifier
    else:
        path = device_models.classifier
    m = EdgeModel.load(path, threads=1)
    assert m.backend.name == request.param  # chosen from the file's suffix
    return m


def test_logits_and_labels_match_pytorch_on_real_images(model, device_models):
    logits = model.logits(device_models.images)
    np.testing.assert_allclose(logits, device_models.logits, atol=1e-4)
    labels = model.predict(device_models.images)
    want = [device_models.labels[i] for i in device_models.logits.argmax(1)]
    assert labels == want
    proba = model.predict_proba(device_models.images)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert (proba.argmax(1) == device_models.logits.argmax(1)).all()


def test_single_image_forms_give_the_same_answer(model, device_models):
    img = device_models.images[3]
    ref = model.logits(device_models.images[3:4])[0]
    for form in (img, img[..., None], np.repeat(img[..., None], 3, -1)):  # HW, HWC grey, RGB
        out = model.logits(form)
        assert out.shape == ref.shape
        # RGB -> L through luma rounds to the same grey values as the original.
        np.testing.assert_allclose(out, ref, atol=1e-4)
    assert model.predict(img) == model.predict([img])[0]
    assert model.predict_proba(img).shape == (10,)


def test_pil_images_and_resize(model, device_models):
    from PIL import Image

    img = device_models.images[0]
    pil = Image.fromarray(img)
    np.testing.assert_allclose(model.logits(pil), model.logits(img), atol=1e-5)
    big = np.asarray(pil.resize((56, 56), Image.BILINEAR))
    back = np.asarray(Image.fromarray(big).resize((28, 28), Image.BILINEAR))
    np.testing.assert_allclose(model.logits(big), model.logits(back), atol=1e-4)


def test_normalised_float_input_is_accepted(model, device_models):
    img = device_models.images[:4].astype(np.float32)[:, None] / 255
    x = (img - 0.2860) / 0.3530
    np.testing.assert_allclose(model.logits(x), model.logits(device_models.images[:4]), atol=1e-3)
    np.testing.assert_allclose(model.logits(x[0]), model.logits(x)[0], atol=1e-5)


@pytest.mark.parametrize(("bad", "expected"), [
    (np.zeros((2, 1, 28, 28), np.uint8), "channels-last"),
    (np.zeros((28, 28, 5), np.uint8), "expected an image"),
    (np.zeros((4, 1, 32, 32), np.float32), "expected normalised model input of shape (N, 1, 28"),
    (np.zeros((28, 28), np.int64), "unsupported input dtype int64"),
    (np.full((1, 1, 28, 28), 200.0, np.float32), "Pass raw pixels as uint8"),
    (np.full((1, 28, 28), np.nan, np.float32), "NaN"),
])
def test_bad_inputs_name_what_was_expected(model, bad, expected):
    with pytest.raises(EdgektError) as err:
        model.predict(bad)
    assert expected in str(err.value)


def test_model_without_metadata_takes_normalised_floats_only(device_models):
    m = EdgeModel.load(device_models.nometa, threads=1)
    assert m.meta is None and m.describe()["preprocessing"] == "unknown"
    with pytest.raises(EdgektError, match="preprocessing is unknown"):
        m.predict(device_models.images[0])
    x = ((device_models.images[:2].astype(np.float32) / 255 - 0.286) / 0.353)[:, None]
    assert m.predict(x) == list(device_models.logits[:2].argmax(1))  # indices: no labels


def test_fixed_batch_model_runs_in_chunks(device_models):
    m = EdgeModel.load(device_models.fixed, threads=1)
    assert m.fixed_batch == 2
    np.testing.assert_allclose(m.logits(device_models.images[:6]), device_models.logits[:6],
                               atol=1e-4)
    with pytest.raises(EdgektError, match="fixed batch of 2"):
        m.logits(device_models.images[:3])


def test_embedding_model_and_package_parts(device_models):
    emb = EdgeModel.load(device_models.embedding, threads=1)
    np.testing.assert_allclose(emb.embed(device_models.images[:4]), device_models.embeddings[:4],
                               atol=1e-4)
    with pytest.raises(EdgektError, match="needs a classifier model"):
        emb.predict(device_models.images[0])
    pkg = EdgeModel.load(device_models.package, threads=1)
    assert pkg.artifact.path.name == "model.onnx" and pkg.task == "classifier"
    np.testing.assert_allclose(pkg.embed(device_models.images[:2]), device_models.embeddings[:2],
                               atol=1e-4)
    single = EdgeModel.load(device_models.classifier, threads=1)
    with pytest.raises(EdgektError, match="no embedding part"):
        single.embed(device_models.images[0])


def test_package_selection_and_runtime_config(device_models):
    arts = find_artifacts(device_models.package)
    ov = select_artifact(arts, "openvino")
    assert ov.path.name == "model.fp32.xml" and ov.accuracy == 0.8
    assert [f.name for f in ov.files()] == ["model.fp32.xml", "model.fp32.bin"]
    m = EdgeModel.load(device_models.package, backend="ov", threads=1)
    assert m.backend.config == {"INFERENCE_PRECISION_HINT": "f32"}
    assert m.backend.settings()["inference_precision_hint"] == "f32"
    with pytest.raises(EdgektError, match="no artifact for onnxruntime, int8"):
        EdgeModel.load(device_models.package, precision="int8")


def test_concurrent_calls_from_threads_agree(device_models):
    for backend in ("onnxruntime", "openvino"):
        m = EdgeModel.load(device_models.classifier, backend=backend, threads=1)
        want = m.logits(device_models.images)
        errors: list[BaseException] = []

        def work(m=m, want=want, errors=errors) -> None:
            try:
                for i in range(10):
                    k = i % 16
                    np.testing.assert_allclose(m.logits(device_models.images[k]), want[k],
                                               atol=1e-5)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]


def test_files_that_are_not_models(tmp_path: Path, device_models):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(EdgektError, match="not a model file"):
        EdgeModel.load(text)
    data = device_models.classifier.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(EdgektError, match="truncated, corrupt or not a model"):
            EdgeModel.load(cut, backend=backend)
    with pytest.raises(EdgektError, match="no such file"):
        EdgeModel.load(tmp_path / "missing.onnx")
    with pytest.raises(EdgektError, match="unknown runtime backend .tensorrt."):
        EdgeModel.load(device_models.classifier, backend="tensorrt")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(EdgektError, match="not a valid edgekt manifest"):
        EdgeModel.load(tmp_path)


def test_litert_files_without_metadata_or_broken(litert_models, device_models, tmp_path):
    m = EdgeModel.load(litert_models.nometa, threads=1)
    assert m.meta is None and m.fixed_batch == 1 and m.backend.name == "litert"
    with pytest.raises(EdgektError, match="preprocessing is unknown"):
        m.predict(device_models.images[0])
    x = ((device_models.images[:3].astype(np.float32) / 255 - 0.286) / 0.353)[:, None]
    assert m.predict(x) == list(device_models.logits[:3].argmax(1))
    data = litert_models.classifier.read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgektError, match="truncated, corrupt or not a model"):
        EdgeModel.load(cut)
    with pytest.raises(EdgektError, match=r"no artifact for litert in this export \(it has: "
                                          r"classifier.onnx"):
        EdgeModel.load(device_models.classifier, backend="litert")
