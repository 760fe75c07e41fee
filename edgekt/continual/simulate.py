"""Replay a real labelled stream through the device learner and measure forgetting.

The stream is embedded once by the exported (frozen) embedding model on the device runtime;
each strategy is then the same :class:`edgekt.devices.continual.ContinualLearner` with another
configuration, fed the embedded stream in batches exactly as an app would call ``observe``.

Scenarios (Fashion-MNIST, real images):
  * ``class-incremental``: Split-Fashion-MNIST, 5 experiences of 2 new classes each; a test
    set per experience holds the test images of its classes.
  * ``drift``: all 10 classes in every experience; from experience 2 on the camera changes
    (lower contrast, brighter, blurred). Test sets: clean and shifted images.

Strategies: ``naive`` (head fine-tuning, no memory), ``replay`` (ours: class-balanced latent
replay + guarded updates + drift detection), ``ncm`` (class-mean prototypes) and ``joint``
(the upper bound: after each experience, one more pass over all data seen so far, shuffled,
as Avalanche's cumulative strategy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekt.devices.continual import ContinualLearner, LearnerConfig
from edgekt.errors import EdgektError

SCENARIOS = ("class-incremental", "drift")
STRATEGIES = ("naive", "replay", "ncm", "joint")


@dataclass
class Experience:
    """One step of the stream: training samples (embedded) and its own test set."""

    name: str
    z_train: np.ndarray
    y_train: np.ndarray
    z_test: np.ndarray
    y_test: np.ndarray


@dataclass
class StrategyResult:
    strategy: str
    matrix: list[list[float]]
    """matrix[i][j]: accuracy on experience j's test set after training on experience i."""
    final_avg_acc: float
    forgetting: float
    update_ms_median: float
    update_ms_p95: float
    update_cpu_ms_median: float
    """CPU time of one update (this process), unaffected by other processes on the cores."""
    memory_bytes: int
    counters: dict[str, int]
    seconds: float
    seed: int = 0


@dataclass
class SimulationReport:
    scenario: str
    experiences: list[str]
    backbone: str
    embedding_dim: int
    batch_size: int
    buffer_bytes: int
    results: list[StrategyResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- input shifts


def camera_shift(images: np.ndarray, kind: str = "all") -> np.ndarray:
    """A changed camera: ``brightness`` (+60), ``contrast`` (x0.5), ``blur`` (3x3 box) or ``all``.

    ``images`` are uint8 (N, H, W[, C]); the result is uint8 of the same shape.
    """
    kinds = ("brightness", "contrast", "blur") if kind == "all" else (kind,)
    unknown = set(kinds) - {"brightness", "contrast", "blur"}
    if unknown:
        raise EdgektError(f"shift {kind!r}: expected brightness, contrast, blur or all")
    x = images.astype(np.float32)
    if "contrast" in kinds:
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * 0.5 + mean
    if "brightness" in kinds:
        x = x + 60.0
    if "blur" in kinds:
        pad = np.pad(x, [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3), mode="edge")
        h, w = x.shape[1:3]
        x = sum(pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- scenarios


def class_incremental(z_tr: np.ndarray, y_tr: np.ndarray, z_te: np.ndarray, y_te: np.ndarray,
                      labels: list[str], n_experiences: int = 5) -> list[Experience]:
    """Split the classes in order into ``n_experiences`` groups (2 each for 10 classes)."""
    classes = np.unique(y_tr)
    if len(classes) % n_experiences:
        raise EdgektError(f"{len(classes)} classes do not split into {n_experiences} experiences")
    out = []
    for group in np.split(classes, n_experiences):
        tr, te = np.isin(y_tr, group), np.isin(y_te, group)
        name = "+".join(labels[c] for c in group)
        out.append(Experience(name, z_tr[tr], y_tr[tr], z_te[te], y_te[te]))
    return out


def drift_experiences(embed: Callable[[np.ndarray], np.ndarray], x_tr: np.ndarray,
                      y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, *,
                      n_experiences: int = 2, shift: str = "all", seed: int = 0
                      ) -> list[Experience]:
    """Same classes throughout; experiences after the first see camera-shifted images."""
    order = np.random.default_rng(seed).permutation(len(y_tr))
    parts = np.array_split(order, n_experiences)
    z_te_clean, z_te_shift = embed(x_te), embed(camera_shift(x_te, shift))
    out = []
    for i, idx in enumerate(parts):
        shifted = i > 0
        x = camera_shift(x_tr[idx], shift) if shifted else x_tr[idx]
        out.append(Experience(f"{'shifted' if shifted else 'clean'} #{i + 1}", embed(x),
                              y_tr[idx], z_te_shift if shifted else z_te_clean, y_te))
    return out


# --------------------------------------------------------------------------- strategies


def strategy_config(strategy: str, base: LearnerConfig) -> LearnerConfig:
    """The learner configuration that implements ``strategy`` (same head, same lr)."""
    if strategy == "replay":
        return base
    if strategy == "ncm":
        return LearnerConfig(**{**asdict(base), "head": "ncm", "buffer_bytes": 0})
    if strategy in ("naive", "joint"):
        return LearnerConfig(**{**asdict(base), "buffer_bytes": 0, "drift": "none"})
    raise EdgektError(f"unknown strategy {strategy!r} (valid: {', '.join(STRATEGIES)})")


def _accuracy(learner: ContinualLearner, exp: Experience, labels: list[str]) -> float:
    if not learner.labels:
        return 0.0
    pred = np.array(learner.labels)[learner.predict_indices(exp.z_test)]
    return float((pred == np.array(labels)[exp.y_test]).mean())


def run_strategy(strategy: str, experiences: list[Experience], labels: list[str],
                 config: LearnerConfig, *, batch_size: int = 32, seed: int = 0
                 ) -> StrategyResult:
    """Stream ``experiences`` through a fresh learner; evaluate after each experience."""
    learner = ContinualLearner(None, replace(strategy_config(strategy, config), seed=seed),
                               dim=experiences[0].z_train.shape[1])
    rng = np.random.default_rng(seed)
    names = np.array(labels)
    matrix, times, cpu = [], [], []
    seen_z: list[np.ndarray] = []
    seen_y: list[np.ndarray] = []
    t0 = time.perf_counter()
    for exp in experiences:
        if strategy == "joint":  # all data so far, i.i.d.
            seen_z.append(exp.z_train)
            seen_y.append(exp.y_train)
            z, y = np.concatenate(seen_z), np.concatenate(seen_y)
        else:
            z, y = exp.z_train, exp.y_train
        order = rng.permutation(len(y))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            res = learner.observe_embeddings(z[idx], names[y[idx]].tolist())
            times.append(res.update_ms)
            cpu.append(res.update_cpu_ms)
        matrix.append([_accuracy(learner, e, labels) for e in experiences])
    ms = np.array(times)
    return StrategyResult(strategy, matrix, float(np.mean(matrix[-1])), forgetting(matrix),
                          float(np.median(ms)), float(np.percentile(ms, 95)),
                          float(np.median(cpu)), learner.memory_bytes, dict(learner.counters),
                          time.perf_counter() - t0, seed)


def forgetting(matrix: list[list[float]]) -> float:
    """Average forgetting: per earlier experience, its best accuracy minus its final one."""
    t = len(matrix)
    if t < 2:
        return 0.0
    return float(np.mean([max(matrix[i][j] for i in range(j, t - 1)) - matrix[-1][j]
                          for j in range(t - 1)]))


# --------------------------------------------------------------------------- backbone


def embed_images(model: Any, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """Embed uint8 (N, H, W[, C]) images with a device model (``embed``), in batches."""
    return np.concatenate([np.asarray(model.embed(images[i:i + batch]), np.float32)
                           for i in range(0, len(images), batch)])


def grid_embedding(net: Any, grid: int, stage: int | None = None) -> Any:
    """The trunk of ``net`` up to ``stage`` (all stages by default), its feature map
    average-pooled to ``grid x grid`` cells.

    ``grid=1`` is the usual global-average-pooled embedding. A finer grid keeps where things
    are in the image, which matters when the backbone was trained on another domain: a linear
    probe on Fashion-MNIST over an MNIST-trained cnn_s gave 72.6% with grid 1 and 81.1% with
    grid 3 (10k training images, logistic regression). An earlier stage keeps more generic
    features: the latent layer of latent replay (cnn_s stage 2 at grid 5: 32 x 25 = 800 values).
    """
    import torch

    class GridEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = torch.nn.Sequential(*net.stages()[:stage])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fmap = self.trunk(x)
            # ceil-mode pooling with a fixed kernel: ONNX has no adaptive pooling to a grid
            # that does not divide the map (7x7 -> 3x3 uses 3x3 windows, the last ones partial).
            k = -(-fmap.shape[-1] // grid)
            cells = torch.nn.functional.avg_pool2d(fmap, k, k, ceil_mode=True)
            return cells.flatten(1)

    return GridEmbedding().eval()


def pretrain_backbone(source: str, out_dir: Path, *, model: str = "cnn_s", epochs: int = 5,
                      seed: int = 0, limit: int | None = None, grid: int = 3,
                      stage: int | None = None) -> Path:
    """Train a backbone and export its (frozen) embedding to ONNX; returns the ``.onnx`` path.

    ``stage``: cut the backbone after this stage (default: after the last one) and export that
    feature map, pooled to ``grid x grid``, as the latent layer.

    ``source``: ``mnist-5k`` (a disjoint data source: handwritten digits, no Fashion-MNIST
    image at all) or ``experience1`` (Fashion-MNIST classes 0 and 1 only, the first
    experience of the class-incremental stream). Neither sees a later class, so the
    class-incremental numbers carry no leak from the future.
    """
    from edgekt.checkpoint import file_sha256, load_checkpoint
    from edgekt.config import load_config
    from edgekt.engine import fit
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.exporters.meta import build_meta
    from edgekt.exporters.onnx_export import export_onnx

    data = {"mnist-5k": ["data.name=mnist-5k"],
            "experience1": ["data.name=fashion-mnist", "data.classes=[0, 1]"]}
    if source not in data:
        raise EdgektError(f"backbone source {source!r}: expected mnist-5k or experience1")
    cut = "" if stage is None else f"-st{stage}"
    onnx_path = out_dir / f"backbone-{source}-{model}-e{epochs}-s{seed}-g{grid}{cut}.onnx"
    if onnx_path.exists():
        return onnx_path
    run = out_dir / f"run-{source}-{model}-e{epochs}-s{seed}"
    overrides = [*data[source], f"run.dir={run}", f"model.name={model}", f"train.epochs={epochs}",
                 f"train.seed={seed}", "train.progress=false", "train.threads=2",
                 "data.val_fraction=0.1", "optim.lr=0.003"]
    if limit:
        overrides.append(f"data.limit={limit}")
    if not (run / "last.pt").exists():  # a finished pre-training run is reused
        fit(load_config(None, overrides), force=True)
    ckpt = load_checkpoint(run / "best.pt" if (run / "best.pt").exists() else run / "last.pt")
    net, info = model_from_checkpoint(ckpt)
    module = grid_embedding(net, grid, stage)
    import torch

    with torch.no_grad():
        dim = int(module(torch.zeros(1, info.in_channels, info.image_size,
                                     info.image_size)).shape[1])
    meta = build_meta(info, part="embedding", model_name=model, embedding_dim=dim,
                      dynamic_batch=True, source_sha256=file_sha256(run / "last.pt"))
    meta.extra.update(pretrained_on=source, grid=grid, stage=stage or len(net.stages()))
    export_onnx(module, meta, onnx_path)
    return onnx_path


# --------------------------------------------------------------------------- driver


def _per_class(y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``n`` samples per class (all when ``n`` is None), in stream order."""
    if n is None:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def check_options(scenario: str, backbone: str | Path, *, strategies: tuple[str, ...],
                  batch_size: int, train_per_class: int | None, test_per_class: int | None,
                  shift: str, threads: int | None) -> None:
    """Refuse bad options before the dataset is loaded and embedded (the slow part)."""
    if scenario not in SCENARIOS:
        raise EdgektError(f"unknown scenario {scenario!r} (valid: {', '.join(SCENARIOS)})")
    if not strategies or not all(strategies):
        raise EdgektError(f"strategies: give at least one of {', '.join(STRATEGIES)} "
                          f"(got {','.join(strategies)!r})")
    for s in strategies:
        strategy_config(s, LearnerConfig())
    if shift not in ("brightness", "contrast", "blur", "all"):
        raise EdgektError(f"shift {shift!r}: expected brightness, contrast, blur or all")
    for name, value, low in (("batch_size", batch_size, 1), ("train_per_class", train_per_class, 2),
                             ("test_per_class", test_per_class, 1), ("threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or value < low):
            raise EdgektError(f"{name} must be an integer >= {low}, got {value!r}")
    if not Path(backbone).exists():
        raise EdgektError(f"backbone {backbone}: no such file or directory (an exported "
                          f"embedding model: .onnx, .xml or an export directory)")


def load_stream(train_per_class: int | None = None, test_per_class: int | None = None,
                data_dir: str | None = None, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST as uint8 images and labels (train, test), optionally N per class."""
    from edgekt.config import DataConfig
    from edgekt.data import build_splits

    splits = build_splits(DataConfig(name="fashion-mnist", val_fraction=0.0, data_dir=data_dir))
    x_tr, y_tr = splits.train.images.numpy()[:, 0], splits.train.targets.numpy()
    x_te, y_te = splits.test.images.numpy()[:, 0], splits.test.targets.numpy()
    tr, te = _per_class(y_tr, train_per_class, seed), _per_class(y_te, test_per_class, seed)
    return x_tr[tr], y_tr[tr], x_te[te], y_te[te], list(splits.info.labels)


def simulate(scenario: str, backbone: str | Path, *, strategies: tuple[str, ...] = STRATEGIES,
             config: LearnerConfig | None = None, batch_size: int = 32,
             train_per_class: int | None = None, test_per_class: int | None = None,
             data_dir: str | None = None, shift: str = "all", threads: int | None = None,
             seed: int = 0, seeds: tuple[int, ...] | None = None) -> SimulationReport:
    """Run ``strategies`` on a Fashion-MNIST ``scenario`` with the exported ``backbone``.

    ``seed`` picks the per-class subsets; each of ``seeds`` (default: ``seed`` alone) runs
    every strategy once, with its own stream order and learner seed.
    """
    from edgekt.devices import EdgeModel

    check_options(scenario, backbone, strategies=strategies, batch_size=batch_size,
                  train_per_class=train_per_class, test_per_class=test_per_class, shift=shift,
                  threads=threads)
    config = config or LearnerConfig()
    x_tr, y_tr, x_te, y_te, labels = load_stream(train_per_class, test_per_class, data_dir, seed)
    model = EdgeModel.load(backbone, threads=threads)
    if scenario == "class-incremental":
        exps = class_incremental(embed_images(model, x_tr), y_tr, embed_images(model, x_te),
                                 y_te, labels)
    else:
        exps = drift_experiences(lambda x: embed_images(model, x), x_tr, y_tr, x_te, y_te,
                                 shift=shift, seed=seed)
    report = SimulationReport(scenario, [e.name for e in exps], str(backbone),
                              int(exps[0].z_train.shape[1]), batch_size, config.buffer_bytes)
    from threadpoolctl import threadpool_limits

    # The head's matrices are tiny: multi-threaded BLAS only adds synchronisation (10x slower
    # updates on a busy 2-core machine), and a device app would run them on one core too.
    with threadpool_limits(1):
        for run_seed in seeds or (seed,):
            for s in strategies:
                report.results.append(run_strategy(s, exps, labels, config,
                                                   batch_size=batch_size, seed=run_seed))
    return report
