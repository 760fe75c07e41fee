"""Device side of few-shot: PrototypeClassifier on a real exported embedding model (onnxruntime
through edgekt.devices), persistence under SIGKILL, corrupt state, bad input, host/device
agreement, and the `edgekt fewshot` commands end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekt.devices.fewshot import (
    PrototypeClassifier,
    calibrate,
    class_means,
    distances,
    transform_embeddings,
)
from edgekt.devices.state import StateCorruptError
from edgekt.errors import EdgektError

torch.set_num_threads(1)
PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def proto_run(tmp_path_factory):
    """A cnn_xs ProtoNet trained for 30 episodes on Fashion-MNIST base classes 0-5."""
    from edgekt.config import load_config
    from edgekt.engine import fit

    run = tmp_path_factory.mktemp("proto_run")
    cfg = load_config(None, [
        f"run.dir={run}", "model.name=cnn_xs", "method=protonet",
        "method_args={n_way: 6, k_shot: 5, n_query: 5, eval_episodes: 20, eval_images: 300}",
        "data.classes=[0,1,2,3,4,5]", "data.limit=1500", "data.batch_size=50",
        "optim.lr=0.003", "train.epochs=1", "train.progress=false", "train.threads=1"])
    fit(cfg)
    return run / "last.pt"


@pytest.fixture(scope="module")
def embedding_onnx(proto_run, tmp_path_factory) -> Path:
    """The checkpoint's embedding exported to one .onnx file with edgekt metadata."""
    from edgekt.checkpoint import load_checkpoint
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.exporters.meta import build_meta
    from edgekt.exporters.onnx_export import export_onnx
    from edgekt.models import Embedding

    model, info = model_from_checkpoint(load_checkpoint(proto_run))
    path = tmp_path_factory.mktemp("emb") / "embedding.onnx"
    meta = build_meta(info, part="embedding", model_name="cnn_xs",
                      embedding_dim=model.embedding_dim, dynamic_batch=True)
    export_onnx(Embedding(model), meta, path)
    return path


@pytest.fixture(scope="module")
def device_model(embedding_onnx):
    from edgekt.devices import EdgeModel

    return EdgeModel.load(embedding_onnx, threads=1)


@pytest.fixture(scope="module")
def novel_images():
    """Real Fashion-MNIST test images of the novel classes 6-9: raw uint8 (N, 28, 28), labels."""
    from edgekt.config import DataConfig
    from edgekt.data import build_splits

    test = build_splits(DataConfig(name="fashion-mnist", val_fraction=0.0)).test
    keep = test.targets >= 6
    return test.images[keep][:, 0].numpy(), test.targets[keep].numpy()


def _take(images, labels, cls, n, start=0):
    return images[labels == cls][start:start + n]


# ---- pure maths ----
def test_transforms_and_distances_by_hand():
    q = np.array([[3.0, 4.0]])
    p = np.array([[0.0, 0.0], [3.0, 0.0]])
    assert distances(q, p, "euclidean").tolist() == [[25.0, 16.0]]
    assert distances(q, p[1:], "cosine")[0] == pytest.approx([1 - 0.6])
    assert transform_embeddings(q, "l2")[0] == pytest.approx([0.6, 0.8])
    assert transform_embeddings(q, "cl2n", np.array([3.0, 0.0]))[0] == pytest.approx([0.0, 1.0])
    assert class_means(np.array([[1.0], [3.0], [5.0]]), np.array([0, 0, 1]), 2).tolist() == \
        [[2.0], [5.0]]
    with pytest.raises(EdgektError, match="center"):
        transform_embeddings(q, "cl2n")


def test_calibrate_hits_the_target_false_reject_rate():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 100)
    emb = np.eye(6)[y] * 4 + rng.normal(0, 0.5, (600, 6))
    r = calibrate(emb, y, shots=5, target_frr=0.1, trials=30)
    assert r.false_reject_rate == pytest.approx(0.1, abs=0.01)
    assert r.false_accept_rate < 0.05  # well-separated classes: unknowns are far
    with pytest.raises(EdgektError, match=">= 2 classes"):
        calibrate(emb[y == 0], y[y == 0])


# ---- the classifier ----
def test_torch_free_import():
    code = ("import sys, edgekt.devices.fewshot, edgekt.devices; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([PY, "-c", code], check=True, cwd=ROOT)


def test_enroll_predict_running_mean_remove_reload(device_model, novel_images, tmp_path):
    imgs, y = novel_images
    state = tmp_path / "s.npz"
    clf = PrototypeClassifier(device_model, state)
    assert clf.enroll("Sneaker 👟", _take(imgs, y, 7, 3)) == 3
    assert clf.enroll("bag", list(_take(imgs, y, 8, 5))) == 5  # a list of images works too
    assert clf.enroll("Sneaker 👟", _take(imgs, y, 7, 2, start=3)) == 5  # re-enroll adds shots
    assert clf.labels() == ["Sneaker 👟", "bag"] and clf.shots("Sneaker 👟") == 5
    # The running mean equals enrolling all five shots at once.
    once = PrototypeClassifier(device_model, tmp_path / "once.npz")
    once.enroll("x", _take(imgs, y, 7, 5))
    assert np.allclose(clf._protos[0], once._protos[0], atol=1e-6)
    # replace=True starts the class over.
    assert once.enroll("x", _take(imgs, y, 7, 1, start=10), replace=True) == 1

    queries, truth = [], []
    for cls, name in ((7, "Sneaker 👟"), (8, "bag")):
        queries += list(_take(imgs, y, cls, 40, start=20))
        truth += [name] * 40
    preds = clf.predict_batch(queries)
    acc = np.mean([p.label == t for p, t in zip(preds, truth, strict=True)])
    assert acc > 0.8, acc
    assert all(0.5 <= p.score <= 1.0 and p.distance >= 0 for p in preds)

    reloaded = PrototypeClassifier(device_model, state)  # a restart
    assert reloaded.labels() == clf.labels() and reloaded.shots("bag") == 5
    assert [p.label for p in reloaded.predict_batch(queries)] == [p.label for p in preds]
    reloaded.remove("bag")
    assert PrototypeClassifier(device_model, state).labels() == ["Sneaker 👟"]
    with pytest.raises(EdgektError, match="not enrolled"):
        reloaded.remove("bag")


def test_threshold_rejects_unknowns_and_calibration_persists(device_model, novel_images,
                                                             tmp_path):
    imgs, y = novel_images
    clf = PrototypeClassifier(device_model, tmp_path / "s.npz")
    calib_x = np.concatenate([_take(imgs, y, c, 40) for c in (6, 7, 8, 9)])
    calib_y = np.repeat(["shirt", "sneaker", "bag", "boot"], 40)
    rates = clf.calibrate_threshold(calib_x, calib_y, shots=5, target_frr=0.1)
    # A score that knows nothing accepts 90% of unknowns at 10% false rejects.
    assert rates.false_accept_rate < 0.7, rates
    assert rates.false_reject_rate == pytest.approx(0.1, abs=0.03)
    assert clf.rejection == "normalized"
    clf.enroll("sneaker", _take(imgs, y, 7, 5, start=100))
    known = clf.predict_batch(_take(imgs, y, 7, 50, start=200))
    unknown = clf.predict_batch(_take(imgs, y, 8, 50, start=200))  # bags were never enrolled
    assert np.mean([p.known for p in known]) > np.mean([p.known for p in unknown])
    assert all(p.nearest == "sneaker" for p in unknown)
    assert PrototypeClassifier(device_model, tmp_path / "s.npz").threshold == rates.threshold
    clf.set_threshold(0.0)
    assert clf.predict(imgs[0]).label is None
    clf.set_threshold(None)
    assert clf.predict(imgs[0]).label == "sneaker"
    with pytest.raises(EdgektError, match="threshold"):
        clf.set_threshold(float("nan"))


def test_bad_input_is_refused_and_changes_nothing(device_model, novel_images, tmp_path):
    imgs, y = novel_images
    state = tmp_path / "s.npz"
    clf = PrototypeClassifier(device_model, state)
    with pytest.raises(EdgektError, match="no class enrolled"):
        clf.predict(imgs[0])
    with pytest.raises(EdgektError, match="no samples"):
        clf.enroll("a", [])
    with pytest.raises(EdgektError, match="no samples"):
        clf.enroll("a", np.zeros((0, 28, 28), np.uint8))
    assert not state.exists()  # nothing was committed
    clf.enroll("a", _take(imgs, y, 6, 2))
    generation = clf.generation
    with pytest.raises(EdgektError, match="uint8 input of shape"):
        clf.enroll("a", np.zeros((2, 28, 28, 7), np.uint8))  # 7 channels
    with pytest.raises(EdgektError):
        clf.enroll("a", np.zeros((2, 5), np.float32))  # not images
    nan = np.full((1, 1, 28, 28), np.nan, np.float32)
    with pytest.raises(EdgektError, match="NaN"):
        clf.enroll("a", nan)
    with pytest.raises(EdgektError, match="non-empty string"):
        clf.enroll("  ", _take(imgs, y, 6, 1))
    with pytest.raises(EdgektError, match="non-empty string"):
        clf.enroll(3, _take(imgs, y, 6, 1))  # type: ignore[arg-type]
    assert clf.generation == generation and clf.shots("a") == 2
    reloaded = PrototypeClassifier(device_model, state)
    assert reloaded.labels() == ["a"] and reloaded.shots("a") == 2


class _Fixed:
    """An embedder with a chosen embedding size (a different model)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, raw):
        return np.ones((len(raw), self.dim))


def test_state_of_another_model_is_refused(device_model, novel_images, tmp_path):
    imgs, y = novel_images
    PrototypeClassifier(device_model, tmp_path / "s.npz").enroll("a", _take(imgs, y, 6, 2))
    other = PrototypeClassifier(_Fixed(7), tmp_path / "s.npz")
    with pytest.raises(EdgektError, match="another model"):
        other.predict(imgs[0])


# ---- crash safety ----
CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from edgekt.devices import EdgeModel
    from edgekt.devices.fewshot import PrototypeClassifier
    model_path, state, images, mode = sys.argv[1:5]
    clf = PrototypeClassifier(EdgeModel.load(model_path, threads=1), state)
    imgs = np.load(images, allow_pickle=False)
    assert "torch" not in sys.modules
    i = 0
    while True:
        label = f"class {i}"
        n = clf.enroll(label, imgs[(5 * i) % 95:(5 * i) % 95 + 5])
        print(label, n, flush=True)  # the enrollment has returned
        i += 1
        if mode == "once":
            time.sleep(60)
""")


def _run_and_kill(tmp_path, embedding_onnx, imgs, mode: str, kill_after: int) -> list[str]:
    script, images = tmp_path / "child.py", tmp_path / "imgs.npy"
    script.write_text(CHILD)
    np.save(images, imgs[:100])
    proc = subprocess.Popen([PY, str(script), str(embedding_onnx), str(tmp_path / "s.npz"),
                             str(images), mode], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    returned = []
    try:
        for line in proc.stdout:
            returned.append(line.rsplit(" ", 1)[0])
            if len(returned) >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                break
        returned += [line.rsplit(" ", 1)[0] for line in proc.stdout]  # printed before death
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return returned


def test_enrollment_survives_sigkill_right_after_it_returns(device_model, embedding_onnx,
                                                            novel_images, tmp_path):
    returned = _run_and_kill(tmp_path, embedding_onnx, novel_images[0], "once", 1)
    clf = PrototypeClassifier(device_model, tmp_path / "s.npz")
    assert clf.labels() == returned == ["class 0"] and clf.shots("class 0") == 5


def test_no_returned_enrollment_lost_when_killed_mid_stream(device_model, embedding_onnx,
                                                            novel_images, tmp_path):
    returned = _run_and_kill(tmp_path, embedding_onnx, novel_images[0], "loop", 12)
    clf = PrototypeClassifier(device_model, tmp_path / "s.npz")  # loads: the state is intact
    assert len(returned) >= 12
    assert set(returned) <= set(clf.labels())
    # At most the one enrollment in flight at the kill may have landed without being reported.
    assert len(clf.labels()) - len(returned) in (0, 1)


def test_corrupt_state_is_refused_with_backup_kept(device_model, novel_images, tmp_path):
    imgs, y = novel_images
    state = tmp_path / "s.npz"
    clf = PrototypeClassifier(device_model, state)
    clf.enroll("a", _take(imgs, y, 6, 2))
    clf.enroll("b", _take(imgs, y, 7, 2))
    good_prev = (tmp_path / "s.npz.prev").read_bytes()
    state.write_bytes(state.read_bytes()[:200])  # torn / damaged file
    damaged = state.read_bytes()
    with pytest.raises(StateCorruptError, match="recover"):
        PrototypeClassifier(device_model, state)
    # Refusing touched nothing: the damaged file and the backup are both still there.
    assert state.read_bytes() == damaged
    assert (tmp_path / "s.npz.prev").read_bytes() == good_prev
    restored = PrototypeClassifier(device_model, state, recover=True)
    assert restored.labels() == ["a"]  # the previous generation, lacking only the last change
    assert (tmp_path / "s.npz.corrupt").read_bytes() == damaged
    assert PrototypeClassifier(device_model, state).labels() == ["a"]


def test_corrupt_state_without_backup_never_starts_empty(device_model, novel_images, tmp_path):
    imgs, y = novel_images
    state = tmp_path / "s.npz"
    PrototypeClassifier(device_model, state).enroll("a", _take(imgs, y, 6, 2))
    state.write_bytes(b"garbage")
    with pytest.raises(StateCorruptError, match="no previous generation"):
        PrototypeClassifier(device_model, state)
    with pytest.raises(StateCorruptError):
        PrototypeClassifier(device_model, state, recover=True)
    assert state.read_bytes() == b"garbage"


def test_state_of_another_kind_is_refused(device_model, tmp_path):
    from edgekt.devices.state import State, save_state

    save_state(tmp_path / "s.npz", State({"w": np.zeros(3)}, {"format": "something/1"}))
    with pytest.raises(StateCorruptError, match="not a valid few-shot classifier state"):
        PrototypeClassifier(device_model, tmp_path / "s.npz")


def test_normalized_rule_beats_global_distance_on_novel_classes_on_the_device(
        device_model, novel_images, tmp_path):
    """The shipped code path: calibrate on base-class images with each rule, enroll half of
    the novel classes from 5 shots, predict the rest, compare at equal false rejects."""
    from edgekt.config import DataConfig
    from edgekt.data import build_splits

    val = build_splits(DataConfig(name="fashion-mnist", classes=[0, 1, 2, 3, 4, 5])).val
    base_x, base_y = val.images[:900, 0].numpy(), val.targets[:900].numpy()
    imgs, y = novel_images
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(6):
        enrolled = rng.permutation(4)[:2] + 6
        shots = {c: rng.permutation(np.flatnonzero(y == c))[:5] for c in enrolled}
        query = rng.permutation(np.setdiff1d(np.arange(len(y)), np.concatenate(list(
            shots.values()))))[:400]
        episodes.append((shots, query, np.isin(y[query], enrolled)))
    result = {}
    for rule in ("normalized", "distance"):
        clf = PrototypeClassifier(device_model, tmp_path / f"{rule}.npz")
        clf.calibrate_threshold(base_x, base_y, shots=5, target_frr=0.1, trials=20,
                                rejection=rule)
        known, unknown, accepted = [], [], []
        for shots, query, is_known in episodes:
            for c, idx in shots.items():
                clf.enroll(str(c), imgs[idx], replace=True)
            preds = clf.predict_batch(imgs[query])
            score = np.array([p.novelty if rule == "normalized" else p.distance for p in preds])
            known.append(score[is_known])
            unknown.append(score[~is_known])
            accepted.append(np.array([p.known for p in preds]) == is_known)
            for c in shots:
                clf.remove(str(c))
        known, unknown = np.concatenate(known), np.concatenate(unknown)
        at_frr10 = float((unknown <= np.quantile(known, 0.9)).mean())
        result[rule] = (at_frr10, float(1 - np.concatenate(accepted).mean()))
    # False accepts at 10% false rejects (90% for a score that knows nothing), and the total
    # error of the base-calibrated threshold.
    assert result["normalized"][0] < result["distance"][0] - 0.05, result
    assert result["normalized"][1] < result["distance"][1], result


# ---- host / device ----
def test_host_and_device_agree_on_the_same_episodes(proto_run, embedding_onnx):
    from edgekt.fewshot.evaluate import fewshot_evaluate

    report = fewshot_evaluate(proto_run, package=embedding_onnx, shots=(1, 5), episodes=100,
                              queries=10)
    assert report["n_novel_classes"] == 4
    for k in (1, 5):
        assert report["agreement"][k] >= 0.995, report["agreement"]
    host, dev = report["results"]["torch"], report["results"]["device"]
    for h, d in zip(host, dev, strict=True):
        assert abs(h["acc"] - d["acc"]) < 0.005 and h["n_way"] == 4
        assert h["acc"] > 0.4  # well above 4-way chance after 30 episodes
    assert host[1]["acc"] > host[0]["acc"]  # 5-shot beats 1-shot
    new, old = report["open_set"]["normalized"], report["open_set"]["distance"]
    for rule in (new, old):
        assert rule["base"]["false_reject_rate"] == pytest.approx(0.05, abs=0.02)
    # On classes nobody trained on, the normalised rule separates known from unknown better
    # (false accepts at 10% false rejects) and its base-calibrated threshold accepts fewer
    # unknowns; a random score would give 90% false accepts at 10% false rejects.
    best_new, best_old = new["novel_by_shots"][5]["best"], old["novel_by_shots"][5]["best"]
    assert best_new["far_at_frr"] < best_old["far_at_frr"] - 0.05, (best_new, best_old)
    assert best_new["far_at_frr"] < 0.55
    assert new["novel"]["false_accept_rate"] < old["novel"]["false_accept_rate"]


@pytest.mark.slow
def test_cli_package_enroll_predict_on_png_files(proto_run, novel_images, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from edgekt.cli.app import app

    imgs, y = novel_images
    files = {}
    for cls, name in ((7, "sneaker"), (8, "bag")):
        for i, img in enumerate(_take(imgs, y, cls, 8)):
            path = tmp_path / f"{name}{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(img).convert("RGB").save(path)  # RGB files, as a phone would
            files.setdefault(name, []).append(str(path))
    pkg = tmp_path / "pkg"
    runner = CliRunner()

    def run(*args):
        res = runner.invoke(app, [str(a) for a in args])
        if res.exception and not isinstance(res.exception, SystemExit):
            raise res.exception
        if res.exit_code == 2:  # a user error: the CLI printed it
            raise EdgektError(res.output)
        assert res.exit_code == 0, res.output
        return res.stdout

    run("fewshot", "package", proto_run, pkg, "--shots", "5")
    assert (pkg / "manifest.json").is_file() and (pkg / "fewshot_state.npz").is_file()
    with pytest.raises(EdgektError, match="no class enrolled"):
        run("fewshot", "predict", pkg, files["bag"][0])
    run("fewshot", "enroll", pkg, "sneaker", *files["sneaker"][:5])
    out = run("fewshot", "enroll", pkg, "bag", *files["bag"][:5])
    assert "'bag': 5 shot(s); 2 class(es)" in out
    rows = json.loads(run("fewshot", "predict", pkg, *files["sneaker"][5:], *files["bag"][5:],
                          "--json"))
    assert [r["nearest"] for r in rows] == ["sneaker"] * 3 + ["bag"] * 3
    listed = json.loads(run("fewshot", "list", pkg, "--json"))
    assert listed["labels"] == {"sneaker": 5, "bag": 5} and listed["threshold"] > 0
    run("fewshot", "remove", pkg, "bag")
    assert json.loads(run("fewshot", "list", pkg, "--json"))["labels"] == {"sneaker": 5}
    with pytest.raises(EdgektError, match="not a readable image"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a png")
        run("fewshot", "enroll", pkg, "x", bad)
    with pytest.raises(EdgektError, match="exists"):
        run("fewshot", "package", proto_run, pkg)


def test_concurrent_enrollments_from_threads_are_all_kept(device_model, novel_images, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    imgs, y = novel_images
    clf = PrototypeClassifier(device_model, tmp_path / "s.npz")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: clf.enroll(f"c{i}", imgs[3 * i:3 * i + 3]), range(12)))
    reloaded = PrototypeClassifier(device_model, tmp_path / "s.npz")
    assert sorted(reloaded.labels()) == sorted(f"c{i}" for i in range(12))
    assert all(reloaded.shots(f"c{i}") == 3 for i in range(12))


@pytest.mark.slow
def test_cli_train_and_eval(tmp_path):
    from typer.testing import CliRunner

    from edgekt.cli.app import app

    runner = CliRunner()
    cfg = ROOT / "edgekt" / "configs" / "fewshot_protonet.yaml"
    res = runner.invoke(app, ["fewshot", "train", str(cfg), "--run-dir", str(tmp_path / "r"),
                              "--limit", "600", "--set", "model.name=cnn_xs",
                              "--set", "train.epochs=1", "--set", "train.threads=1",
                              "--set", "data.batch_size=100", "--set", "train.progress=false",
                              "--set", "method_args.eval_images=300"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "last.pt").is_file()
    res = runner.invoke(app, ["fewshot", "eval", str(tmp_path / "r" / "last.pt"), "--episodes",
                              "40", "--shots", "1,5", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    rows = report["results"]["torch"]
    assert [r["k_shot"] for r in rows] == [1, 5] and all(r["n_way"] == 4 for r in rows)
    # 4-way, chance 0.25; one epoch on 600 images reached 0.46 / 0.54 (1 / 5 shots).
    assert rows[0]["acc"] > 0.35 and rows[1]["acc"] > max(0.4, rows[0]["acc"])
    assert set(report["open_set"]) == {"normalized", "distance"}
    assert all(r["novel"]["n_unknown"] > 0 for r in report["open_set"].values())
    res = runner.invoke(app, ["fewshot", "train", str(cfg), "--set", "data.classes=null"])
    assert res.exit_code == 2 and "base classes" in res.output
