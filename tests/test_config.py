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
