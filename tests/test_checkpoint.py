import os
import random

import numpy as np
import pytest
import torch

from edgekt.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from edgekt.errors import EdgektError


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/edgekt_pwned",))


def test_round_trip_and_atomic_replace(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"w": torch.ones(3), "epoch": 2})
    save_checkpoint(p, {"w": torch.zeros(3), "epoch": 3})
    ck = load_checkpoint(p)
    assert ck["epoch"] == 3 and ck["format"].startswith("edgekt") and not torch.any(ck["w"])
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]  # no temp files left


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"w": torch.randn(1000)})
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(EdgektError, match="corrupt or truncated"):
        load_checkpoint(p)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(EdgektError, match="GLOBAL posix.system.*never unpickles"):
        load_checkpoint(p)
    assert not os.path.exists("/tmp/edgekt_pwned")


def test_rng_state_round_trip(tmp_path):
    st = rng_state()
    save_checkpoint(tmp_path / "r.pt", {"rng": st})
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
