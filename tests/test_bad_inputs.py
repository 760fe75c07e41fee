"""Hostile and broken inputs, table-driven: every one is a clear error, and nothing good is lost.

Each case runs the real ``edgekt`` command in-process (``typer.testing.CliRunner``) or calls
the library, then asserts: exit status 2 (``EdgektError`` for library calls), no traceback,
a message that names the offending file, key or value, and every file that existed before the
case byte-identical afterwards (the good config, checkpoint, models, device file, images,
few-shot and continual state, profile store).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _devices_support
import numpy as np
import pytest
from typer.testing import CliRunner

from edgekt.cli.app import app
from edgekt.errors import EdgektError

device_models = _devices_support.device_models  # the session fixture

GOOD_CONFIG = """\
model:
  name: cnn_xs
optim:
  lr: 0.01
train:
  epochs: 1
  progress: false
"""


@dataclass(frozen=True)
class World:
    """Paths of the good and bad files the cases use (``{name}`` in a case's arguments)."""

    root: Path
    paths: dict[str, Path]

    def fmt(self, text: str) -> str:
        return text.format(**{k: str(v) for k, v in self.paths.items()})


def _png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, device_models, tiny_checkpoint) -> World:
    from edgekt.devices import ContinualLearner, EdgeModel, LearnerConfig, PrototypeClassifier
    from edgekt.devices.state import State, save_state

    w = tmp_path_factory.mktemp("world")
    p: dict[str, Path] = {"w": w, "ckpt": tiny_checkpoint, "pkg": device_models.package,
                          "emb": device_models.embedding, "cls": device_models.classifier}
    (w / "good.yaml").write_text(GOOD_CONFIG)
    (w / "empty.yaml").write_text("")
    (w / "comments.yaml").write_text("# nothing but a comment\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "syntax.yaml").write_text("optim:\n  lr: [0.1, 0.2\n")
    (w / "typo.yaml").write_text("optim:\n  lrr: 0.1\n")
    (w / "inf.yaml").write_text("optim:\n  lr: .inf\n")
    (w / "nan.yaml").write_text("train:\n  clip_grad: .nan\n")
    (w / "bin.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (w / "afile").write_text("a regular file, used where a directory is expected\n")
    (w / "adir").mkdir()
    (w / "junk.onnx").write_bytes(b"not a model at all")
    (w / "junk.pt").write_bytes(b"not a checkpoint")
    (w / "truncated.pt").write_bytes(tiny_checkpoint.read_bytes()[:5000])
    (w / "store.jsonl").write_text(json.dumps({"run_id": "r0", "status": "ok"}) + "\n")
    (w / "badstore.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    (w / "exists").mkdir()
    (w / "exists" / "keep.txt").write_text("an earlier export\n")
    dev = {"name": "lab", "transport": "local", "backend": ["onnxruntime"]}
    for name, extra in (("dev_good", {}), ("dev_typo", {"threds": 2}),
                        ("dev_nohost", {"transport": "ssh"}),
                        ("dev_badhost", {"transport": "ssh", "host": "-oProxyCommand=evil"}),
                        ("dev_port", {"transport": "ssh", "host": "board", "port": 70000}),
                        ("dev_inf", {"timeout": float("inf")}),
                        ("dev_threads", {"threads": 0})):
        (w / f"{name}.yaml").write_text(json.dumps({**dev, **extra}))  # JSON is YAML
    # A "runtime" that dies printing bytes that are not UTF-8 on stderr.
    bad_python = w / "bad_python.sh"
    bad_python.write_text("#!/bin/sh\nprintf 'fatal \\377\\376 runtime error\\n' >&2\nexit 3\n")
    bad_python.chmod(0o755)
    (w / "dev_badpy.yaml").write_text(json.dumps({**dev, "python": str(bad_python)}))

    images = device_models.images
    _png(w / "good.png", images[0])
    (w / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (w / "truncated.png").write_bytes((w / "good.png").read_bytes()[:60])
    (w / "zero.png").write_bytes(b"")
    folder = w / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            _png(folder / cls / f"{i}.png", images[i + (3 if cls == "b" else 0)])
    (folder / "b" / "broken.png").write_bytes((w / "good.png").read_bytes()[:70])

    model = EdgeModel.load(device_models.embedding)
    clf = PrototypeClassifier(model, w / "fewshot.npz")
    clf.enroll("shoe", images[:3])
    clf.enroll("bag", images[3:6])
    learner = ContinualLearner(None, LearnerConfig(buffer_bytes=20_000), state_path=w / "cl.npz",
                               dim=8)
    rng = np.random.default_rng(0)
    learner.observe_embeddings(rng.normal(size=(16, 8)), ["x", "y"] * 8)
    learner.save()
    save_state(w / "wrong_fewshot.npz", State({"x": np.zeros(3)}, {"format": "edgekt.fewshot/1"}))
    save_state(w / "wrong_continual.npz", State({"head/w": np.zeros(3)}, {"format": 1}))
    np.savez(w / "foreign.npz", a=np.arange(3))  # a valid npz with no edgekt header
    (w / "random.npz").write_bytes(os.urandom(300))
    for name in ("wrong_fewshot", "wrong_continual", "foreign", "random", "fewshot", "cl"):
        p[name] = w / f"{name}.npz"
    for f in w.iterdir():  # good.yaml -> {good}, good.png -> {good_png}, junk.pt -> {junk_pt}
        key = f.stem if f.suffix == ".yaml" else f"{f.stem}_{f.suffix[1:]}" if f.suffix else f.name
        p.setdefault(key, f)
    p.update(imgs=folder, exists=w / "exists", adir=w / "adir", afile=w / "afile")
    return World(w, p)


def _snapshot(*roots: Path) -> dict[Path, str]:
    return {f: hashlib.sha256(f.read_bytes()).hexdigest()
            for root in roots for f in sorted(root.rglob("*")) if f.is_file()}


# ------------------------------------------------------------------ the CLI cases
# (id, arguments with {name} placeholders, what the message must contain)
CLI: list[tuple[str, str, list[str]]] = [
    # configs
    ("config-missing", "train {w}/nope.yaml", ["config file not found", "nope.yaml"]),
    ("config-is-dir", "train {adir}", ["is not a regular file", "adir"]),
    ("config-binary", "train {bin}", ["bin.yaml", "not a text config file"]),
    ("config-empty", "train {empty}", ["empty.yaml", "is empty"]),
    ("config-only-comment", "train {comments}", ["comments.yaml", "is empty"]),
    ("config-list", "train {list}", ["list.yaml", "expected a mapping", "got list"]),
    ("config-syntax", "train {syntax}", ["syntax.yaml", "not valid YAML", "line"]),
    ("config-typo", "train {typo}", ["unknown key 'optim.lrr'", "did you mean 'lr'"]),
    ("config-inf-lr", "train {inf}", ["optim.lr", "finite", "inf"]),
    ("config-nan-clip", "train {nan}", ["train.clip_grad", "finite"]),
    ("set-no-equals", "train {good} --set optim.lr", ["--set 'optim.lr'", "KEY=VALUE"]),
    ("set-bad-yaml", "train {good} --set optim.lr=[1", ["optim.lr=[1", "not valid YAML"]),
    ("set-bad-yaml-brace", "train {good} --set data.classes={{1", ["data.classes={{1",
                                                                  "not valid YAML"]),
    ("set-not-section", "train {good} --set optim.lr.x=1", ["'lr' is not a section"]),
    ("set-nan", "train {good} --set optim.lr=nan", ["optim.lr", "finite"]),
    ("set-neg-inf", "train {good} --set optim.weight_decay=-.inf", ["optim.weight_decay"]),
    ("set-zero-epochs", "train {good} --set train.epochs=0", ["train.epochs", "greater than 0"]),
    ("set-neg-batch", "train {good} --set data.batch_size=-4", ["data.batch_size", "-4"]),
    ("set-val-fraction", "train {good} --set data.val_fraction=1.5", ["data.val_fraction"]),
    ("set-bad-literal", "train {good} --set optim.name=lamb", ["optim.name", "lamb"]),
    ("set-string-for-int", "train {good} --set train.epochs=many", ["train.epochs", "many"]),
    ("run-dir-under-file", "train {good} --run-dir {afile}/run", ["run.dir", "afile",
                                                                  "is a file"]),
    ("run-dir-is-file", "train {good} --run-dir {afile}", ["run.dir", "afile", "is a file"]),
    ("dataset-unknown", "train {good} --set data.name=cifar99", ["cifar99"]),
    ("imagefolder-missing", "train {good} --set data.name=imagefolder:{w}/noimgs",
     ["noimgs", "is not a directory"]),
    ("imagefolder-corrupt", "train {good} --set data.name=imagefolder:{imgs} --run-dir {w}/r1",
     ["broken.png", "not a readable image"]),
    ("distill-wrong-method", "distill {good} --set method=maml", ["method is 'maml'"]),
    ("fewshot-train-no-classes", "fewshot train {good}", ["good.yaml", "data.classes"]),
    ("pipeline-binary", "pipeline {bin}", ["bin.yaml", "not a text pipeline config"]),
    ("pipeline-empty", "pipeline {empty}", ["empty.yaml", "is empty"]),
    ("pipeline-bad-set", "pipeline --set run_dir=[x", ["run_dir=[x", "not valid YAML"]),
    # checkpoints
    ("eval-missing-ckpt", "eval {w}/none.pt", ["checkpoint not found", "none.pt"]),
    ("eval-junk-ckpt", "eval {junk_pt}", ["junk.pt", "corrupt or truncated"]),
    ("info-truncated-ckpt", "info {truncated_pt}", ["truncated.pt", "corrupt or truncated"]),
    ("info-yaml-as-ckpt", "info {good}", ["good.yaml", "corrupt or truncated"]),
    # exports
    ("export-out-under-file", "export {ckpt} --out {afile}/pkg", ["afile", "is a file"]),
    ("export-out-exists", "export {ckpt} --out {exists}", ["exists", "pass --force"]),
    ("export-out-is-file", "export {ckpt} --out {afile} --force", ["afile", "is a file"]),
    ("export-bad-target", "export {ckpt} --out {w}/o1 --to tflite2", ["tflite2"]),
    ("export-bad-precision", "export {ckpt} --out {w}/o2 --precision fp64", ["fp64"]),
    ("export-bad-part", "export {ckpt} --out {w}/o3 --part head", ["--part 'head'"]),
    ("export-agreement", "export {ckpt} --out {w}/o4 --min-agreement 2",
     ["--min-agreement", "2"]),
    ("export-junk-ckpt", "export {junk_pt} --out {w}/o5", ["junk.pt", "corrupt or truncated"]),
    ("export-val-samples-neg", "export {ckpt} --out {w}/o6 --val-samples -1",
     ["--val-samples", "-1"]),
    ("export-calib-zero", "export {ckpt} --out {w}/o7 --calib-samples 0", ["--calib-samples"]),
    ("export-threads-zero", "export {ckpt} --out {w}/o8 --threads 0", ["--threads", "0"]),
    ("export-max-drop-nan", "export {ckpt} --out {w}/o9 --max-drop nan", ["--max-drop", "nan"]),
    ("train-checkpoint-every-neg", "train {good} --checkpoint-every -1 --run-dir {w}/r2",
     ["--checkpoint-every", "-1"]),
    # models and runtime inputs (profile)
    ("profile-junk-model", "profile {junk_onnx} --iters 2 --store {w}/s1.jsonl",
     ["junk.onnx", "corrupt"]),
    ("profile-missing-model", "profile {w}/absent.onnx --iters 2 --no-save", ["absent.onnx"]),
    ("profile-no-model", "profile", ["give at least one MODEL"]),
    ("profile-iters-zero", "profile {cls} --iters 0 --no-save",
     ["--iters 0", "greater than or equal to 1"]),
    ("profile-seconds-neg", "profile {cls} --seconds -1 --no-save", ["--seconds -1"]),
    ("profile-seconds-inf", "profile {cls} --seconds inf --no-save", ["--seconds inf", "finite"]),
    ("profile-batch-zero", "profile {cls} --batch 0 --no-save", ["--batch 0"]),
    ("profile-warmup-neg", "profile {cls} --warmup -1 --no-save", ["--warmup -1"]),
    ("profile-threads-zero", "profile {cls} --threads 0 --no-save", ["--threads 0"]),
    ("profile-iters-and-seconds", "profile {cls} --iters 5 --seconds 1 --no-save",
     ["either --iters or --seconds"]),
    ("profile-out-under-file", "profile {cls} --iters 2 --out {afile}/r.json --no-save",
     ["--out", "afile", "is a file"]),
    ("profile-plot-is-dir", "profile {cls} --iters 2 --plot {adir} --no-save",
     ["--plot", "adir", "is a directory"]),
    ("profile-store-is-dir", "profile {cls} --iters 2 --store {adir}",
     ["--store", "adir", "is a directory"]),
    ("profile-compare-empty-store", "profile --compare --store {badstore_jsonl}",
     ["badstore.jsonl", "no stored profile runs"]),
    ("profile-nonutf8-runtime", "profile {cls} --iters 2 --device {dev_badpy} --no-save",
     ["exited with code 3", "runtime error"]),
    # device files and SSH settings
    ("device-unknown", "profile {cls} --device lab9 --no-save", ["unknown device 'lab9'"]),
    ("device-binary", "profile {cls} --device {bin} --no-save", ["bin.yaml", "not a text"]),
    ("device-empty", "profile {cls} --device {empty} --no-save", ["empty.yaml", "is empty"]),
    ("device-typo", "profile {cls} --device {dev_typo} --no-save", ["unknown key 'threds'"]),
    ("device-ssh-no-host", "profile {cls} --device {dev_nohost} --no-save", ["needs 'host'"]),
    ("device-ssh-option-host", "devices check {dev_badhost}", ["host", "no leading -"]),
    ("device-ssh-port", "devices check {dev_port}", ["port", "70000"]),
    ("device-inf-timeout", "devices check {dev_inf}", ["timeout", "finite"]),
    ("device-zero-threads", "devices check {dev_threads}", ["threads", "0"]),
    # few-shot state and inputs
    ("fewshot-corrupt-image", "fewshot enroll {emb} x {corrupt_png} --state {fewshot}",
     ["corrupt.png", "not a readable image"]),
    ("fewshot-truncated-image", "fewshot enroll {emb} x {truncated_png} --state {fewshot}",
     ["truncated.png", "not a readable image"]),
    ("fewshot-empty-image", "fewshot predict {emb} {zero_png} --state {fewshot}",
     ["zero.png", "not a readable image"]),
    ("fewshot-missing-image", "fewshot enroll {emb} x {w}/gone.png --state {fewshot}",
     ["gone.png"]),
    ("fewshot-blank-label", "fewshot enroll {emb} '  ' {good_png} --state {fewshot}",
     ["label must be a non-empty string"]),
    ("fewshot-wrong-structure", "fewshot list {emb} --state {wrong_fewshot}",
     ["wrong_fewshot.npz", "not a valid few-shot classifier state"]),
    ("fewshot-foreign-npz", "fewshot list {emb} --state {foreign}",
     ["foreign.npz", "not an edgekt state file"]),
    ("fewshot-random-state", "fewshot list {emb} --state {random}", ["random.npz"]),
    ("fewshot-state-under-file", "fewshot enroll {emb} x {good_png} --state {afile}/s.npz",
     ["afile", "is a file"]),
    ("fewshot-state-is-dir", "fewshot list {emb} --state {adir}", ["adir", "is a directory"]),
    ("fewshot-remove-unknown", "fewshot remove {emb} cat --state {fewshot}",
     ["'cat' is not enrolled"]),
    ("fewshot-classifier-model", "fewshot list {cls} --state {w}/c.npz",
     ["classifier.onnx", "embedding model"]),
    ("fewshot-bad-shots", "fewshot eval {ckpt} --shots 1,five", ["1,five"]),
    ("fewshot-eval-one-way", "fewshot eval {ckpt} --ways 1", ["ways=1"]),
    ("fewshot-eval-zero-queries", "fewshot eval {ckpt} --queries 0", ["queries=0"]),
    ("fewshot-eval-zero-episodes", "fewshot eval {ckpt} --episodes 0", ["episodes=0"]),
    ("fewshot-eval-zero-shot", "fewshot eval {ckpt} --shots 0,5", ["shots=[0, 5]"]),
    ("fewshot-package-zero-shots", "fewshot package {ckpt} {w}/p1 --shots 0", ["--shots", "0"]),
    ("fewshot-package-frr", "fewshot package {ckpt} {w}/p2 --target-frr 2", ["--target-frr"]),
    ("fewshot-package-rejection", "fewshot package {ckpt} {w}/p3 --rejection magic",
     ["--rejection", "normalized, distance", "magic"]),
    ("fewshot-package-out-under-file", "fewshot package {ckpt} {afile}/pkg", ["afile"]),
    # continual simulator options
    ("sim-batch-zero", "continual simulate --backbone {emb} --batch-size 0", ["batch_size", "0"]),
    ("sim-train-neg", "continual simulate --backbone {emb} --train-per-class -3",
     ["train_per_class", "-3"]),
    ("sim-test-zero", "continual simulate --backbone {emb} --test-per-class 0",
     ["test_per_class", "0"]),
    ("sim-buffer-neg", "continual simulate --backbone {emb} --buffer-bytes -1",
     ["buffer_bytes=-1"]),
    ("sim-lr-zero", "continual simulate --backbone {emb} --lr 0", ["lr=0"]),
    ("sim-lr-inf", "continual simulate --backbone {emb} --lr inf", ["lr=inf"]),
    ("sim-strategy", "continual simulate --backbone {emb} --strategies replay,magic",
     ["'magic'"]),
    ("sim-scenario", "continual simulate --backbone {emb} --scenario sideways", ["'sideways'"]),
    ("sim-shift", "continual simulate --backbone {emb} --shift fog", ["'fog'"]),
    ("sim-backbone-missing", "continual simulate --backbone {w}/nobackbone.onnx",
     ["nobackbone.onnx"]),
    ("sim-out-under-file", "continual simulate --backbone {emb} --out {afile}/r.json",
     ["--out", "afile", "is a file"]),
]


@pytest.mark.parametrize("case_id,args,expect", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input(world, device_models, case_id, args, expect, monkeypatch):
    import shlex

    monkeypatch.chdir(world.root)
    monkeypatch.setenv("EDGEKT_PROFILE_STORE", str(world.root / "store.jsonl"))
    before = _snapshot(world.root, device_models.root, world.paths["ckpt"].parent)
    argv = [world.fmt(a) for a in shlex.split(args)]
    res = CliRunner().invoke(app, argv)
    out = res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"{case_id}: raised {res.exception!r}"
    assert res.exit_code == 2, f"{case_id}: exit {res.exit_code}\n{out}"
    assert "Traceback" not in out
    for text in expect:
        assert world.fmt(text) in out, f"{case_id}: {text!r} not in:\n{out}"
    after = _snapshot(world.root, device_models.root, world.paths["ckpt"].parent)
    changed = [str(f) for f, h in before.items() if after.get(f) != h]
    assert not changed, f"{case_id}: good files changed: {changed}"


# ------------------------------------------------------------------ library cases
def _edge(world: World, name: str = "cls"):
    from edgekt.devices import EdgeModel

    return EdgeModel.load(world.paths[name])


def _learner(world: World, state: str):
    from edgekt.devices import ContinualLearner, LearnerConfig

    return ContinualLearner(None, LearnerConfig(buffer_bytes=20_000), state_path=world.paths[state],
                            dim=8)


def _lr_inf(world: World):
    from edgekt.devices import LearnerConfig

    return LearnerConfig(lr=float("inf"))


LIB: list[tuple[str, Callable[[World], object], list[str]]] = [
    ("predict-zero-size-image", lambda w: _edge(w).predict(np.zeros((0, 0), np.uint8)),
     ["empty input", "(0, 0)"]),
    ("predict-zero-width-image", lambda w: _edge(w).predict(np.zeros((28, 0, 3), np.uint8)),
     ["empty input", "(28, 0, 3)"]),
    ("predict-empty-batch", lambda w: _edge(w).predict(np.zeros((0, 28, 28, 1), np.uint8)),
     ["empty input"]),
    ("predict-nan-floats", lambda w: _edge(w).predict(np.full((1, 1, 28, 28), np.nan, np.float32)),
     ["NaN"]),
    ("predict-strings", lambda w: _edge(w).predict(np.array([["a"]])), ["dtype <U1"]),
    ("embed-classifier-without-part", lambda w: _edge(w).embed(np.zeros((28, 28), np.uint8)),
     ["embedding part"]),
    ("load-junk-onnx", lambda w: _edge(w, "junk_onnx"), ["junk.onnx"]),
    ("continual-wrong-structure", lambda w: _learner(w, "wrong_continual"),
     ["wrong_continual.npz", "not a valid continual-learner state"]),
    ("continual-foreign-npz", lambda w: _learner(w, "foreign"), ["foreign.npz"]),
    ("continual-fewshot-state", lambda w: _learner(w, "fewshot"), ["fewshot.npz", "format"]),
    ("continual-lr-inf", _lr_inf, ["lr=inf"]),
    ("runner-output-not-json", lambda w: _bad_runner_line(), ["no result"]),
]


def _bad_runner_line():
    from edgekt.devices.config import DeviceConfig
    from edgekt.devices.runner import MARKER
    from edgekt.devices.transport import LocalTransport

    t = LocalTransport(DeviceConfig(name="x"))
    return t._result(1, f"{MARKER}{{\"status\": \"ok\", cut off", "\ufffd\ufffd", "python3")


@pytest.mark.parametrize("case_id,call,expect", LIB, ids=[c[0] for c in LIB])
def test_library_bad_input(world, device_models, case_id, call, expect):
    before = _snapshot(world.root, device_models.root)
    with pytest.raises(EdgektError) as info:
        call(world)
    for text in expect:
        assert world.fmt(text) in str(info.value), f"{case_id}: {text!r} not in {info.value}"
    after = _snapshot(world.root, device_models.root)
    assert [f for f, h in before.items() if after.get(f) != h] == []


def test_the_table_is_broad_enough():
    assert len(CLI) + len(LIB) >= 60
