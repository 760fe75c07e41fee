"""Every example config of the seed methods loads and its method_args validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekt.config import load_config, validate
from edgekt.methods.dann import DannArgs
from edgekt.methods.maml import MamlArgs
from edgekt.methods.matching import MatchingArgs
from edgekt.methods.multitask import MultiTaskArgs, resolve_tasks
from edgekt.methods.relation import RelationArgs
from edgekt.methods.siamese import SiameseArgs

CONFIGS = Path(__file__).resolve().parents[1] / "edgekt" / "configs"
ARGS = {"multitask": MultiTaskArgs, "dann": DannArgs, "siamese": SiameseArgs,
        "matching": MatchingArgs, "relation": RelationArgs, "maml": MamlArgs}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("method_*.yaml")), ids=lambda p: p.name)
def test_method_config_validates(path):
    cfg = load_config(path)
    args = validate(ARGS[cfg.method], cfg.method_args, str(path))
    if cfg.method == "multitask":
        assert len(resolve_tasks(args, 10)) == 2


def test_all_methods_have_a_config():
    methods = {load_config(p).method for p in CONFIGS.glob("method_*.yaml")}
    assert methods == set(ARGS)
