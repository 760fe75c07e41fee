"""Crash safety with real SIGKILLs of a learning process at random moments."""

from __future__ import annotations

import os

from edgekt.continual.crash import kill_trials
from edgekt.devices.state import load_state

TRIALS = int(os.environ.get("EDGEKT_KILL_TRIALS", "40"))


def test_state_survives_random_sigkills(tmp_path):
    report = kill_trials(TRIALS, tmp_path, seed=11)
    assert report.violations == []
    assert report.final_generation > TRIALS // 2  # the children did commit work in between
    state = load_state(tmp_path / "continual_state.npz")
    assert state is not None and state.generation >= report.final_generation
    assert state.meta["counters"]["batches"] == state.generation
