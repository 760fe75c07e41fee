"""The pipeline's report: one row per artifact, the Pareto front, report.md/json and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekt.io import atomic_write_text

RUNTIME_COLORS = {"torch-eager": "tab:gray", "onnxruntime": "tab:blue", "openvino": "tab:purple",
                  "litert": "tab:orange"}
"""Pareto plot colour per runtime (any other runtime: olive); the legend lists those present."""


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Mark points (latency, accuracy) that no other point beats on both (lower, higher)."""
    out = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            (lat2 <= lat and acc2 >= acc) and (lat2 < lat or acc2 > acc)
            for j, (lat2, acc2) in enumerate(points) if j != i
        )
        out.append(not dominated)
    return out


def build_rows(teacher: dict[str, Any], students: dict[str, Any], exports: dict[str, Any],
               profile: dict[str, Any]) -> list[dict[str, Any]]:
    """Join training, export parity and profile results into one row per artifact x device."""
    eager = profile.get("torch_eager", {})
    base = eager.get("teacher", {}).get("p50_ms")
    trained = {"teacher": teacher, **students}
    rows = []
    for name, p in eager.items():
        rows.append({"name": name, "kind": "teacher" if name == "teacher" else "student",
                     "runtime": "torch-eager", "precision": "fp32", "device": "local",
                     "params": trained[name]["params"], "macs": trained[name].get("macs"),
                     "size_bytes": None, "test_acc": trained[name]["test_acc"], "agreement": 1.0,
                     "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"], "status": "ok",
                     "samples_ms": p["samples_ms"]})
    for r in profile.get("rows", []):
        name = r["name"]
        if r.get("status") != "ok":
            rows.append({"name": name, "kind": "teacher" if name == "teacher" else "student",
                         "runtime": r.get("backend") or "-", "precision": r.get("precision"),
                         "device": r.get("device"), "params": trained[name]["params"],
                         "macs": trained[name].get("macs"), "status": r.get("status"),
                         "error": r.get("error"), "p50_ms": None,
                         "p99_ms": None, "test_acc": None, "agreement": None,
                         "size_bytes": None})
            continue
        art = _artifact(exports[name], r["file"])
        par = art.get("parity") or {}
        runtime = r["backend"] if r["backend"] == art.get("runtime") else \
            f"{r['backend']} ({art.get('runtime')} file)"
        rows.append({
            "name": name, "kind": "teacher" if name == "teacher" else "student",
            "runtime": runtime, "precision": art.get("precision"), "device": r["device"],
            "params": trained[name]["params"], "macs": trained[name].get("macs"),
            "size_bytes": _size(exports[name], art),
            "test_acc": par.get("test_acc"), "agreement": par.get("test_agreement",
                                                                  par.get("agreement")),
            "parity_passed": par.get("passed"), "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "load_ms": r.get("load_ms"), "first_ms": r.get("first_ms"),
            "peak_rss_mb": r.get("peak_rss_mb"), "status": "ok", "samples_ms": r["samples_ms"],
        })
    for row in rows:
        row["speedup_vs_teacher_eager"] = (base / row["p50_ms"]) if base and row["p50_ms"] else None
        prune = trained[row["name"]].get("prune")
        row["pruned_from"] = prune["from"] if prune else None
        twin = trained[row["name"]].get("scratch") or {}
        row["scratch_acc"] = twin.get("test_acc")
        row["kd_gain_pt"] = trained[row["name"]].get("kd_gain_pt")
    for device in {r["device"] for r in rows}:
        ok = [r for r in rows if r["device"] == device and r["p50_ms"] and r["test_acc"]]
        for r, front in zip(ok, pareto_front([(r["p50_ms"], r["test_acc"]) for r in ok]),
                            strict=True):
            r["pareto"] = front
    return rows


def _artifact(export: dict[str, Any], file: str) -> dict[str, Any]:
    for a in export["artifacts"]:
        if Path(a["file"]).name == file:
            return a
    return {}


def _size(export: dict[str, Any], art: dict[str, Any]) -> int | None:
    files = art.get("files") or [art.get("file")]
    d = Path(export["dir"])
    try:
        return sum((d / f).stat().st_size for f in files if f)
    except OSError:
        return None


def gain_table(students: dict[str, Any]) -> str:
    """What distillation bought: each KD student against its scratch twin (PyTorch, test split)."""
    lines = ["| student | params | MACs | KD test acc | scratch twin test acc | KD gain (pt) |",
             "|---|---|---|---|---|---|"]
    pruned = False
    for name, r in students.items():
        twin = r.get("scratch")
        if not twin:
            continue
        label = name
        if r.get("prune"):
            pruned = True
            p = r["prune"]
            label += f" (pruned {p['from']}, {p['macs_fraction']:.0%} of its MACs)"
        lines.append(f"| {label} | {r['params']:,} | {_count(r.get('macs'))} | {r['test_acc']:.4f} "
                     f"| {twin['test_acc']:.4f} | {r['kd_gain_pt']:+.2f} |")
    if len(lines) == 2:
        return ""
    note = (" A pruned student starts from the pruned teacher's weights; its twin is the same "
            "pruned architecture freshly initialised." if pruned else "")
    return ("## What distillation bought\n\nEach distilled student against the same student "
            "trained without a teacher (same model, epochs, seed, data and augmentation), "
            f"PyTorch test accuracy.{note}\n\n" + "\n".join(lines) + "\n\n## Artifacts\n\n")


def _count(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def markdown(rows: list[dict[str, Any]], teacher: dict[str, Any],
             students: dict[str, Any] | None = None) -> str:
    head = ("| model | runtime | precision | device | params | MACs | size (KB) | test acc "
            "| agreement | scratch acc | KD gain (pt) | p50 (ms) | p99 (ms) "
            "| speed-up vs teacher eager | Pareto |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = []
    for r in sorted(rows, key=lambda r: (r["device"], r["p50_ms"] or 1e9)):
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['runtime']} | {r['precision'] or '-'} | "
                         f"{r['device']} | {r['params']} | {_count(r.get('macs'))} | - | - | - "
                         f"| - | - | {r['status']}: "
                         f"{(r.get('error') or '')[:60]} | - | - | - |")
            continue
        size = None if r["size_bytes"] is None else r["size_bytes"] / 1024
        speed = r["speedup_vs_teacher_eager"]
        lines.append(
            f"| {r['name']} | {r['runtime']} | {r['precision']} | {r['device']} | {r['params']:,} "
            f"| {_count(r.get('macs'))} | {f(size, '.0f')} | {f(r['test_acc'], '.4f')} "
            f"| {f(r['agreement'], '.4f')} "
            f"| {f(r.get('scratch_acc'), '.4f')} | {f(r.get('kd_gain_pt'), '+.2f')} "
            f"| {f(r['p50_ms'], '.3f')} | {f(r['p99_ms'], '.3f')} "
            f"| {f(speed, '.1f')}{'x' if speed else ''} "
            f"| {'**yes**' if r.get('pareto') else ''} |"
        )
    intro = (f"# edgekt pipeline report\n\nTeacher: `{teacher['model']}` ({teacher['params']:,} "
             f"params, {_count(teacher.get('macs'))} MACs per image, test accuracy "
             f"{teacher['test_acc']:.4f}). MACs are torch-pruning's count, the one `prune` "
             f"targets use. Latencies are batch-1 medians "
             f"of the model call alone, each runtime profiled in its own process; the speed-up is "
             f"against the teacher in PyTorch eager on this machine. Pareto: no other row is "
             f"both faster and more accurate on the same device.\n\n")
    return intro + gain_table(students or {}) + head + "\n".join(lines) + "\n"


def plots(rows: list[dict[str, Any]], run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in rows if r["status"] == "ok" and r["p50_ms"] and r["test_acc"]]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"fp32": "o", "fp16": "s", "int8": "^"}
    for r in ok:
        color = RUNTIME_COLORS.get(r["runtime"].split()[0], "tab:olive")
        ax.scatter(r["p50_ms"], r["test_acc"] * 100, marker=markers.get(r["precision"], "x"),
                   c=color, s=70 if r.get("pareto") else 30,
                   edgecolors="red" if r.get("pareto") else "none")
    twins = [r for r in ok if r["runtime"] == "torch-eager" and r.get("scratch_acc")]
    for r in twins:  # same architecture, so the same latency as the distilled student
        ax.scatter(r["p50_ms"], r["scratch_acc"] * 100, marker="o", facecolors="none",
                   edgecolors="tab:gray", s=50)
        ax.plot([r["p50_ms"]] * 2, [r["scratch_acc"] * 100, r["test_acc"] * 100], c="tab:gray",
                lw=0.8, ls=":")
    if twins:
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="tab:gray",
                   label="scratch twin (no teacher)")
    front = sorted((r["p50_ms"], r["test_acc"] * 100) for r in ok if r.get("pareto"))
    if front:
        ax.plot(*zip(*front, strict=True), "r--", lw=1, label="Pareto front")
    for rt, color in RUNTIME_COLORS.items():
        if any(r["runtime"].split()[0] == rt for r in ok):
            ax.scatter([], [], c=color, label=rt)
    for prec, m in markers.items():
        ax.scatter([], [], c="k", marker=m, label=prec)
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 p50 latency (ms, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("edgekt: accuracy vs latency")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from edgekt.devices.plot import annotate_without_overlap

    annotate_without_overlap(ax, [(r["p50_ms"], r["test_acc"] * 100) for r in ok],
                             [r["name"] for r in ok])
    fig.savefig(run_dir / "pareto.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in ok:
        s = np.sort(np.asarray(r.get("samples_ms") or []))
        if s.size:
            ax.plot(s, np.arange(1, s.size + 1) / s.size,
                    label=f"{r['name']} {r['runtime']} {r['precision']}")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("latency CDF (batch 1)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "latency_cdf.png", dpi=120)
    plt.close(fig)
    return ["pareto.png", "latency_cdf.png"]


def build_report(run_dir: Path, teacher: dict[str, Any], students: dict[str, Any],
                 exports: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    rows = build_rows(teacher, students, exports, profile)
    files = plots(rows, run_dir)
    slim = [{k: v for k, v in r.items() if k != "samples_ms"} for r in rows]
    atomic_write_text(run_dir / "report.json", json.dumps(
        {"teacher": teacher, "students": students, "rows": slim}, indent=2))
    atomic_write_text(run_dir / "report.md", markdown(rows, teacher, students))
    return {"files": ["report.md", "report.json", *files], "rows": len(rows)}
