"""Crash safety with real SIGKILLs of a learning process at random moments."""

from __future__ import annotations

import os

import pytest

from edgekt.continual.crash import kill_trials
from edgekt.devices.state import load_state

TRIALS = int(os.environ.get("EDGEKT_KILL_TRIALS", "40"))


@pytest.mark.parametrize("head", ["softmax", "mlp"])
def test_state_survives_random_sigkills(tmp_path, head):
    trials = TRIALS if head == "softmax" else TRIALS // 2
    report = kill_trials(trials, tmp_path, seed=11, head=head)
    assert report.violations == []
    assert report.final_generation > trials // 2  # the children did commit work in between
    state = load_state(tmp_path / "continual_state.npz")
    assert state is not None and state.generation >= report.final_generation
    assert state.meta["counters"]["batches"] == state.generation
    assert state.meta["config"]["head"] == head
    if head == "mlp":  # the block's weights and input statistics are part of the commit
        assert {"head/w1", "head/w2", "head/stats"} <= set(state.arrays)
        assert state.arrays["head/w2"].shape[0] == len(state.meta["labels"])
