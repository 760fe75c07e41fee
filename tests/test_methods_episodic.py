"""Siamese, matching, relation and MAML on small real Fashion-MNIST slices."""

from __future__ import annotations

import pytest
import torch

from edgekt.config import load_config
from edgekt.data import Splits
from edgekt.engine.fit import Trainer
from edgekt.errors import EdgektError
from edgekt.fewshot.episodes import EpisodeSpec
from edgekt.methods.maml import episode_logits, features, head_inner_loop, inner_loop
from edgekt.methods.siamese import sample_pairs
from edgekt.models import Embedding, create_model

BASE = ["model.name=cnn_xs", "train.epochs=1", "optim.lr=0.003", "train.progress=false",
        "train.threads=1", "data.batch_size=100"]
ARGS = "n_way: 3, k_shot: 2, n_query: 3, eval_episodes: 5, eval_images: 200"
# Enough episodes to learn, and enough evaluation episodes (360 queries) to see it.
LEARN = ("n_way: 3, k_shot: 2, n_query: 3, eval_episodes: 40, eval_images: 300, "
         "episodes_per_epoch: 40")


def _keep(split, classes):
    keep = torch.isin(split.targets, torch.tensor(classes))
    sub = split.subset(torch.nonzero(keep).flatten())
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    sub.targets = remap[sub.targets]
    return sub


@pytest.fixture(scope="module")
def base_novel(fashion_splits):
    """Base classes 0-5 (400 training images) and novel classes 6-9 (test images)."""
    s = fashion_splits
    base = [0, 1, 2, 3, 4, 5]
    train = _keep(s.train, base)
    train = train.subset(torch.arange(400))
    splits = Splits(train, _keep(s.val, base), _keep(s.test, base), s.info)
    return splits, _keep(s.test, [6, 7, 8, 9])


def test_pair_sampler_balanced_and_correct():
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    a, b, same = sample_pairs(y, 20, torch.Generator().manual_seed(0))
    assert int(same.sum()) == 10
    assert torch.equal(y[a] == y[b], same.bool())
    assert bool((a[:10] != b[:10]).all())
    with pytest.raises(EdgektError, match="at least 2 classes"):
        sample_pairs(torch.zeros(5, dtype=torch.long), 4, torch.Generator())


@pytest.mark.parametrize("method,extra", [("siamese", "pairs: 16, "), ("matching", ""),
                                          ("matching", "fce: true, "),
                                          ("matching", "metric: euclidean, "),
                                          ("relation", ""), ("relation", "loss: mse, "),
                                          ("maml", "inner_steps: 1, eval_inner_steps: 2, "
                                                   "meta_batch: 1, "),
                                          ("maml", "inner_steps: 1, eval_inner_steps: 1, "
                                                   "meta_batch: 1, adapt: head, "),
                                          ("maml", "inner_steps: 1, eval_inner_steps: 1, "
                                                   "meta_batch: 1, head_init: proto, "
                                                   "inner_lr: 0.01, "),
                                          ("maml", "meta_batch: 1, head_init: proto, "
                                                   "inner_lr: 0.01, bn: episode, "
                                                   "eval_bn: running, ")])
def test_method_trains_and_evaluates_on_novel_classes(tmp_path, base_novel, method, extra):
    splits, novel = base_novel
    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", f"method={method}",
                             f"method_args={{{extra}{LEARN}}}"])
    tr = Trainer(cfg, splits=splits)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    untrained = tr.task.extra_metrics(tr.model, "val")["acc"]
    m = tr.run().metrics
    # 3-way base-class episodes: chance is 1/3; 40 training episodes must beat both chance and
    # the untrained network by a margin well beyond the evaluation noise (~0.025).
    assert m["val_acc"] > 1 / 3 + 0.15 and m["val_acc"] > untrained + 0.08, (untrained, m)
    assert "val_episode_ci95" in m and tr.step == 40
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    res = tr.task.evaluate(tr.model, novel, EpisodeSpec(3, 1, 4), episodes=6, seed=3)
    assert res.predictions.shape == (6, 12)
    # Evaluation (MAML's adaptation included) leaves the model untouched.
    assert all(torch.equal(state[k], v) for k, v in tr.model.state_dict().items())
    assert tr.task.episodes_drawn.item() == tr.step  # one episode (or pair set) per step


def test_more_shots_than_a_class_has_fails_before_training(tmp_path, base_novel):
    splits, _ = base_novel
    tiny = Splits(splits.train.subset(torch.arange(30)), splits.val, splits.test, splits.info)
    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", "method=matching",
                             "method_args={n_way: 3, k_shot: 20, n_query: 15}"])
    with pytest.raises(EdgektError, match="needs 35 samples per class"):
        Trainer(cfg, splits=tiny)
    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", "method=relation",
                             "method_args={n_way: 9}"])
    with pytest.raises(EdgektError, match="needs 9 classes"):
        Trainer(cfg, splits=splits)


def test_maml_inner_loop_second_vs_first_order():
    torch.manual_seed(0)
    net = create_model("cnn_xs", num_classes=3, in_channels=1, image_size=12)
    trunk = Embedding(net)
    params = {k: p for k, p in trunk.named_parameters() if not k.startswith("net.head.")}
    head = torch.zeros(3, net.embedding_dim, requires_grad=True)
    params.update({"head.weight": head, "head.bias": torch.zeros(3, requires_grad=True)})
    xs, ys = torch.randn(6, 1, 12, 12), torch.tensor([0, 0, 1, 1, 2, 2])
    xq, yq = torch.randn(6, 1, 12, 12), ys
    keys = list(params)
    grads = {}
    for first in (False, True):
        adapted = inner_loop(trunk, params, keys, xs, ys, steps=2, lr=0.5, first_order=first)
        loss = torch.nn.functional.cross_entropy(episode_logits(trunk, adapted, xq), yq)
        grads[first] = torch.autograd.grad(loss, head)[0]
    # Adaptation helps on the support set, and second order changes the meta-gradient.
    adapted = inner_loop(trunk, params, keys, xs, ys, steps=3, lr=0.5, first_order=True)
    ce = torch.nn.functional.cross_entropy
    assert ce(episode_logits(trunk, adapted, xs), ys) < ce(episode_logits(trunk, params, xs), ys)
    assert not torch.allclose(grads[False], grads[True])


def test_anil_head_loop_equals_the_full_loop_restricted_to_the_head():
    torch.manual_seed(0)
    net = create_model("cnn_xs", num_classes=3, in_channels=1, image_size=12)
    trunk = Embedding(net).eval()  # fixed statistics: the two paths see identical features
    params = {k: p for k, p in trunk.named_parameters() if not k.startswith("net.head.")}
    w = (0.1 * torch.randn(3, net.embedding_dim)).requires_grad_()
    b = torch.zeros(3, requires_grad=True)
    params.update({"head.weight": w, "head.bias": b})
    xs, ys = torch.randn(6, 1, 12, 12), torch.tensor([0, 0, 1, 1, 2, 2])
    full = inner_loop(trunk, params, ["head.weight", "head.bias"], xs, ys, steps=3, lr=0.5,
                      first_order=False)
    hw, hb = head_inner_loop(features(trunk, params, xs), ys, w, b, steps=3, lr=0.5,
                             first_order=False)
    assert torch.allclose(full["head.weight"], hw, atol=1e-6)
    assert torch.allclose(full["head.bias"], hb, atol=1e-6)


@pytest.mark.slow
def test_evaluate_checkpoint_uses_the_methods_own_classifier(tmp_path, fashion_splits):
    from edgekt.engine import fit
    from edgekt.methods.episodic import evaluate_checkpoint

    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", "data.limit=300",
                             "data.classes=[0,1,2,3,4,5]", "method=relation",
                             f"method_args={{{LEARN}}}"])
    fit(cfg)
    rep = evaluate_checkpoint(tmp_path / "last.pt", novel_classes=[6, 7, 8, 9], ways=4,
                              shots=(1,), episodes=20)
    assert rep["method"] == "relation" and rep["results"][0]["k_shot"] == 1
    # The trained relation module scores novel classes well above 4-way chance (0.25).
    assert rep["results"][0]["acc"] > 0.35, rep["results"]
    with pytest.raises(EdgektError, match="were base"):
        evaluate_checkpoint(tmp_path / "last.pt", novel_classes=[5, 6], ways=2, episodes=2)


def test_one_shot_euclidean_matching_is_the_prototype_classifier(tmp_path, base_novel):
    """With one shot per class, attention over -||q - s||^2 ranks classes exactly as
    ProtoNet's nearest prototype (Snell et al. 2017, sec. 2.4)."""
    from edgekt.fewshot.evaluate import nearest_prototype

    splits, _ = base_novel
    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", "method=matching",
                             f"method_args={{metric: euclidean, {ARGS}}}"])
    task = Trainer(cfg, splits=splits).task
    torch.manual_seed(0)
    support, query = torch.randn(4, 16), torch.randn(30, 16)
    labels = torch.tensor([2, 0, 3, 1])
    ours = task.scores(support, labels, query, 4).argmax(1)
    proto = nearest_prototype("euclidean")(support.numpy(), labels.numpy(), query.numpy(), 4)
    assert torch.equal(ours, torch.from_numpy(proto))


def test_matching_learned_temperature_is_trained_and_saved(tmp_path, base_novel):
    splits, _ = base_novel
    cfg = load_config(None, [*BASE, f"run.dir={tmp_path / 'm'}", "method=matching",
                             f"method_args={{learn_temperature: true, {ARGS}, "
                             "episodes_per_epoch: 5}"])
    tr = Trainer(cfg, splits=splits)
    assert any(p is tr.task.log_temperature for p in tr.task.extra_parameters())
    tr.run()
    assert abs(tr.task.temperature().item() - 10.0) > 1e-4
    assert "log_temperature" in tr.task.state_dict()
    # A fixed temperature stays out of the optimiser and of the task's saved state.
    cfg = load_config(None, [*BASE, f"run.dir={tmp_path / 'f'}", "method=matching",
                             f"method_args={{{ARGS}}}"])
    task = Trainer(cfg, splits=splits).task
    assert not task.extra_parameters() and not task.state_dict().keys() - {"episodes_drawn"}


def test_maml_episode_bn_normalises_with_the_whole_episode():
    torch.manual_seed(0)
    net = create_model("cnn_xs", num_classes=3, in_channels=1, image_size=12)
    trunk = Embedding(net).train()
    params = dict(trunk.named_parameters())
    xs, xq = torch.randn(3, 1, 12, 12), torch.randn(9, 1, 12, 12)
    joint = features(trunk, params, torch.cat([xs, xq]))
    assert torch.allclose(features(trunk, params, xs, xq), joint[:3], atol=1e-5)
    assert torch.allclose(features(trunk, params, xq, xs), joint[3:], atol=1e-5)
    assert not torch.allclose(features(trunk, params, xs), joint[:3], atol=1e-3)
