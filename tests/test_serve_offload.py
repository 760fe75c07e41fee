"""The request path's two shortcuts: short predictions on the event loop (``Offload``) and the
``.npy`` header parsed without ``ast``; both must answer exactly what the slow paths answer."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import _serve_support as sup
import numpy as np
import pytest

from edgekt.devices.serve.inputs import Limits, ServeError, _npy_fast, array_from_npy
from edgekt.devices.serve.offload import Offload

device_models, photos = sup.device_models, sup.photos  # session fixtures


def _where(offload: Offload, kind: str, fn, nbytes: int | None = 100) -> list[bool]:
    """Run ``fn`` five times; True where it ran on the loop's own thread."""
    async def main() -> list[bool]:
        loop_thread = threading.get_ident()
        out = []
        for _ in range(5):
            ran_on = await offload.run(kind, lambda: (fn(), threading.get_ident())[1],
                                       nbytes=nbytes)
            out.append(ran_on == loop_thread)
        return out

    return asyncio.run(main())


def test_short_calls_run_inline_after_a_first_measured_one():
    off = Offload(budget_ms=50)
    assert _where(off, "fast", lambda: None) == [False, True, True, True, True]
    assert off.counts == {"inline": 4, "thread": 1}


def test_slow_calls_big_bodies_and_a_zero_budget_stay_in_threads():
    assert _where(Offload(budget_ms=2), "slow", lambda: time.sleep(0.01)) == [False] * 5
    assert _where(Offload(budget_ms=50), "big", lambda: None, nbytes=10**6) == [False] * 5
    assert _where(Offload(budget_ms=50), "chunked", lambda: None, nbytes=None) == [False] * 5
    assert _where(Offload(budget_ms=0), "off", lambda: None) == [False] * 5


def test_a_call_that_became_slow_goes_back_to_a_thread():
    off = Offload(budget_ms=5, window=2)
    _where(off, "k", lambda: None)
    assert off.inline("k", 100)
    for _ in range(2):  # the window forgets the fast calls
        asyncio.run(off.run("k", lambda: time.sleep(0.02), nbytes=100))
    assert not off.inline("k", 100)


def test_errors_propagate_from_both_places():
    off = Offload(budget_ms=50)

    def boom():
        raise ServeError("bad input")

    for _ in range(3):  # the first in a thread, then (after a fast call) inline
        with pytest.raises(ServeError, match="bad input"):
            asyncio.run(off.run("e", boom, nbytes=10))
        asyncio.run(off.run("e", lambda: None, nbytes=10))
    assert off.counts["inline"] >= 2


def test_inline_and_threaded_predictions_answer_the_same(device_models, photos, tmp_path):
    from fastapi.testclient import TestClient

    from edgekt.devices.serve.app import ServeSettings, create_app
    from edgekt.devices.serve.service import Service

    answers = {}
    for inline_ms in (0.0, 1000.0):
        service = Service(device_models.package, tmp_path / f"s{inline_ms}", threads=1)
        try:
            app = create_app(service, ServeSettings(inline_ms=inline_ms))
            with TestClient(app) as client:
                answers[inline_ms] = [
                    client.post("/v1/predict", content=sup.npy(img),
                                headers={"Content-Type": "application/x-npy"}).json()["scores"]
                    for img in photos.images[:6]]
                counts = dict(app.state.offload.counts)
        finally:
            service.close()
        assert counts["inline"] == (0 if inline_ms == 0 else 5), counts
    assert answers[0.0] == answers[1000.0]


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("arr", [
    np.arange(784, dtype=np.uint8).reshape(28, 28),
    np.random.default_rng(0).random((1, 3, 8, 8)).astype(np.float32),
    np.arange(6, dtype=">i4").reshape(2, 3),
    np.arange(5, dtype=np.int16),
    np.float64(2.5),
])
def test_npy_fast_path_equals_np_load(arr):
    data = _npy(arr)
    fast = _npy_fast(data)
    want = np.load(io.BytesIO(data), allow_pickle=False)
    assert fast is not None and fast.dtype == want.dtype and fast.shape == want.shape
    assert np.array_equal(fast, want) and fast.flags.writeable


def test_npy_bodies_the_fast_path_leaves_to_np_load():
    fortran = np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert _npy_fast(_npy(fortran)) is None
    got = array_from_npy(_npy(fortran), Limits())
    assert np.array_equal(got, fortran)
    good = _npy(np.zeros((4, 4), np.uint8))
    for bad in (good[:-1], good + b"x", good[:20]):
        assert _npy_fast(bad) is None
    with pytest.raises(ServeError, match="not a .npy array"):
        array_from_npy(good[:-1], Limits())
    # A shape that would need more bytes than sent never allocates.
    huge = good.replace(b"(4, 4)", b"(9999)")
    assert _npy_fast(huge) is None
    with pytest.raises(ServeError):
        array_from_npy(huge, Limits())
