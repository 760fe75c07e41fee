"""`edgekt pipeline` end to end on a tiny real subset: files, numbers, skips, resume, errors."""

import json

import pytest

from edgekt.errors import EdgektError
from edgekt.pipeline import load_pipeline_config, run_pipeline

TINY = """
run_dir: {run}
data: {{name: fashion-mnist, limit: 600, val_fraction: 0.02}}
teacher:
  config: quick_teacher.yaml
  set: [train.epochs=1, model.name=cnn_s, train.progress=false, train.threads=1,
        data.batch_size=32, sched.name=none]
students:
  - name: xs-kd
    model: cnn_xs
    epochs: 3
    set: [train.progress=false, train.threads=1, data.batch_size=32, optim.lr=0.01]
export:
  targets: [onnx]
  precisions: [fp32, int8]
  calib_samples: 100
profile:
  devices: [local, {unreachable}]
  backends: [onnxruntime]
  seconds: 0.2
  warmup: 5
"""


def quiet(msg: str) -> None:
    pass


def report_students(run):
    return json.loads((run / "report.json").read_text())["students"]


@pytest.mark.slow
def test_pipeline_end_to_end_then_skips_then_redoes_from_a_stage(tmp_path):
    dead = tmp_path / "dead.yaml"  # an SSH board that is not there: profiled rows are marked
    dead.write_text("name: dead\ntransport: ssh\nhost: 127.0.0.1\nport: 9\nuser: nobody\n"
                    "connect_timeout: 2\n")
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(TINY.format(run=tmp_path / "run", unreachable=dead))
    cfg = load_pipeline_config(cfg_file, None, [])
    report = run_pipeline(cfg, log=quiet)
    run = tmp_path / "run"
    for name in ("report.md", "report.json", "pareto.png", "latency_cdf.png",
                 "teacher/best.pt", "students/xs-kd/best.pt", "export/xs-kd/manifest.json",
                 "export/teacher/manifest.json"):
        assert (run / name).is_file(), name
    assert set(report["stages"].values()) == {"ran"}
    rows = report["rows"]
    local = [r for r in rows if r["device"] == "local" and r["status"] == "ok"]
    kinds = {(r["name"], r["runtime"], r["precision"]) for r in local}
    assert {("xs-kd", "onnxruntime", "fp32"), ("xs-kd", "onnxruntime", "int8"),
            ("teacher", "onnxruntime", "fp32"), ("teacher", "torch-eager", "fp32"),
            ("xs-kd", "torch-eager", "fp32")} <= kinds
    assert all(r["p50_ms"] > 0 for r in local)
    assert all(r["test_acc"] > 0.4 for r in local)  # a few epochs on 600 images; chance is 0.1
    for name in ("students/xs-kd.scratch/best.pt", "stages/students.json"):
        assert (run / name).is_file(), name
    twin = report_students(run)["xs-kd"]
    assert twin["scratch"]["test_acc"] > 0.4 and twin["scratch"]["model"] == "cnn_xs"
    assert twin["kd_gain_pt"] == pytest.approx(
        100 * (twin["test_acc"] - twin["scratch"]["test_acc"]))
    kd_rows = [r for r in local if r["name"] == "xs-kd"]
    assert all(r["scratch_acc"] == twin["scratch"]["test_acc"] for r in kd_rows)
    assert any(r["pareto"] for r in local)
    teacher_eager = next(r for r in local if r["name"] == "teacher" and
                         r["runtime"] == "torch-eager")
    assert teacher_eager["speedup_vs_teacher_eager"] == pytest.approx(1.0)
    dead_rows = [r for r in rows if r["device"] != "local"]
    assert dead_rows and all(r["status"] != "ok" for r in dead_rows)
    md = (run / "report.md").read_text()
    assert "| xs-kd | onnxruntime | int8 |" in md and "**yes**" in md
    assert "What distillation bought" in md and "| scratch acc | KD gain (pt) |" in md
    saved = json.loads((run / "report.json").read_text())
    assert saved["students"]["xs-kd"]["params"] < saved["teacher"]["params"]

    again = run_pipeline(cfg, log=quiet)
    assert set(again["stages"].values()) == {"skipped"}

    redo = run_pipeline(cfg, redo_from="export", log=quiet)
    assert redo["stages"] == {"teacher": "skipped", "students": "skipped", "export": "ran",
                              "profile": "ran", "report": "ran"}


def test_student_that_cannot_be_distilled_fails_clearly(tmp_path):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(TINY.format(run=tmp_path / "run", unreachable="local"))
    teacher_ck = tmp_path / "run" / "teacher"
    cfg = load_pipeline_config(cfg_file, None, [
        "students=[{name: bad, model: cnn_xs, epochs: 1, set: ['data.classes=[0,1,2]']}]"])
    with pytest.raises(EdgektError, match="(?i)class"):
        run_pipeline(cfg, log=quiet)
    assert (teacher_ck / "best.pt").is_file()  # the finished teacher stage is kept
    assert (tmp_path / "run" / "stages" / "teacher.json").is_file()


def test_bad_pipeline_configs(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("students: []\n")
    with pytest.raises(EdgektError, match="at least one student"):
        load_pipeline_config(p, None, [])
    p.write_text("studnets: []\n")
    with pytest.raises(EdgektError, match="did you mean 'students'"):
        load_pipeline_config(p, None, [])
    with pytest.raises(EdgektError, match="--from"):
        run_pipeline(load_pipeline_config(None, "quick", [f"run_dir={tmp_path / 'r'}"]),
                     redo_from="nope", log=quiet)


def test_scratch_twin_of_a_transfer_student_gets_the_same_steps(tmp_path):
    from edgekt.pipeline.run import _same_steps_epochs

    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(
        "data: {name: fashion-mnist, limit: 600, val_fraction: 0.02}\n"
        "students:\n"
        "  - name: few\n    model: cnn_xs\n    epochs: 1\n"
        "    distill: {transfer: train}\n"
        "    set: [data.label_fraction=0.1, data.batch_size=32]\n")
    cfg = load_pipeline_config(cfg_file, None, [])
    # 60 labelled images in batches of 32: 2 steps per scratch epoch; the KD run took 19 steps
    # (one pass over 600 transfer images).
    assert _same_steps_epochs(cfg, cfg.students[0], {"steps": 19}) == 10


PRUNED = """
run_dir: {run}
data: {{name: fashion-mnist, limit: 400, val_fraction: 0.02}}
teacher: {{checkpoint: {teacher}}}
students:
  - name: half
    prune: {{from: teacher, target_macs: 0.5}}
    epochs: 1
    set: [train.progress=false, train.threads=1, data.batch_size=32, optim.lr=0.005,
          sched.name=none]
export: {{targets: [onnx], precisions: [fp32], calib_samples: 50, teacher: false}}
profile: {{devices: [local], backends: [onnxruntime], seconds: 0.1, warmup: 2}}
"""


@pytest.mark.slow
def test_pruned_student_is_pruned_distilled_exported_and_reported(tmp_path, tiny_checkpoint):
    """prune: {from: teacher} -> KD from the unpruned teacher -> export with parity -> report,
    with a scratch twin of the same pruned architecture."""
    from typer.testing import CliRunner

    from edgekt.cli.app import app

    pytest.importorskip("torch_pruning")
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(PRUNED.format(run=tmp_path / "run", teacher=tiny_checkpoint))
    res = CliRunner().invoke(app, ["pipeline", str(cfg_file)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "MACs" in res.output and "half" in res.output
    run = tmp_path / "run"
    saved = json.loads((run / "report.json").read_text())
    report = saved
    teacher, half = saved["teacher"], saved["students"]["half"]
    assert half["macs"] < teacher["macs"] and half["params"] < teacher["params"]
    assert half["prune"]["from"] == "teacher" and half["prune"]["macs_fraction"] <= 0.5
    assert half["prune"]["macs_before"] == teacher["macs"]
    assert half["model"] == "cnn_xs"  # the saved student records its base + the pruning recipe
    assert half["test_acc"] > 0.3  # 1 epoch of 400 images from the pruned 60% teacher; chance 0.1
    twin = half["scratch"]
    assert twin["params"] == half["params"] and twin["macs"] == half["macs"]
    assert (run / "students" / "half.scratch" / "best.pt").is_file()
    assert half["kd_gain_pt"] == pytest.approx(100 * (half["test_acc"] - twin["test_acc"]))
    rows = [r for r in report["rows"] if r["name"] == "half"]
    onnx = [r for r in rows if r["runtime"] == "onnxruntime"]
    assert onnx and all(r["parity_passed"] and r["status"] == "ok" for r in onnx)
    assert all(r["macs"] == half["macs"] and r["pruned_from"] == "teacher" for r in rows)
    md = (run / "report.md").read_text()
    assert "| MACs |" in md and "half (pruned teacher," in md
    assert f"{half['macs']:,}" in md
    # The pruned checkpoint is kept and reused: a second run skips every stage.
    again = run_pipeline(load_pipeline_config(cfg_file, None, []), log=quiet)
    assert set(again["stages"].values()) == {"skipped"}


@pytest.mark.parametrize("student, match", [
    ("{name: p, prune: {from: techer, ratio: 0.5}}", r"students\.0\.prune\.from.*'teacher'"),
    ("{name: p, prune: {ratio: 1.5}}", r"students\.0\.prune: ratio must be between 0 and 1"),
    ("{name: p, prune: {ratio: 0.5, target_macs: 0.2}}", "exactly one of ratio"),
    ("{name: p, prune: {target_macs: 1e12}}",
     r"students\.0\.prune\.target_macs: 1e\+12 is not below the teacher's [\d,]+ MACs"),
    ("{name: p, prune: {target_params: 5e9}}", r"target_params.*teacher's [\d,]+ parameters"),
    ("{name: p, model: cnn_s, prune: {ratio: 0.5}}", r"students\.0: model cannot be given"),
    ("{name: p, prune: {ratio: 0.5, importance: l3}}", r"prune: importance must be one of"),
    ("{name: p, prune: {ratio: 0.5, globl: true}}", "did you mean 'global'"),
    ("{name: p, prune: {ratio: 0.5, recover_steps: -5}}",
     r"students\.0\.prune: recover_steps must be 0 or more"),
    ("{name: p, prune: {ratio: 0.5, recover_lr: 2}}", r"prune: recover_lr must be between 0"),
])
def test_bad_pruned_students_fail_at_config_load(tmp_path, tiny_checkpoint, student, match):
    pytest.importorskip("torch_pruning")
    p = tmp_path / "p.yaml"
    p.write_text(f"teacher: {{checkpoint: {tiny_checkpoint}}}\nstudents: [{student}]\n")
    with pytest.raises(EdgektError, match=match) as err:
        load_pipeline_config(p, None, [])
    assert str(p) in str(err.value)


def test_prune_student_options_reach_the_pruner(tmp_path, tiny_checkpoint):
    """The default keep is auto; prune-and-recover options arrive in the PruneSpec."""
    p = tmp_path / "p.yaml"
    p.write_text(f"teacher: {{checkpoint: {tiny_checkpoint}}}\nstudents: [{{name: p, prune: "
                 "{target_macs: 0.1, steps: 3, recover_steps: 40, recover_lr: 0.003}}]\n")
    spec = load_pipeline_config(p, None, []).students[0].prune.spec()
    assert (spec.steps, spec.recover_steps, spec.recover_lr) == (3, 40, 0.003)
    assert list(spec.keep) == ["auto"]


def test_absolute_prune_target_is_checked_against_the_teacher_to_be_trained(tmp_path):
    """No teacher checkpoint yet: the teacher's config builds the model that is counted."""
    from typer.testing import CliRunner

    from edgekt.cli.app import app

    pytest.importorskip("torch_pruning")
    p = tmp_path / "p.yaml"
    p.write_text("data: {name: fashion-mnist, limit: 100}\n"
                 "students: [{name: p, prune: {target_macs: 5e7}}]\n")  # cnn_m: ~13M MACs
    res = CliRunner().invoke(app, ["pipeline", str(p), "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "students.0.prune.target_macs" in res.output and "teacher's" in res.output
    assert not (tmp_path / "run").exists()


def test_unreachable_prune_target_names_the_student(tmp_path, tiny_checkpoint):
    """A fraction the kept stem and head already exceed: torch-pruning stops, the error says
    which student and why, and nothing is trained."""
    pytest.importorskip("torch_pruning")
    p = tmp_path / "p.yaml"
    p.write_text(f"run_dir: {tmp_path / 'run'}\nteacher: {{checkpoint: {tiny_checkpoint}}}\n"
                 "students: [{name: tiny, prune: {target_macs: 0.001}}]\n")
    with pytest.raises(EdgektError, match=r"student 'tiny': pruning the teacher failed: "
                                          r"could not reach --target-macs"):
        run_pipeline(load_pipeline_config(p, None, []), log=quiet)
    assert not (tmp_path / "run" / "students" / "tiny").exists()
    assert not (tmp_path / "run" / "pruned" / "tiny.pt").exists()
