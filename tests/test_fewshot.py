"""Host side of few-shot: episode sampler, ProtoNet loss and training, evaluation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgekt.errors import EdgektError
from edgekt.fewshot.episodes import EpisodeSampler, EpisodeSpec, episode_batch
from edgekt.fewshot.evaluate import (
    TorchEmbedder,
    agreement,
    mean_ci95,
    nearest_prototype,
    raw_images,
    run_episodes,
)
from edgekt.fewshot.losses import pairwise_logits, prototypical_loss, rotate_batch

torch.set_num_threads(1)


# ---- sampler ----
def test_sampler_episode_properties(fashion_splits):
    targets = fashion_splits.train.targets
    spec = EpisodeSpec(n_way=5, k_shot=3, n_query=4)
    sampler = EpisodeSampler(targets, spec, seed=7)
    for ep in sampler.episodes(20):
        assert len(ep.classes.unique()) == 5
        assert ep.support.shape == (15,) and ep.query.shape == (20,)
        assert not set(ep.support.tolist()) & set(ep.query.tolist())  # disjoint
        assert len(set(ep.support.tolist())) == 15 and len(set(ep.query.tolist())) == 20
        # episode label j means class classes[j], in both support and query
        assert torch.equal(targets[ep.support], ep.classes[ep.support_labels])
        assert torch.equal(targets[ep.query], ep.classes[ep.query_labels])
        assert torch.equal(ep.support_labels, torch.arange(5).repeat_interleave(3))


def test_sampler_is_reproducible_and_varies(fashion_splits):
    targets = fashion_splits.train.targets
    spec = EpisodeSpec(4, 1, 2)
    a, b = EpisodeSampler(targets, spec, seed=1), EpisodeSampler(targets, spec, seed=1)
    assert torch.equal(a.sample(13).query, b.sample(13).query)
    assert torch.equal(a.sample(13).classes, b.sample(13).classes)
    assert not torch.equal(a.sample(13).query, a.sample(14).query)
    other_seed = EpisodeSampler(targets, spec, seed=2)
    assert not torch.equal(a.sample(13).query, other_seed.sample(13).query)
    # Every class shows up over many episodes (no class starves).
    seen = torch.cat([ep.classes for ep in a.episodes(50)])
    assert set(seen.tolist()) == set(range(10))


def test_sampler_restricts_to_classes(fashion_splits):
    targets = fashion_splits.train.targets
    sampler = EpisodeSampler(targets, EpisodeSpec(3, 2, 2), classes=[6, 7, 8, 9])
    for ep in sampler.episodes(10):
        assert set(targets[ep.query].tolist()) <= {6, 7, 8, 9}


def test_sampler_refuses_impossible_specs():
    targets = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    with pytest.raises(EdgektError, match="needs 4 classes but only 3"):
        EpisodeSampler(targets, EpisodeSpec(4, 1, 1))
    with pytest.raises(EdgektError, match=r"class\(es\) \{2: 3\}"):
        EpisodeSampler(targets, EpisodeSpec(3, 2, 2))
    with pytest.raises(EdgektError, match="no samples"):
        EpisodeSampler(targets, EpisodeSpec(2, 1, 1), classes=[0, 5])
    with pytest.raises(EdgektError, match="k_shot must be >= 1"):
        EpisodeSpec(2, 0, 1)
    EpisodeSampler(targets, EpisodeSpec(2, 2, 2), classes=[0, 1])  # the short class is not used


def test_episode_batch_normalises_like_the_loader(fashion_splits):
    from edgekt.config import DataConfig
    from edgekt.data import make_loader

    split, info = fashion_splits.train, fashion_splits.info
    ep = EpisodeSampler(split.targets, EpisodeSpec(2, 1, 1)).sample(0)
    xs, ys, xq, yq = episode_batch(split, ep, info)
    loader = make_loader(split.subset(ep.support), info, DataConfig(), train=False)
    x_loader = next(iter(loader))[0]
    assert torch.allclose(xs, x_loader) and xs.shape == (2, 1, 28, 28)
    assert ys.tolist() == [0, 1] and yq.tolist() == [0, 1] and xq.shape == xs.shape


# ---- loss ----
def test_prototypical_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(6, 4, generator=g)  # 3-way 2-shot
    s_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    query = torch.randn(5, 4, generator=g)
    q_labels = torch.tensor([0, 1, 2, 1, 0])
    loss, logits = prototypical_loss(support, s_labels, query, q_labels, 3, scale=0.5)
    protos = [support[2 * c:2 * c + 2].mean(0) for c in range(3)]
    hand_logits = torch.tensor([[-0.5 * float(((q - p) ** 2).sum()) for p in protos]
                                for q in query])
    assert torch.allclose(logits, hand_logits, atol=1e-5)
    hand_loss = -sum(float(hand_logits[i, q_labels[i]] - torch.logsumexp(hand_logits[i], 0))
                     for i in range(5)) / 5
    assert math.isclose(float(loss), hand_loss, rel_tol=1e-5)

    loss_c, logits_c = prototypical_loss(support, s_labels, query, q_labels, 3, metric="cosine",
                                         scale=10.0)
    cos = torch.tensor([[float(torch.dot(q, p) / (q.norm() * p.norm())) for p in protos]
                        for q in query])
    assert torch.allclose(logits_c, 10 * cos, atol=1e-5)
    assert float(loss_c) > 0


def test_pairwise_logits_gradient_flows_to_support_and_query():
    s = torch.randn(4, 3, requires_grad=True)
    q = torch.randn(2, 3, requires_grad=True)
    loss, _ = prototypical_loss(s, torch.tensor([0, 0, 1, 1]), q, torch.tensor([0, 1]), 2)
    loss.backward()
    assert s.grad.abs().sum() > 0 and q.grad.abs().sum() > 0
    assert pairwise_logits(q, s, "euclidean").shape == (2, 4)


def test_rotate_batch_rotates_each_image_by_its_target():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3).repeat(20, 1, 1, 1)
    out, k = rotate_batch(x, torch.Generator().manual_seed(0))
    assert set(k.tolist()) == {0, 1, 2, 3} and out.shape == x.shape
    for i in range(len(x)):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))


# ---- evaluation protocol ----
def test_mean_ci95_by_hand():
    accs = [0.5, 0.75, 1.0, 0.25]
    mean, ci = mean_ci95(accs)
    sd = math.sqrt(sum((a - 0.625) ** 2 for a in accs) / 3)
    assert mean == pytest.approx(0.625) and ci == pytest.approx(1.96 * sd / 2)


def test_run_episodes_on_separable_and_random_embeddings():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 30)
    perfect = np.eye(6)[y] * 5 + rng.normal(0, 0.1, (len(y), 6))
    res = run_episodes(perfect, y, EpisodeSpec(4, 1, 5), episodes=50, seed=3)
    assert res.mean == 1.0 and res.ci95 == 0.0 and res.predictions.shape == (50, 20)
    y = np.repeat(np.arange(6), 300)
    noise = rng.normal(size=(len(y), 8))
    res = run_episodes(noise, y, EpisodeSpec(4, 5, 10), episodes=300, seed=3)
    assert abs(res.mean - 0.25) < 0.04  # chance level, and the CI is honest about it
    assert 0.005 < res.ci95 < 0.03
    same = run_episodes(noise, y, EpisodeSpec(4, 5, 10), episodes=300, seed=3,
                        classify=nearest_prototype("euclidean"))
    assert agreement(res, same) == 1.0


# ---- training ----
def _proto_cfg(run_dir, *extra: str):
    from edgekt.config import load_config

    return load_config(None, [
        f"run.dir={run_dir}", "model.name=cnn_xs", "method=protonet",
        "method_args={n_way: 6, k_shot: 5, n_query: 5, eval_episodes: 50}",
        "data.classes=[0,1,2,3,4,5]", "data.limit=1500", "data.batch_size=50",
        "optim.lr=0.003", "train.epochs=1", "train.progress=false", "train.threads=1",
        "train.deterministic=true", *extra])


def _base_splits():
    from edgekt.config import DataConfig
    from edgekt.data import build_splits

    return build_splits(DataConfig(name="fashion-mnist", classes=[0, 1, 2, 3, 4, 5], limit=1500))


def _episode_acc(model, split, info) -> float:
    emb = TorchEmbedder(model, info).embed(raw_images(split))
    return run_episodes(emb, split.targets.numpy(), EpisodeSpec(4, 1, 10), episodes=150,
                        seed=0).mean


def test_protonet_training_improves_novel_episode_accuracy(tmp_path):
    from edgekt.checkpoint import load_checkpoint
    from edgekt.config import DataConfig
    from edgekt.data import build_splits
    from edgekt.engine import fit
    from edgekt.engine.setup import build_model, model_from_checkpoint

    splits = _base_splits()
    cfg = _proto_cfg(tmp_path / "run")
    novel = build_splits(DataConfig(name="fashion-mnist", classes=[6, 7, 8, 9],
                                    val_fraction=0.0)).test
    torch.manual_seed(cfg.train.seed)
    before = _episode_acc(build_model(cfg.model, splits.info), novel, splits.info)
    result = fit(cfg, splits=splits)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    model, info = model_from_checkpoint(ck)
    after = _episode_acc(model, novel, info)
    assert result.metrics["step"] == 30  # ceil(1500 / 50) episodes (data.limit, batch 50)
    assert after > before + 0.05, (before, after)
    assert ck["method"]["method"] == "protonet" and ck["method"]["n_way"] == 6
    assert int(ck["task"]["episodes_drawn"]) == 30
    # The loop's val/test accuracy is episode accuracy on base classes (not chance).
    assert result.metrics["val_acc"] > 0.4 and "val_episode_ci95" in result.metrics


def test_protonet_resume_draws_the_same_episodes(tmp_path):
    from edgekt.checkpoint import load_checkpoint
    from edgekt.engine.fit import Trainer

    splits = _base_splits()
    opts = ("train.epochs=2", "data.batch_size=150")  # 10 episodes per epoch
    full = Trainer(_proto_cfg(tmp_path / "a", *opts), splits=splits)
    full.run()
    part = Trainer(_proto_cfg(tmp_path / "b", *opts), splits=splits)
    part.run(checkpoint_every=4, stop_after_steps=14)  # killed after step 14, saved at 12
    resumed = Trainer(_proto_cfg(tmp_path / "b", *opts), resume=True, splits=splits)
    resumed.run()
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]["state_dict"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_protonet_learned_scale_and_bad_args(tmp_path):
    from edgekt.engine.fit import Trainer

    splits = _base_splits()
    cfg = _proto_cfg(tmp_path / "s", "method_args={n_way: 3, k_shot: 2, n_query: 2, "
                                     "metric: cosine, learn_scale: true}")
    tr = Trainer(cfg, splits=splits)
    before = float(tr.task.log_scale.detach().exp())
    tr.run(stop_after_steps=5)
    assert before == pytest.approx(10.0) and float(tr.task.log_scale.detach().exp()) != before
    bad = _proto_cfg(tmp_path / "x", "method_args={n_wya: 3}")
    with pytest.raises(EdgektError, match="did you mean 'n_way'"):
        Trainer(bad, splits=splits)
    too_many = _proto_cfg(tmp_path / "y", "method_args={n_way: 7}")
    with pytest.raises(EdgektError, match="needs 7 classes but only 6"):
        Trainer(too_many, splits=splits)


def test_protonet_rotation_auxiliary_learns_and_l2_transform_is_recorded(tmp_path):
    """The rotation head (self-supervised auxiliary loss) learns to tell rotations apart well
    above chance from 30 episodes; it is saved with the task, and the checkpoint's recorded
    transform (l2) is what evaluation and the package then use."""
    from edgekt.checkpoint import load_checkpoint
    from edgekt.engine.fit import Trainer
    from edgekt.fewshot.episodes import normalise
    from edgekt.fewshot.evaluate import FewShotSetup

    splits = _base_splits()
    cfg = _proto_cfg(tmp_path / "rot", "method_args={n_way: 6, k_shot: 5, n_query: 5, "
                     "eval_episodes: 50, rotation_weight: 2.0, transform: l2}", "data.augment=true")
    tr = Trainer(cfg, splits=splits)
    tr.run()
    images = splits.val.images[:600].float()
    rotated, k = rotate_batch(images, torch.Generator().manual_seed(1))
    model, head = tr.model.eval(), tr.task.rot_head
    with torch.no_grad():
        pred = head(model.forward_features(normalise(rotated, splits.info))).argmax(1)
    assert float((pred == k).float().mean()) > 0.4  # chance: 0.25 (0.46 measured)
    ck = load_checkpoint(tmp_path / "rot" / "last.pt")
    assert torch.equal(ck["task"]["rot_head.weight"], head.weight.detach().cpu())
    assert ck["method"]["rotation_weight"] == 2.0 and ck["method"]["transform"] == "l2"
    assert FewShotSetup.from_checkpoint(ck, "rot").transform == "l2"
    assert FewShotSetup.from_checkpoint(ck, "rot", transform="none").transform == "none"


def test_example_configs_validate():
    from pathlib import Path

    from edgekt.config import load_config, validate
    from edgekt.fewshot.protonet import ProtoNetArgs

    paths = sorted((Path(__file__).parents[1] / "edgekt" / "configs").glob("fewshot_*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(path)
        assert cfg.data.classes == [0, 1, 2, 3, 4, 5]
        if cfg.method == "protonet":
            validate(ProtoNetArgs, cfg.method_args, str(path))


def test_protonet_starts_from_a_distilled_students_backbone(tiny_checkpoint, tmp_path):
    from edgekt.checkpoint import load_checkpoint
    from edgekt.engine.fit import Trainer

    cfg = _proto_cfg(tmp_path / "ft", f"model.weights={tiny_checkpoint}", "finetune.new_head=true")
    tr = Trainer(cfg, splits=_base_splits())
    student = load_checkpoint(tiny_checkpoint)["model"]["state_dict"]
    own = tr.model.state_dict()
    assert torch.equal(own["stage1.0.0.weight"], student["stage1.0.0.weight"])
    assert own["head.weight"].shape == (6, student["head.weight"].shape[1])  # new 6-class head
    tr.run(stop_after_steps=3)
    assert not torch.equal(tr.model.state_dict()["stage1.0.0.weight"], student["stage1.0.0.weight"])
