"""Every training method under ``torchrun --nproc_per_node 2`` (gloo): it trains, and its
trainable state (model and the method's own modules) stays identical on both ranks; and two
processes give the same first-step loss as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "edgekt" / "configs"
METHODS = {
    "supervised": None, "distill": "distill_hinton.yaml", "protonet": "fewshot_protonet.yaml",
    "siamese": "method_siamese.yaml", "matching": "method_matching.yaml",
    "relation": "method_relation.yaml", "maml": "method_maml.yaml",
    "multitask": "method_multitask.yaml", "dann": "method_dann.yaml",
}

SCRIPT = r"""
import json, os, sys
import torch
import torch.distributed as dist
from edgekt.config import load_config
from edgekt.engine import Trainer

mode, out_dir, teacher = sys.argv[1], sys.argv[2], sys.argv[3]
configs = json.loads(sys.argv[4])
tiny = ["train.progress=false", "train.device=cpu", "train.threads=1", "train.epochs=1",
        "data.val_fraction=0.02", "train.seed=0"]
results = {}
if mode == "methods":
    for method, path in configs.items():
        over = [*tiny, f"run.dir={out_dir}/{method}", "data.limit=600"]
        cfg = load_config(path, over) if path else load_config(None, over)
        if method == "distill":
            cfg.method_args["teacher"] = {"checkpoint": teacher}
        if cfg.method in ("protonet", "siamese", "matching", "relation", "maml"):
            cfg.data.batch_size = 8  # episodes per epoch for the loop's count
        else:
            cfg.data.batch_size = 32
        trainer = Trainer(cfg, force=True)
        trainer.run(stop_after_steps=3)
        state = [p.detach().flatten() for p in trainer.stepper.parameters()]
        vec = torch.cat(state)
        gathered = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, vec)
        results[method] = {"steps": trainer.step, "equal": bool(torch.equal(*gathered)),
                           "changed": bool(trainer.running["seen"] > 0),
                           "loss": trainer.running["loss"] / max(trainer.running["seen"], 1)}
else:  # first-step loss of the supervised task on a global batch of 64
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the process group starts in Trainer
    cfg = load_config(None, [*tiny, f"run.dir={out_dir}/first{world}", "data.limit=640",
                             f"data.batch_size={64 // world}", "finetune.freeze=backbone",
                             "train.deterministic=true"])
    trainer = Trainer(cfg, force=True)
    trainer.run(stop_after_steps=1)
    loss = torch.tensor([trainer.running["loss"] / trainer.running["seen"]], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    results["first_step_loss"] = float(loss)
if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
    print("RESULT " + json.dumps(results))
"""


def _run(tmp_path: Path, nproc: int, mode: str, teacher: Path) -> dict:
    script = tmp_path / "ddp_methods.py"
    script.write_text(SCRIPT)
    configs = {m: str(CONFIGS / p) if p else None for m, p in METHODS.items()}
    args = [str(script), mode, str(tmp_path / f"runs{nproc}"), str(teacher), json.dumps(configs)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_every_method_trains_under_torchrun_with_ranks_in_sync(tmp_path, tiny_checkpoint):
    res = _run(tmp_path, 2, "methods", tiny_checkpoint)
    assert set(res) == set(METHODS)
    for method, r in res.items():
        assert r["steps"] == 3, (method, r)
        assert r["equal"], f"{method}: parameters differ across ranks"
        assert r["changed"] and r["loss"] == r["loss"], (method, r)  # finite running loss


@pytest.mark.slow
def test_two_processes_give_the_one_process_first_step_loss(tmp_path, tiny_checkpoint):
    one = _run(tmp_path, 1, "first", tiny_checkpoint)["first_step_loss"]
    two = _run(tmp_path, 2, "first", tiny_checkpoint)["first_step_loss"]
    assert two == pytest.approx(one, rel=1e-6, abs=1e-6)
