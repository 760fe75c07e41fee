"""The device-side entry point: ``python edgekt-runner.pyz profile MODEL --backend ort ...``.

It runs inside the self-contained runner bundle (``bundle.py``) that the SSH transport copies
to a device, and locally in a fresh subprocess per backend. It imports only the standard
library until it knows what to do, so a device without numpy or onnxruntime gets a clear,
machine-readable error instead of a traceback. The result is one line ``EDGEKT-JSON {...}`` on
stdout (runtimes may print their own noise around it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

MARKER = "EDGEKT-JSON "
EXIT_USER, EXIT_MISSING = 3, 4


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekt-runner")
    sub = p.add_subparsers(dest="cmd", required=True)
    prof = sub.add_parser("profile", help="profile one model on one backend")
    prof.add_argument("model")
    prof.add_argument("--backend", default="onnxruntime")
    prof.add_argument("--threads", type=int)
    prof.add_argument("--batch", type=int, default=1)
    prof.add_argument("--warmup", type=int, default=10)
    prof.add_argument("--iters", type=int)
    prof.add_argument("--seconds", type=float, default=3.0)
    prof.add_argument("--target", default="CPU")
    prof.add_argument("--config", default="{}", help="runtime settings as a JSON object")
    prof.add_argument("--no-e2e", action="store_true")
    prof.add_argument("--no-samples", action="store_true")
    sub.add_parser("fingerprint", help="describe this host")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "fingerprint":
            from edgekt.devices.fingerprint import host_fingerprint

            _emit({"status": "ok", "host": host_fingerprint(), "executable": sys.executable})
            return 0
        return _profile(args)
    except ImportError as exc:  # numpy or a runtime missing on the device
        _emit({"status": "error", "error_kind": "missing_module", "module": exc.name,
               "error": f"{exc}", "executable": sys.executable})
        return EXIT_MISSING
    except Exception as exc:  # noqa: BLE001 - report every failure as JSON to the host
        from edgekt.devices.backends.base import MissingRuntimeError
        from edgekt.errors import EdgektError

        if isinstance(exc, MissingRuntimeError):
            _emit({"status": "error", "error_kind": "missing_module", "module": exc.module,
                   "pip": exc.pip, "error": str(exc), "executable": sys.executable})
            return EXIT_MISSING
        kind = "user" if isinstance(exc, EdgektError) else "internal"
        _emit({"status": "error", "error_kind": kind, "error": f"{type(exc).__name__}: {exc}"
               if kind == "internal" else str(exc), "executable": sys.executable})
        return EXIT_USER


def _profile(args: argparse.Namespace) -> int:
    from edgekt.devices.profiler import ProfileConfig, profile_model

    settings = ProfileConfig(warmup=args.warmup, iters=args.iters, seconds=args.seconds,
                               batch=args.batch, threads=args.threads, target=args.target,
                               config=json.loads(args.config),
                               e2e=not args.no_e2e, samples=not args.no_samples)
    result = profile_model(args.model, args.backend, settings)
    import edgekt

    result["runner"] = {"executable": sys.executable, "edgekt_from": edgekt.__file__}
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
