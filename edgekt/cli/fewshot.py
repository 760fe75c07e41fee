"""``edgekt fewshot``: train, evaluate, package, and enroll/predict on image files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgekt.cli.options import (
    ConfigArg,
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    LimitOpt,
    ResumeOpt,
    RunDirOpt,
    SetOpt,
    cli_overrides,
    make_console,
)
from edgekt.errors import EdgektError

console = make_console()
app = typer.Typer(help="Few-shot prototype classifier: train on base classes, enroll new ones "
                       "on the device.", no_args_is_help=True)

CheckpointArg = Annotated[Path, typer.Argument(help="An edgekt checkpoint (.pt).",
                                               show_default=False)]
PackageArg = Annotated[Path, typer.Argument(help="An edge package (export directory) or .onnx "
                                                 "holding the embedding model.",
                                            show_default=False)]
ImagesArg = Annotated[list[Path], typer.Argument(help="PNG/JPEG image files.",
                                                 show_default=False)]
StateOpt = Annotated[Path | None, typer.Option(
    help="Classifier state file (default: PACKAGE/fewshot_state.npz).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="Runtime threads.")]
RecoverOpt = Annotated[bool, typer.Option(
    help="If the state file is damaged, restore its intact previous generation.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise EdgektError(f"expected comma-separated integers, got {text!r}") from None


@app.command()
def train(config: ConfigArg, set_: SetOpt = None, resume: ResumeOpt = False,
          force: ForceOpt = False, data_dir: DataDirOpt = None, limit: LimitOpt = None,
          device: DeviceOpt = None, run_dir: RunDirOpt = None) -> None:
    """Train on the base classes (data.classes) with protonet or supervised (SimpleShot)."""
    from edgekt.config import load_config
    from edgekt.engine import fit

    cfg = load_config(config, cli_overrides(set_, data_dir=data_dir, limit=limit, device=device,
                                            run_dir=run_dir))
    if cfg.data.classes is None:
        raise EdgektError(f"{config}: set data.classes to the base classes; the other classes "
                          f"stay unseen for few-shot evaluation")
    result = fit(cfg, resume=resume, force=force)
    console.print(f"[green]done[/]: base-class test accuracy "
                  f"{result.metrics.get('test_acc', float('nan')):.4f}; next: edgekt fewshot "
                  f"eval {result.run_dir / 'last.pt'}")


@app.command("eval")
def evaluate(
    checkpoint: CheckpointArg,
    package: Annotated[Path | None, typer.Option(
        help="Also evaluate this exported embedding package through edgekt.devices.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Novel-class dataset (default: the checkpoint's; another one = cross-domain).")
    ] = None,
    novel: Annotated[str | None, typer.Option(
        help="Novel classes, e.g. 6,7,8,9 (default: the dataset's non-base classes).")] = None,
    ways: Annotated[int | None, typer.Option(help="N-way (default: min(5, novel classes)).")
                    ] = None,
    shots: Annotated[str, typer.Option(help="K-shot values, comma-separated.")] = "1,5",
    queries: Annotated[int, typer.Option(help="Queries per class.")] = 15,
    episodes: Annotated[int, typer.Option(help="Episodes per K.")] = 600,
    seed: Annotated[int, typer.Option(help="Episode seed.")] = 0,
    split: Annotated[str, typer.Option(
        help="Novel-class images to draw episodes from: test, or train (validation episodes "
             "for choosing a recipe without touching the test images).")] = "test",
    transform: Annotated[str, typer.Option(
        help="Embedding transform: auto, none, l2, cl2n (SimpleShot).")] = "auto",
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy ± 95% CI over random episodes on novel classes (PyTorch and device)."""
    from edgekt.fewshot.evaluate import fewshot_evaluate

    shot_list = _ints(shots) or [1, 5]
    report = fewshot_evaluate(checkpoint, package=package, dataset=dataset, novel=_ints(novel),
                              ways=ways, shots=shot_list, queries=queries, episodes=episodes,
                              seed=seed, transform=transform, data_dir=data_dir, split=split)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    t = Table(title=f"{report['dataset']} novel classes ({report['n_novel_classes']}), "
                    f"transform {report['transform']}, metric {report['metric']}")
    for col in ("model", "episode", "episodes", "accuracy ± 95% CI", "agreement"):
        t.add_column(col)
    for name, rows in report["results"].items():
        for r in rows:
            agree = report.get("agreement", {}).get(r["k_shot"]) if name == "device" else None
            t.add_row(name, f"{r['n_way']}-way {r['k_shot']}-shot {r['n_query']}-query",
                      str(r["episodes"]), f"{100 * r['acc']:.2f} ± {100 * r['ci95']:.2f}%",
                      "" if agree is None else f"{100 * agree:.2f}%")
    console.print(t)
    for rule, r in report.get("open_set", {}).items():
        best = r["novel_by_shots"][r["calibration_shots"]]["best"]
        console.print(
            f"open set, {rule} rule (threshold {r['base']['threshold']:.4g} for "
            f"{100 * r['target_frr']:.0f}% false rejects on base classes): false accept / "
            f"reject {100 * r['base']['false_accept_rate']:.1f}% / "
            f"{100 * r['base']['false_reject_rate']:.1f}% on base, "
            f"{100 * r['novel']['false_accept_rate']:.1f}% / "
            f"{100 * r['novel']['false_reject_rate']:.1f}% on novel classes; best on novel: "
            f"{100 * best['far_at_frr']:.1f}% false accepts at 10% false rejects",
            highlight=False)


@app.command()
def package(
    checkpoint: CheckpointArg,
    out: Annotated[Path, typer.Argument(help="Package directory to write.", show_default=False)],
    force: ForceOpt = False,
    shots: Annotated[int, typer.Option(help="Shots simulated when calibrating.")] = 5,
    target_frr: Annotated[float, typer.Option(
        help="False-reject rate on base classes the threshold is set for.")] = 0.05,
    transform: Annotated[str, typer.Option(help="auto, none, l2, cl2n.")] = "auto",
    rejection: Annotated[str, typer.Option(
        help="Open-set rule: normalized (per-class radius from the shots' spread, whitened) "
             "or distance (one global distance threshold, the rule before format 2).")
    ] = "normalized",
    data_dir: DataDirOpt = None,
) -> None:
    """Export the embedding model and calibrate an empty classifier (open-set threshold)."""
    from edgekt.fewshot.package import build_package

    clf, rates = build_package(checkpoint, out, force=force, shots=shots, target_frr=target_frr,
                               transform=transform, data_dir=data_dir, rejection=rejection,
                               log=lambda m: console.print(m, highlight=False))
    console.print(f"[green]package[/] {out}: metric {clf.metric}, transform {clf.transform}, "
                  f"{clf.rejection} rejection, threshold {rates.threshold:.4g} (base classes: "
                  f"false accept "
                  f"{100 * rates.false_accept_rate:.1f}%, false reject "
                  f"{100 * rates.false_reject_rate:.1f}%); state {clf.path}")


def _load_images(paths: list[Path], channels: int) -> list[Any]:
    """Decode image files as an app would (Pillow), in the model's colour mode."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append(np.asarray(img.convert("L" if channels == 1 else "RGB")))
        except FileNotFoundError:
            raise EdgektError(f"image not found: {p}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise EdgektError(f"{p}: not a readable image ({exc})") from None
    return out


def _open(package_path: Path, state: Path | None, threads: int | None, recover: bool):
    from edgekt.devices.fewshot import open_classifier

    clf = open_classifier(package_path, state, threads=threads, recover=recover)
    meta = getattr(clf.embedder, "meta", None)
    channels = meta.preprocess.channels if meta is not None else 3
    return clf, channels


@app.command()
def enroll(package_path: PackageArg,
           label: Annotated[str, typer.Argument(help="Class label (any text).",
                                                show_default=False)],
           images: ImagesArg, state: StateOpt = None, replace: Annotated[bool, typer.Option(
               help="Start the label over instead of adding shots to it.")] = False,
           threads: ThreadsOpt = None, recover: RecoverOpt = False) -> None:
    """Enroll (or extend) a class from image files; saved before the command returns."""
    clf, channels = _open(package_path, state, threads, recover)
    n = clf.enroll(label, _load_images(images, channels), replace=replace)
    console.print(f"enrolled {label!r}: {n} shot(s); {len(clf.labels())} class(es) in "
                  f"{clf.path}", highlight=False)


@app.command()
def predict(package_path: PackageArg, images: ImagesArg, state: StateOpt = None,
            threads: ThreadsOpt = None, recover: RecoverOpt = False, as_json: JsonOpt = False
            ) -> None:
    """Classify image files with the enrolled classes ('unknown' when none is close)."""
    clf, channels = _open(package_path, state, threads, recover)
    preds = clf.predict_batch(_load_images(images, channels))
    rows = [{"image": str(p), "label": r.label, "nearest": r.nearest, "distance": r.distance,
             "score": r.score, "novelty": r.novelty}
            for p, r in zip(images, preds, strict=True)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title=f"{clf.rejection} rejection, threshold "
                    f"{clf.threshold if clf.threshold is not None else 'none'}")
    for col in ("image", "label", "nearest", "distance", "score", "novelty"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["image"], r["label"] if r["label"] is not None else "[yellow]unknown[/]",
                  r["nearest"], f"{r['distance']:.4g}", f"{r['score']:.3f}",
                  "" if r["novelty"] is None else f"{r['novelty']:.3g}")
    console.print(t)


@app.command()
def remove(package_path: PackageArg,
           label: Annotated[str, typer.Argument(help="Label to forget.", show_default=False)],
           state: StateOpt = None, recover: RecoverOpt = False) -> None:
    """Forget an enrolled class."""
    clf, _ = _open(package_path, state, None, recover)
    clf.remove(label)
    console.print(f"removed {label!r}; {len(clf.labels())} class(es) left", highlight=False)


@app.command("list")
def list_labels(package_path: PackageArg, state: StateOpt = None, recover: RecoverOpt = False,
                as_json: JsonOpt = False) -> None:
    """Enrolled labels with their shot counts, and the rejection threshold."""
    clf, _ = _open(package_path, state, None, recover)
    rows = {label: clf.shots(label) for label in clf.labels()}
    if as_json:
        print(json.dumps({"labels": rows, "threshold": clf.threshold,
                          "rejection": clf.rejection, "metric": clf.metric,
                          "transform": clf.transform}, indent=2))
        return
    for label, n in rows.items():
        console.print(f"{label}\t{n} shot(s)", highlight=False)
    console.print(f"{len(rows)} class(es); {clf.rejection} rejection, threshold "
                  f"{clf.threshold}", highlight=False)
