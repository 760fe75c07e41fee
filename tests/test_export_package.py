"""export_package: embedding export, accuracy control, parity gate and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgekt.checkpoint import load_checkpoint, save_checkpoint
from edgekt.errors import EdgektError
from edgekt.exporters import Manifest, export_package
from edgekt.exporters.base import artifact_runner
from edgekt.exporters.onnx_export import locate_export_failure
from edgekt.exporters.parity import ParityError
from tests._export_support import outlier_checkpoint

FAST = {"val_samples": 300, "test_samples": 300, "calib_samples": 100, "threads": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def outlier(tiny_checkpoint, tmp_path_factory):
    return outlier_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("outlier") / "o.pt")


def _no_leftovers(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_embedding_export_plus_head_reproduces_logits(tiny_checkpoint, fashion_splits, tmp_path):
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.exporters.calib import normalised, torch_outputs

    out = tmp_path / "emb"
    m = export_package(tiny_checkpoint, out, part="embedding", splits=fashion_splits, **FAST)
    assert m.part == "embedding" and m.head["file"] == "head.npz" and "head.npz" in m.files
    assert m.artifacts[0]["part"] == "embedding" and m.meta["task"] == "embedding"
    head = np.load(out / "head.npz", allow_pickle=False)
    model, info = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    assert head["weight"].shape == (10, model.embedding_dim) and list(head["labels"]) == info.labels
    x = normalised(fashion_splits.val.subset(torch.arange(64)), info)
    emb = artifact_runner(out / "model.onnx", "onnxruntime")(x)
    assert emb.shape == (64, model.embedding_dim)
    logits = emb @ head["weight"].T + head["bias"]
    np.testing.assert_allclose(logits, torch_outputs(model, x), atol=1e-4)
    assert m.artifacts[0]["parity"]["agreement"] == 1.0


def test_ort_accuracy_control_keeps_sensitive_nodes_in_float(outlier, fashion_splits, tmp_path):
    # Plain INT8 collapses on this model; the exclusion loop must rescue it.
    m = export_package(outlier, tmp_path / "p", precisions=["int8"], splits=fashion_splits,
                       max_drop=1.0, **FAST)
    q = m.artifacts[0]["quantization"]
    assert q["tries"][0]["drop_pt"] > 10  # the all-INT8 try was broken
    assert 1 <= len(q["float_nodes"]) <= 3
    assert 100 * (q["ref_val_acc"] - q["val_acc"]) <= 1.0
    assert m.artifacts[0]["parity"]["agreement"] >= 0.97


def test_unmeetable_max_drop_fails_with_report_and_writes_nothing(outlier, fashion_splits,
                                                                  tmp_path):
    out = tmp_path / "p"
    with pytest.raises(EdgektError, match=r"cannot meet --max-drop 0.5.*Tries"):
        export_package(outlier, out, precisions=["int8"], splits=fashion_splits, max_drop=0.5,
                       max_float_fraction=0.0, **FAST)
    _no_leftovers(out)


def test_parity_gate_blocks_bad_artifacts_unless_allowed(outlier, fashion_splits, tmp_path):
    out = tmp_path / "p"
    with pytest.raises(ParityError, match="parity gate failed: model.int8.onnx") as err:
        export_package(outlier, out, precisions=["fp32", "int8"], splits=fashion_splits, **FAST)
    assert [a["parity"]["passed"] for a in err.value.artifacts] == [True, False]
    _no_leftovers(out)
    m = export_package(outlier, out, precisions=["fp32", "int8"], splits=fashion_splits,
                       allow_mismatch=True, **FAST)
    assert not m.gate["passed"] and Manifest.load(out).gate["allow_mismatch"]


def test_existing_out_dir_is_refused_unless_force(tiny_checkpoint, fashion_splits, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgektError, match="exists; pass --force"):
        export_package(tiny_checkpoint, out, splits=fashion_splits, **FAST)
    assert (out / "keep.txt").read_text() == "mine"
    export_package(tiny_checkpoint, out, splits=fashion_splits, force=True, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json",
                                                     "model.onnx"]


def test_not_a_model_checkpoint(tmp_path, fashion_splits):
    bad = tmp_path / "weights.pt"
    save_checkpoint(bad, {"weights": torch.zeros(3)})
    with pytest.raises(EdgektError, match="not an edgekt model checkpoint"):
        export_package(bad, tmp_path / "p", splits=fashion_splits)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(EdgektError, match="junk.pt: (corrupt|refused)"):
        export_package(junk, tmp_path / "p", splits=fashion_splits)
    _no_leftovers(tmp_path / "p")


def test_missing_calibration_data(tiny_checkpoint, fashion_splits, tmp_path):
    with pytest.raises(EdgektError, match="calibration needs 5000 real training samples"):
        export_package(tiny_checkpoint, tmp_path / "p", precisions=["int8"],
                       splits=fashion_splits, calib_samples=5000)
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["config"]["data"]["name"] = f"imagefolder:{tmp_path / 'nowhere'}"
    moved = tmp_path / "moved.pt"
    save_checkpoint(moved, ckpt)
    with pytest.raises(EdgektError, match="needs the checkpoint's dataset.*calibration"):
        export_package(moved, tmp_path / "p")
    _no_leftovers(tmp_path / "p")


def test_bad_options_fail_before_any_work(tiny_checkpoint, tmp_path):
    for kw, msg in [({"targets": ["tflite"]}, "unknown export target 'tflite'"),
                    ({"precisions": ["int4"]}, "--precision"),
                    ({"calib_method": "kl"}, "--calib-method"),
                    ({"max_drop": -1.0}, "--max-drop"),
                    ({"part": "backbone"}, "--part"),
                    ({"calib_sample": 3}, "unknown export option")]:
        with pytest.raises(EdgektError, match=msg):
            export_package(tiny_checkpoint, tmp_path / "p", **kw)


def test_unsupported_operator_is_located():
    class Bad(torch.nn.Module):
        def forward(self, x):
            m = x[:, 0, :4, :4]
            return torch.linalg.eigvalsh(m @ m.transpose(-1, -2))

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Sequential(torch.nn.ReLU(),
                                                                          Bad()))
    assert locate_export_failure(net, torch.zeros(1, 1, 8, 8), 17) == "1.1"


@pytest.mark.slow
def test_cli_export_end_to_end(tiny_checkpoint, tmp_path):
    from edgekt.cli.app import app

    out = tmp_path / "pkg"
    args = ["export", str(tiny_checkpoint), "--to", "onnx,openvino", "--precision", "fp32",
            "--out", str(out), "--val-samples", "200", "--test-samples", "300",
            "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "parity gate passed" in res.output and "model.fp32.xml" in res.output
    m = Manifest.load(out)
    assert [a["file"] for a in m.artifacts] == ["model.onnx", "model.fp32.xml"]
    assert m.reference["n_test"] == 300 and m.options["opset"] == 17
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "exists; pass --force" in res.output
