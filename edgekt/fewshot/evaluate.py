"""Few-shot evaluation protocol: many seeded random episodes on novel classes, mean ± 95% CI.

Embeddings of the novel-class images are computed once (the model is in eval mode, so an
image's embedding does not depend on its episode), then every episode classifies its queries
by the nearest support prototype with the device's own maths (``edgekt.devices.fewshot``), so
the host numbers and the device's behaviour cannot drift apart. The same function evaluates
embeddings from the PyTorch model (``TorchEmbedder``) and from the exported model run by
``edgekt.devices``; ``agreement`` compares their per-query predictions on identical episodes.

Other episodic methods reuse ``run_episodes`` / ``mean_ci95`` with their own classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekt.config import Config, DataConfig, validate
from edgekt.data import DatasetInfo, TensorSplit, build_splits
from edgekt.devices.fewshot import (
    REJECTIONS,
    Embedder,
    calibrate,
    class_means,
    distances,
    fit_normalizer,
    open_set_trials,
    rates_at,
    transform_embeddings,
)
from edgekt.errors import EdgektError
from edgekt.fewshot.episodes import EpisodeSampler, EpisodeSpec
from edgekt.models import EdgeNet

EpisodeClassifier = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]
"""(support embeddings, support labels, query embeddings, n_way) -> predicted query labels."""


def default_transform(method: str, metric: str = "euclidean") -> str:
    """The embedding transform few-shot evaluation uses for a checkpoint trained by ``method``.

    ProtoNet embeddings are used as trained (L2-normalised for cosine); a classifier's
    embedding gets SimpleShot's centring + L2 normalisation ("cl2n"), which works best there.
    """
    if method == "protonet":
        return "l2" if metric == "cosine" else "none"
    return "cl2n"


def mean_ci95(accs: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    a = np.asarray(accs, dtype=np.float64)
    if len(a) < 2:
        return float(a.mean()) if len(a) else float("nan"), float("nan")
    return float(a.mean()), float(1.96 * a.std(ddof=1) / math.sqrt(len(a)))


@dataclass
class FewShotResult:
    """Accuracy over ``episodes`` episodes of one spec (fractions, not percent)."""

    spec: EpisodeSpec
    episodes: int
    seed: int
    mean: float
    ci95: float
    predictions: np.ndarray = field(repr=False)
    """(episodes, n_way * n_query) predicted episode labels, for agreement checks."""

    def as_dict(self) -> dict[str, Any]:
        return {"n_way": self.spec.n_way, "k_shot": self.spec.k_shot,
                "n_query": self.spec.n_query, "episodes": self.episodes, "seed": self.seed,
                "acc": self.mean, "ci95": self.ci95}

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}%"


def nearest_prototype(metric: str) -> EpisodeClassifier:
    """The ProtoNet / device rule: label of the nearest support class mean."""

    def classify(support: np.ndarray, labels: np.ndarray, query: np.ndarray, n_way: int
                 ) -> np.ndarray:
        return distances(query, class_means(support, labels, n_way), metric).argmin(1)

    return classify


def run_episodes(emb: np.ndarray, targets: np.ndarray | torch.Tensor, spec: EpisodeSpec, *,
                 episodes: int = 600, seed: int = 0,
                 classify: EpisodeClassifier | None = None) -> FewShotResult:
    """Evaluate ``classify`` (default: nearest prototype, squared Euclidean) on
    ``episodes`` episodes drawn from precomputed embeddings ``emb`` with labels ``targets``."""
    classify = classify or nearest_prototype("euclidean")
    sampler = EpisodeSampler(torch.as_tensor(np.asarray(targets)), spec, seed=seed,
                             source="novel classes")
    accs, preds = np.empty(episodes), np.empty((episodes, spec.n_way * spec.n_query), np.int64)
    for i, ep in enumerate(sampler.episodes(episodes)):
        p = classify(emb[ep.support.numpy()], ep.support_labels.numpy(),
                     emb[ep.query.numpy()], spec.n_way)
        preds[i] = p
        accs[i] = float((p == ep.query_labels.numpy()).mean())
    mean, ci = mean_ci95(accs)
    return FewShotResult(spec, episodes, seed, mean, ci, preds)


def agreement(a: FewShotResult, b: FewShotResult) -> float:
    """Share of identical query predictions between two runs over the same episodes."""
    if a.predictions.shape != b.predictions.shape or a.seed != b.seed:
        raise EdgektError("agreement needs two results over the same episodes (spec, count, seed)")
    return float((a.predictions == b.predictions).mean())


# ---- embedding raw images on the host ----
class TorchEmbedder:
    """Host counterpart of the device embedder: raw uint8 images -> embeddings with PyTorch.

    Preprocesses exactly as the exported model's metadata prescribes, so it can stand in for
    the device model (``PrototypeClassifier(TorchEmbedder(model, info), ...)``).
    """

    def __init__(self, model: EdgeNet, info: DatasetInfo, batch_size: int = 512) -> None:
        self.model, self.info, self.batch_size = model.eval(), info, batch_size
        self._mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std).view(1, -1, 1, 1)

    @torch.no_grad()
    def embed(self, raw: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(raw)).float()
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N,H,W) or (N,H,W,C)
        out = []
        for chunk in x.split(self.batch_size):
            chunk = (chunk * (1.0 / 255.0) - self._mean) / self._std
            out.append(self.model.forward_features(chunk).float())
        return torch.cat(out).numpy()


def raw_images(split: TensorSplit) -> np.ndarray:
    """uint8 (N, C, H, W) -> what an app hands the device: (N, H, W) grey or (N, H, W, C)."""
    x = split.images.permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def embed_in_chunks(embedder: Embedder, raw: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Embed many images with any embedder, a bounded batch at a time."""
    return np.concatenate([np.asarray(embedder.embed(raw[i:i + chunk]))
                           for i in range(0, len(raw), chunk)])


# ---- the protocol on a checkpoint ----
@dataclass
class FewShotSetup:
    """Everything the protocol needs about a trained checkpoint."""

    model: EdgeNet
    info: DatasetInfo
    config: Config
    method: dict[str, Any]
    metric: str
    transform: str
    scale: float
    base_classes: list[int] | None

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], source: str,
                        transform: str = "auto") -> FewShotSetup:
        from edgekt.engine.setup import model_from_checkpoint

        model, info = model_from_checkpoint(ckpt, source)
        cfg: Config = validate(Config, ckpt.get("config", {}), f"{source} (stored config)")
        method = dict(ckpt.get("method") or {"method": cfg.method})
        metric = method.get("metric", "euclidean") if method.get("method") == "protonet" \
            else "euclidean"
        # "auto": what the training method recorded (protonet's method_args.transform), else
        # the method's default.
        chosen = method.get("transform") or default_transform(method.get("method", ""), metric) \
            if transform == "auto" else transform
        scale = float(method.get("scale", 1.0)) if method.get("method") == "protonet" else 10.0
        return cls(model, info, cfg, method, metric, chosen, scale, cfg.data.classes)

    def base_data(self, data_dir: str | None = None) -> DataConfig:
        data = self.config.data.model_copy(update={"limit": None, "augment": False})
        if data_dir is not None:
            data.data_dir = data_dir
        return data

    def novel_split(self, dataset: str | None = None, classes: list[int] | None = None,
                    split: str = "test", data_dir: str | None = None) -> TensorSplit:
        """Images of the novel classes: by default the classes of the training dataset that
        are not base classes (``data.classes``), or all classes of another ``dataset``."""
        name = dataset or self.config.data.name
        if classes is None:
            if name != self.config.data.name:
                classes = None  # cross-domain: every class is novel
            elif self.base_classes is None:
                raise EdgektError("the checkpoint was trained on all classes of "
                                  f"{name!r} (no data.classes): give the novel classes "
                                  "explicitly or another dataset")
            else:
                n_all = len(build_splits(DataConfig(name=name, data_dir=data_dir or
                                                    self.config.data.data_dir,
                                                    val_fraction=0.0)).info.labels)
                classes = [c for c in range(n_all) if c not in self.base_classes]
        if classes is not None and self.base_classes is not None and \
                name == self.config.data.name and set(classes) & set(self.base_classes):
            raise EdgektError(f"novel classes {sorted(set(classes) & set(self.base_classes))} "
                              f"were base (training) classes of this checkpoint")
        cfg = DataConfig(name=name, data_dir=data_dir or self.config.data.data_dir,
                         classes=classes, val_fraction=0.0, image_size=self.info.image_size)
        splits = build_splits(cfg)
        if splits.info.in_channels != self.info.in_channels:
            raise EdgektError(f"{name} has {splits.info.in_channels} channel(s); the model "
                              f"expects {self.info.in_channels}")
        if split not in ("test", "train"):
            raise EdgektError(f"novel split must be test or train, not {split!r}")
        return getattr(splits, split)

    def center(self, embedder: Embedder, data_dir: str | None = None,
               max_images: int = 10_000) -> np.ndarray | None:
        """The base-class mean embedding (SimpleShot's centring), or None if unused."""
        if self.transform != "cl2n":
            return None
        train = build_splits(self.base_data(data_dir)).train
        raw = raw_images(train)[:max_images]
        return embed_in_chunks(embedder, raw).mean(0)


def operating_points(known: np.ndarray, unknown: np.ndarray, rate: float = 0.10
                     ) -> dict[str, float]:
    """The best a threshold on these scores can do: the false-accept rate at ``rate`` false
    rejects and the false-reject rate at ``rate`` false accepts. The thresholds are set with
    the labels of these very samples, so these bound, not predict, a calibrated threshold."""
    t_frr = float(np.quantile(known, 1.0 - rate))
    t_far = float(np.quantile(unknown, rate))
    return {"rate": rate, "far_at_frr": float((unknown <= t_frr).mean()),
            "frr_at_far": float((known > t_far).mean())}


def open_set_report(metric: str, base_emb: np.ndarray, base_y: np.ndarray,
                    novel_emb: np.ndarray, novel_y: np.ndarray, *, shots: int = 5,
                    eval_shots: Sequence[int] = (5,), target_frr: float = 0.05,
                    trials: int = 50, seed: int = 0, rules: Sequence[str] = REJECTIONS,
                    outsiders: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Per rejection rule: calibrate on base classes (normaliser fitted and ``shots``-shot
    enrollment simulated there, as ``edgekt fewshot package`` does), then measure the rates
    on base and on novel classes enrolled with each of ``eval_shots`` shots, and the novel
    classes' best operating points (``operating_points``). With ``outsiders`` (e.g. held-out
    base-class images) also the rates when novel classes are enrolled and the unknowns are
    those outsiders.

    Embeddings must already be transformed. Returns ``{rule: {"base": rates, "novel":
    rates at shots, "novel_by_shots": {k: {"rates", "best"[, "outsiders", "outsiders_best"]}}}}``.
    """
    norm = fit_normalizer(base_emb, base_y) if "normalized" in rules else None
    out: dict[str, dict[str, Any]] = {}
    for rule in rules:
        n = norm if rule == "normalized" else None
        base = calibrate(base_emb, base_y, shots=shots, metric=metric, target_frr=target_frr,
                         trials=trials, seed=seed, normalizer=n)
        by_shots = {}
        for k in dict.fromkeys([shots, *eval_shots]):
            known, unknown = open_set_trials(novel_emb, novel_y, shots=k, metric=metric,
                                             trials=trials, seed=seed, normalizer=n)
            by_shots[k] = {"rates": rates_at(base.threshold, known, unknown).as_dict(),
                           "best": operating_points(known, unknown)}
            if outsiders is not None:
                known, unknown = open_set_trials(novel_emb, novel_y, shots=k, metric=metric,
                                                 trials=trials, seed=seed, normalizer=n,
                                                 outsiders=outsiders)
                by_shots[k]["outsiders"] = rates_at(base.threshold, known, unknown).as_dict()
                by_shots[k]["outsiders_best"] = operating_points(known, unknown)
        out[rule] = {"base": base.as_dict(), "novel": by_shots[shots]["rates"],
                     "novel_by_shots": by_shots, "calibration_shots": shots,
                     "target_frr": target_frr}
    return out


def evaluate_setup(setup: FewShotSetup, embedders: dict[str, Embedder], novel: TensorSplit, *,
                   ways: int, shots: Sequence[int] = (1, 5), queries: int = 15,
                   episodes: int = 600, seed: int = 0, center: np.ndarray | None = None
                   ) -> dict[str, dict[int, FewShotResult]]:
    """Run the protocol on ``novel`` for each embedder (e.g. ``torch`` and ``device``)."""
    y = novel.targets.numpy()
    raw = raw_images(novel)
    out: dict[str, dict[int, FewShotResult]] = {}
    for name, embedder in embedders.items():
        emb = transform_embeddings(embed_in_chunks(embedder, raw), setup.transform, center)
        out[name] = {k: run_episodes(emb, y, EpisodeSpec(ways, k, queries), episodes=episodes,
                                     seed=seed, classify=nearest_prototype(setup.metric))
                     for k in shots}
    return out



def fewshot_evaluate(checkpoint: str | Path, *, package: str | Path | None = None,
                     dataset: str | None = None, novel: list[int] | None = None,
                     ways: int | None = None, shots: Sequence[int] = (1, 5), queries: int = 15,
                     episodes: int = 600, seed: int = 0, transform: str = "auto",
                     split: str = "test", data_dir: str | None = None, open_set: bool = True,
                     threads: int | None = None, open_set_shots: Sequence[int] = (5,),
                     outsider_images: int = 2000) -> dict[str, Any]:
    """The whole protocol on a checkpoint (and, with ``package``, on its exported embedding
    model through ``edgekt.devices``): accuracy ± 95% CI per shot, host/device agreement,
    and open-set false-accept/false-reject rates of a base-calibrated threshold, for the
    normalised rule and the old global-distance one (``open_set_report``)."""
    from edgekt.checkpoint import load_checkpoint

    bad = {"ways": ways is not None and ways < 2, "queries": queries < 1, "episodes": episodes < 1,
           "shots": not shots or min(shots) < 1}
    if any(bad.values()):
        got = ", ".join(f"{k}={v!r}" for k, v in (("ways", ways), ("queries", queries),
                                                  ("episodes", episodes), ("shots", list(shots)))
                        if bad[k])
        raise EdgektError(f"invalid episode settings ({got}): ways >= 2, queries >= 1, "
                          "episodes >= 1 and every shot >= 1 are required")
    setup = FewShotSetup.from_checkpoint(load_checkpoint(checkpoint), str(checkpoint), transform)
    novel_split = setup.novel_split(dataset, novel, split, data_dir)
    n_classes = len(torch.unique(novel_split.targets))
    ways = ways or min(5, n_classes)
    embedders: dict[str, Embedder] = {"torch": TorchEmbedder(setup.model, setup.info)}
    if package is not None:
        from edgekt.devices.model import EdgeModel

        embedders["device"] = EdgeModel.load(package, threads=threads, part="embedding")
    center = setup.center(embedders["torch"], data_dir)
    results = evaluate_setup(setup, embedders, novel_split, ways=ways, shots=shots,
                             queries=queries, episodes=episodes, seed=seed, center=center)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint), "dataset": dataset or setup.config.data.name,
        "novel_classes": novel if novel is not None else "complement of base classes"
        if dataset in (None, setup.config.data.name) else "all",
        "n_novel_classes": n_classes, "split": split, "transform": setup.transform,
        "metric": setup.metric, "method": setup.method.get("method"),
        "results": {name: [r.as_dict() for r in res.values()] for name, res in results.items()},
    }
    if "device" in results:
        report["agreement"] = {k: agreement(results["torch"][k], results["device"][k])
                               for k in shots}
    if open_set:
        base = build_splits(setup.base_data(data_dir))
        calib = base.val if len(base.val) else base.test
        torch_emb = embedders["torch"]
        tf = setup.transform
        base_emb = transform_embeddings(embed_in_chunks(torch_emb, raw_images(calib)), tf, center)
        outsiders = None
        if dataset in (None, setup.config.data.name) and len(base.val):
            # Base-class test images as unknowns for enrolled novel classes (the realistic
            # mix: an app meets objects like those the embedding was trained on, too).
            outsiders = transform_embeddings(embed_in_chunks(
                torch_emb, raw_images(base.test)[:outsider_images]), tf, center)
        nov_emb = transform_embeddings(embed_in_chunks(torch_emb, raw_images(novel_split)), tf,
                                       center)
        report["open_set"] = open_set_report(setup.metric, base_emb, calib.targets.numpy(),
                                             nov_emb, novel_split.targets.numpy(), seed=seed,
                                             eval_shots=open_set_shots, outsiders=outsiders)
    return report
