"""The service behind ``edgekt serve``: one loaded package and the single writer of its state.

No HTTP here: the web layer (:mod:`edgekt.devices.serve.app`) turns requests into calls of
:class:`Service` and its results into JSON, so the policies below are testable on their own.

* **One writer.** A lock file in the state directory keeps a second service off the same state;
  inside the process, few-shot and continual changes are serialised by their own locks and each
  is committed to disk (:mod:`edgekt.devices.state`: temp file, fsync, rename) before the call
  returns, so an acknowledged change survives a SIGKILL.
* **Concurrent enrollments of one label** are refused (409), not merged in an order nobody
  chose: the second caller learns that the label is busy and may retry.
* **Hot reload.** :meth:`Service.reload` opens the package path again (deploy a new version by
  replacing the directory, or by flipping a symlink, then reload). The new version is loaded,
  smoke-tested and checked against the state *beside* the running one, which keeps serving;
  only a compatible version replaces it, in one reference swap, so no request is dropped. Any
  failure leaves the running version in place (a rollback, counted and reported).
* **Compatibility.** Enrolled prototypes and a learnt continual head live in the embedding space
  of the model that made them. A version whose embedding model comes from another checkpoint
  (``source_sha256``, else the embedding file's hash) or has another size is refused while such
  state exists; a version may not drop a part (classifier, embedding) the running one serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekt.devices.artifacts import find_artifacts
from edgekt.devices.continual import ContinualLearner, LearnerConfig
from edgekt.devices.fewshot import STATE_FILE, PrototypeClassifier
from edgekt.devices.model import EdgeModel
from edgekt.devices.serve.inputs import ServeError, invalid
from edgekt.errors import EdgektError
from edgekt.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

CONTINUAL_STATE = "continual_state.npz"
SIDECAR = "serve.json"
LOCK_FILE = "serve.lock"

Listener = Callable[[str, dict[str, Any]], None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Package:
    """One loaded version of the package: its models and what identifies them."""

    path: Path
    version: str
    """First 12 hex digits of the sha256 of ``manifest.json`` (else of the model file)."""
    info: dict[str, Any]
    classifier: EdgeModel | None
    embedder: EdgeModel | None
    mode: str
    """Colour mode images are decoded to: ``L`` or ``RGB``."""
    size: tuple[int, int] | None
    """(height, width) images are resized to; None when the model has no edgekt metadata."""
    head_path: Path | None
    embedding_id: str | None
    """The embedding's source checkpoint (``source_sha256``), else its file's sha256."""
    embedding_dim: int | None

    def describe(self) -> dict[str, Any]:
        models = {name: m.describe() for name, m in (("classifier", self.classifier),
                                                     ("embedding", self.embedder)) if m}
        for d in models.values():
            d["path"] = Path(d["path"]).name  # no file system layout in public answers
        return {"version": self.version, **self.info, "models": models,
                "image": {"mode": self.mode, "size": list(self.size) if self.size else None}}


def load_package(path: str | Path, *, backend: str | None = None,
                 threads: int | None = None) -> Package:
    """Open every part of a package (export directory or one model file) and identify it."""
    path = Path(path)
    artifacts = find_artifacts(path)
    parts = {a.part for a in artifacts}
    classifier = embedder = None
    if parts & {None, "classifier"}:
        model = EdgeModel.load(path, backend=backend, threads=threads, part="classifier")
        if model.task == "embedding":
            embedder = model
        else:
            classifier = model
    if embedder is None and "embedding" in parts:
        embedder = EdgeModel.load(path, backend=backend, threads=threads, part="embedding")
    info: dict[str, Any] = {}
    head_path = None
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        raw = manifest.read_bytes()
        version = hashlib.sha256(raw).hexdigest()[:12]
        try:
            data = json.loads(raw)
        except ValueError:
            data = {}
        info = {k: data.get(k) for k in ("created", "edgekt_version") if data.get(k)}
        source = data.get("source") or {}
        info.update({f"source_{k}": source[k] for k in ("model", "dataset", "method")
                     if source.get(k)})
        head = (data.get("head") or {}).get("file")
        if head and (path / head).is_file():
            head_path = path / head
    else:
        first = (classifier or embedder).artifact.path  # type: ignore[union-attr]
        version = _sha256(first)[:12]
    meta = (classifier or embedder).meta  # type: ignore[union-attr]
    size = tuple(meta.preprocess.image_size) if meta else None
    mode = meta.preprocess.color if meta else "RGB"
    emb_id = emb_dim = None
    if embedder is not None:
        emb_id = (embedder.meta.source_sha256 if embedder.meta else "") \
            or _sha256(embedder.artifact.path)
        emb_dim = embedder.meta.embedding_dim if embedder.meta else None
    return Package(path, version, info, classifier, embedder, mode,
                   size if size is None else (int(size[0]), int(size[1])),  # type: ignore[index]
                   head_path, emb_id, emb_dim)


@dataclass
class Runtime:
    """What one request sees: a package version and the state objects built on it (swapped as
    one reference on reload)."""

    package: Package
    fewshot: PrototypeClassifier | None
    continual: ContinualLearner | None


@dataclass
class ReloadResult:
    result: str
    """``reloaded``, ``unchanged`` or ``rolled_back``."""
    version: str
    previous: str
    message: str = ""


class Service:
    """The device runtime as a service: predict, few-shot, continual, reload.

    Args:
        package: export directory (or one model file); reload opens this path again.
        state_dir: where the few-shot and continual state live (default: the package directory).
            A package's calibrated ``fewshot_state.npz`` seeds an empty state directory.
        continual: serve continual learning when the package has an embedding part.
        recover: restore the previous generation of a damaged few-shot state.
    """

    def __init__(self, package: str | Path, state_dir: str | Path | None = None, *,
                 backend: str | None = None, threads: int | None = None,
                 continual: bool = True, learner_config: LearnerConfig | None = None,
                 recover: bool = False) -> None:
        self.package_path = Path(package)
        if state_dir is None:
            p = self.package_path
            state_dir = p if p.is_dir() else p.with_name(p.stem + ".serve-state")
        self.state_dir = Path(state_dir).resolve()
        self.backend, self.threads = backend, threads
        self.with_continual, self.learner_config = continual, learner_config or LearnerConfig()
        self.recover = recover
        self.listeners: list[Listener] = []
        self.started = time.time()
        self.last_reload: dict[str, Any] | None = None
        self._fewshot_lock = threading.Lock()
        self._continual_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._busy_labels: set[str] = set()
        self._busy_lock = threading.Lock()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_state_dir(self.state_dir)
        try:
            pkg = load_package(self.package_path, backend=backend, threads=threads)
            self._check_sidecar(pkg)
            self._rt = self._build(pkg)
            self._write_sidecar(pkg)
        except BaseException:
            self.close()
            raise

    # ---- set-up ---------------------------------------------------------------------------
    def _build(self, pkg: Package) -> Runtime:
        fewshot = continual = None
        if pkg.embedder is not None:
            state = self.state_dir / STATE_FILE
            seed = pkg.path / STATE_FILE if pkg.path.is_dir() else None
            if not state.exists() and seed is not None and seed.is_file() and seed != state:
                # The package's calibrated (empty) classifier: threshold and transform.
                data = seed.read_bytes()
                atomic_write(state, lambda f: f.write(data))
            fewshot = PrototypeClassifier(pkg.embedder, state, recover=self.recover)
            if self.with_continual:
                cstate = self.state_dir / CONTINUAL_STATE
                continual = ContinualLearner(
                    pkg.embedder, self.learner_config, state_path=cstate,
                    head_path=pkg.head_path if not cstate.exists() else None,
                    dim=pkg.embedding_dim)
        return Runtime(pkg, fewshot, continual)

    def _check_sidecar(self, pkg: Package) -> None:
        """Warn when the state was built on another embedding model (deployed while down)."""
        path = self.state_dir / SIDECAR
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if old.get("embedding_id") and pkg.embedding_id \
                and old["embedding_id"] != pkg.embedding_id:
            log.warning("the state in %s was built with another embedding model (%s, now %s): "
                        "enrolled classes may be meaningless; re-enroll them", self.state_dir,
                        old["embedding_id"][:12], pkg.embedding_id[:12])

    def _write_sidecar(self, pkg: Package) -> None:
        atomic_write_text(self.state_dir / SIDECAR, json.dumps(
            {"package_version": pkg.version, "embedding_id": pkg.embedding_id,
             "updated": time.time()}))

    def close(self) -> None:
        """Release the state directory (the lock file)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    # ---- events ---------------------------------------------------------------------------
    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        """Tell every listener (metrics, MQTT); a failing listener never fails the request."""
        for listener in list(self.listeners):
            try:
                listener(kind, payload)
            except Exception:  # noqa: BLE001 - an event sink must not break the service
                log.exception("event listener failed on %s", kind)

    # ---- queries --------------------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        return self._rt

    @property
    def package(self) -> Package:
        return self._rt.package

    def capabilities(self) -> dict[str, bool]:
        rt = self._rt
        return {"predict": rt.package.classifier is not None, "fewshot": rt.fewshot is not None,
                "continual": rt.continual is not None}

    def predict(self, x: Any, top: int = 5) -> dict[str, Any]:
        """The package classifier on one sample: label, top scores, latency, version."""
        rt = self._rt
        model = rt.package.classifier
        if model is None:
            raise ServeError("this package has no classifier part; use the few-shot or "
                             "continual endpoints", 404, "no_classifier")
        t0 = time.perf_counter()
        probs = model.predict_proba(x)
        ms = (time.perf_counter() - t0) * 1e3
        if probs.ndim != 1:
            raise invalid(f"predict takes one sample per request; got a batch of {len(probs)}")
        names = model.labels or [str(i) for i in range(len(probs))]
        order = np.argsort(-probs)[:max(1, top)]
        out = {"label": names[int(order[0])],
               "scores": [{"label": names[int(i)], "score": float(probs[i])} for i in order],
               "inference_ms": ms, "model_version": rt.package.version, "head": "classifier"}
        self.emit("prediction", {k: out[k] for k in ("label", "head", "model_version")}
                  | {"score": out["scores"][0]["score"], "inference_ms": ms})
        return out

    def fewshot_predict(self, x: Any) -> dict[str, Any]:
        """Nearest enrolled class (``label`` None: farther than the rejection threshold)."""
        rt = self._rt
        clf = self._need_fewshot(rt)
        t0 = time.perf_counter()
        p = clf.predict(x) if clf.labels() else None
        ms = (time.perf_counter() - t0) * 1e3
        if p is None:
            raise ServeError("no class is enrolled yet: enroll one first", 409, "no_classes")
        out = {"label": p.label, "known": p.known, "nearest": p.nearest,
               "distance": p.distance, "score": p.score, "novelty": p.novelty,
               "threshold": clf.threshold,
               "inference_ms": ms, "model_version": rt.package.version, "head": "fewshot"}
        self.emit("prediction", {k: out[k] for k in ("label", "nearest", "score", "head",
                                                     "model_version", "inference_ms")})
        return out

    def labels(self) -> dict[str, Any]:
        clf = self._need_fewshot(self._rt)
        with self._fewshot_lock:
            return {"labels": [{"label": lab, "shots": clf.shots(lab)} for lab in clf.labels()],
                    "threshold": clf.threshold, "metric": clf.metric,
                    "generation": clf.generation}

    # ---- changes (each committed before returning) ----------------------------------------
    @contextmanager
    def _claim(self, label: str) -> Iterator[None]:
        with self._busy_lock:
            if label in self._busy_labels:
                raise ServeError(f"an enrollment of {label!r} is already in progress; retry "
                                 "when it has finished", 409, "label_busy")
            self._busy_labels.add(label)
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy_labels.discard(label)

    def enroll(self, label: str, images: list[np.ndarray], replace: bool = False
               ) -> dict[str, Any]:
        """Add images to a class (create it); on disk before returning."""
        with self._claim(label), self._fewshot_lock:
            rt = self._rt
            clf = self._need_fewshot(rt)
            shots = clf.enroll(label, images, replace=replace)
            out = {"label": label, "shots": shots, "classes": len(clf.labels()),
                   "generation": clf.generation, "model_version": rt.package.version}
        self.emit("enrolled", dict(out))
        return out

    def remove(self, label: str) -> dict[str, Any]:
        with self._claim(label), self._fewshot_lock:
            clf = self._need_fewshot(self._rt)
            if label not in clf.labels():
                raise ServeError(f"label {label!r} is not enrolled", 404, "unknown_label")
            clf.remove(label)
            out = {"label": label, "classes": len(clf.labels()), "generation": clf.generation}
        self.emit("removed", dict(out))
        return out

    def observe(self, x: Any, label: str) -> dict[str, Any]:
        """Continual learning from one labelled sample (feedback); committed before returning."""
        with self._continual_lock:
            rt = self._rt
            learner = self._need_continual(rt)
            res = learner.observe(np.asarray(x)[None], [label])
            if not res.accepted:
                reasons = "; ".join(r for _, r in res.rejected) or "nothing accepted"
                raise invalid(f"the sample was rejected: {reasons}")
            generation = learner.save()
        out = {"label": label, "updated": res.updated, "rolled_back": res.rolled_back,
               "reason": res.reason, "drift": res.drift, "new_labels": res.new_labels,
               "errors": res.errors, "update_ms": res.update_ms, "generation": generation,
               "labels": len(learner.labels), "model_version": rt.package.version}
        self.emit("observed", dict(out))
        return out

    def continual_predict(self, x: Any) -> dict[str, Any]:
        rt = self._rt
        learner = self._need_continual(rt)
        t0 = time.perf_counter()
        z = np.asarray(rt.package.embedder.embed(np.asarray(x)[None]), np.float32)  # type: ignore
        with self._continual_lock:
            if not learner.labels:
                raise ServeError("the continual learner has no label yet: observe labelled "
                                 "samples first", 409, "no_classes")
            label = learner.predict_embeddings(z)[0]
        ms = (time.perf_counter() - t0) * 1e3
        out = {"label": str(label), "inference_ms": ms, "model_version": rt.package.version,
               "head": "continual"}
        self.emit("prediction", dict(out))
        return out

    def continual_status(self) -> dict[str, Any]:
        learner = self._need_continual(self._rt)
        with self._continual_lock:
            return {"labels": list(learner.labels), "counters": dict(learner.counters),
                    "generation": learner.generation, "last_rollback": learner.last_rollback,
                    "memory_bytes": learner.memory_bytes}

    # ---- hot reload -----------------------------------------------------------------------
    def reload(self) -> ReloadResult:
        """Open the package path again; swap to it only if it loads, runs and is compatible."""
        with self._reload_lock:
            old = self._rt
            try:
                new = load_package(self.package_path, backend=self.backend, threads=self.threads)
                if new.version == old.package.version:
                    return self._reloaded(ReloadResult("unchanged", new.version, new.version,
                                                       "the package is already at this version"))
                self._check_compatible(old, new)
                _smoke_test(new)
                with self._fewshot_lock, self._continual_lock:
                    rt = self._build(new)
                    self._rt = rt  # the swap: requests from now on see the new version
                self._write_sidecar(new)
            except EdgektError as exc:
                log.warning("reload of %s refused, still serving %s: %s", self.package_path,
                            old.package.version, exc)
                status = exc.status if isinstance(exc, ServeError) else 422
                result = ReloadResult("rolled_back", old.package.version, old.package.version,
                                      str(exc))
                self._reloaded(result)
                raise ServeError(f"reload refused, still serving version "
                                 f"{old.package.version}: {exc}", status, "reload_refused"
                                 ) from None
            except Exception as exc:  # noqa: BLE001 - a broken package must not stop the service
                log.exception("reload of %s failed", self.package_path)
                self._reloaded(ReloadResult("rolled_back", old.package.version,
                                            old.package.version, f"{type(exc).__name__}: {exc}"))
                raise ServeError(f"reload failed, still serving version {old.package.version}: "
                                 f"{type(exc).__name__}: {exc}", 500, "reload_failed") from None
            log.info("reloaded %s: version %s -> %s", self.package_path, old.package.version,
                     new.version)
            return self._reloaded(ReloadResult("reloaded", new.version, old.package.version))

    def _reloaded(self, result: ReloadResult) -> ReloadResult:
        self.last_reload = {**vars(result), "at": time.time()}
        self.emit("reload", dict(vars(result)))
        return result

    def _check_compatible(self, old: Runtime, new: Package) -> None:
        def refuse(why: str) -> None:
            raise ServeError(f"version {new.version} is incompatible: {why}", 409, "incompatible")

        pkg = old.package
        if pkg.classifier is not None and new.classifier is None:
            refuse("it has no classifier part, and clients of /v1/predict rely on it")
        if pkg.embedder is not None and new.embedder is None:
            refuse("it has no embedding part, and the few-shot/continual state needs one")
        has_classes = old.fewshot is not None and bool(old.fewshot.labels())
        has_head = old.continual is not None and bool(old.continual.labels)
        if not (has_classes or has_head) or new.embedder is None:
            return
        what = "enrolled classes" if has_classes else "the continual head"
        if new.embedding_id != pkg.embedding_id:
            refuse(f"its embedding model comes from another checkpoint ({new.embedding_id[:12]}, "
                   f"running {pkg.embedding_id[:12]}), so {what} would be meaningless; remove "
                   f"them (or start with another --state-dir) before switching")
        if new.embedding_dim and pkg.embedding_dim and new.embedding_dim != pkg.embedding_dim:
            refuse(f"its embedding has {new.embedding_dim} dimensions, {what} have "
                   f"{pkg.embedding_dim}")

    # ---- helpers --------------------------------------------------------------------------
    @staticmethod
    def _need_fewshot(rt: Runtime) -> PrototypeClassifier:
        if rt.fewshot is None:
            raise ServeError("this package has no embedding part, so few-shot is off; export "
                             "with the embedding part (edgekt fewshot package)", 404,
                             "no_fewshot")
        return rt.fewshot

    @staticmethod
    def _need_continual(rt: Runtime) -> ContinualLearner:
        if rt.continual is None:
            raise ServeError("continual learning is off (the package has no embedding part, "
                             "or the service runs with --no-continual)", 404, "no_continual")
        return rt.continual

    def health(self) -> dict[str, Any]:
        rt = self._rt
        return {"version": rt.package.version, "uptime_s": time.time() - self.started,
                "capabilities": self.capabilities(),
                "fewshot_classes": len(rt.fewshot.labels()) if rt.fewshot else None,
                "continual_labels": len(rt.continual.labels) if rt.continual else None,
                "last_reload": self.last_reload}


def _smoke_test(pkg: Package) -> None:
    """Run each part once on a blank image of its input size: finite output of the right size."""
    for name, model in (("classifier", pkg.classifier), ("embedding", pkg.embedder)):
        if model is None:
            continue
        if pkg.size is not None:
            shape = pkg.size if pkg.mode == "L" else (*pkg.size, 3)
            x: np.ndarray = np.zeros(shape, np.uint8)
        else:
            x = np.zeros([d if d > 0 else 1 for d in model.preprocess.sample_shape], np.float32)
        try:
            out = model.embed(x) if name == "embedding" else model.logits(x)
        except EdgektError as exc:
            raise EdgektError(f"the new {name} part does not run: {exc}") from None
        if not np.isfinite(out).all():
            raise EdgektError(f"the new {name} part outputs NaN/inf on a blank image")
        if name == "embedding" and pkg.embedding_dim and out.shape[-1] != pkg.embedding_dim:
            raise EdgektError(f"the new embedding outputs {out.shape[-1]} values but its "
                              f"metadata says {pkg.embedding_dim}")


def _lock_state_dir(state_dir: Path) -> int | None:
    """Hold ``serve.lock`` exclusively for the life of the service (released by the kernel on
    any exit, SIGKILL included)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: single writer by convention only
        return None
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise EdgektError(f"{state_dir} is owned by another edgekt serve (pid {owner}); the "
                          f"state has one writer. Stop it, or use another --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
