from pathlib import Path

import pytest

from edgekt.config import apply_overrides, dump_config, load_config
from edgekt.errors import EdgektError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 0.01\n"), ["optim.lr=0.5", "train.epochs=3"])
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 3 and cfg.data.name == "fashion-mnist"


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "optim:\n  lrr: 0.01\n")
    with pytest.raises(EdgektError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "optim.lrr" in msg and "did you mean 'lr'" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(EdgektError, match="did you mean 'optim'"):
        load_config(write(tmp_path, "optm: {}\n"))


def test_wrong_type_is_reported_with_location(tmp_path):
    with pytest.raises(EdgektError, match=r"train\.epochs"):
        load_config(write(tmp_path, "train:\n  epochs: many\n"))


def test_bad_override_syntax():
    with pytest.raises(EdgektError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(EdgektError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(EdgektError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.name=cnn_m", "finetune.freeze=2"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.model_dump() == cfg.model_dump() and again.finetune.freeze == 2


def test_example_configs_are_valid():
    root = Path(__file__).parents[1] / "edgekt" / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "no example configs"
    for f in files:
        if f.name.startswith("pipeline_"):
            from edgekt.pipeline import load_pipeline_config

            load_pipeline_config(f, None, [])
        else:
            load_config(f)


# ---- one ExportConfig / ProfileConfig for library, CLI and pipeline ---------------------------
def test_export_config_file_flags_and_pipeline_share_one_model(tmp_path):
    from edgekt.exporters.config import ExportConfig, export_config
    from edgekt.pipeline.config import load_pipeline_config

    f = tmp_path / "export.yaml"
    f.write_text("targets: [onnx, openvino]\ncalib_samples: 64\nmax_drop: 0.5\n")
    cfg = export_config(f, calib_samples=32)  # a flag overrides the file
    assert (cfg.targets, cfg.calib_samples, cfg.max_drop) == (["onnx", "openvino"], 32, 0.5)
    pipe = load_pipeline_config(None, "quick", ["export.calib_samples=64", "export.max_drop=0.5"])
    assert isinstance(pipe.export, ExportConfig)
    one = pipe.export.for_export(["int8"])
    assert (one.calib_samples, one.max_drop, one.precisions) == (64, 0.5, ["int8"])
    assert type(one) is ExportConfig  # the pipeline-only `teacher` key is not passed on

    f.write_text("calib_method: kl\n")
    with pytest.raises(EdgektError, match=r"export.yaml: invalid option\n  --calib-method 'kl'"):
        export_config(f)
    f.write_text("calib_sample: 3\n")
    with pytest.raises(EdgektError, match="unknown key 'calib_sample'"):
        export_config(f)
    with pytest.raises(EdgektError, match=r"--precision 'fp64'"):
        export_config(None, precisions=["fp64"])
    with pytest.raises(EdgektError, match="(?s)pipeline_quick.yaml.*export.calib_method"):
        load_pipeline_config(None, "quick", ["export.calib_method=kl"])


def test_profile_config_pipeline_defaults_and_errors(tmp_path):
    from edgekt.devices.profiler import ProfileConfig, profile_config
    from edgekt.pipeline.config import load_pipeline_config

    pipe = load_pipeline_config(None, "quick", ["profile.seconds=0.5"])
    s = pipe.profile.settings()
    assert type(s) is ProfileConfig and s.seconds == 0.5 and s.samples
    assert s.threads == pipe.profile.threads
    with pytest.raises(EdgektError, match=r"--seconds inf \(seconds\)"):
        profile_config({"seconds": float("inf")})
    with pytest.raises(EdgektError, match="(?s)pipeline_quick.yaml.*profile.warmup"):
        load_pipeline_config(None, "quick", ["profile.warmup=-1"])


def test_cli_export_config_file_is_checked_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from edgekt.cli.app import app

    bad = tmp_path / "export.yaml"
    bad.write_text("opset: 3\n")
    res = CliRunner().invoke(app, ["export", str(tmp_path / "absent.pt"), "--out",
                                   str(tmp_path / "pkg"), "--config", str(bad)])
    assert res.exit_code == 2, res.output
    assert "--opset 3 (opset)" in res.output and "export.yaml" in res.output
    assert not (tmp_path / "pkg").exists()
