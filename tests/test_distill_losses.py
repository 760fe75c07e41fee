"""KD losses on small tensors against values computed by hand (plain math / numpy loops)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from edgekt.distill import losses as L
from edgekt.distill.bridges import Adapter, CRDMemory
from edgekt.errors import EdgektError

torch.set_num_threads(1)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def kl(p, q) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_registry_lists_every_method():
    assert set(L.KD_LOSSES.names()) == {"hinton_kd", "dkd", "dist", "fitnets", "attention", "rkd",
                                        "pkt", "crd"}
    for name in L.KD_LOSSES.names():
        doc = L.KD_LOSSES.get(name).fn.__doc__
        assert "et al." in doc or "&" in doc  # each cites its paper
    with pytest.raises(EdgektError, match="did you mean 'dkd'"):
        L.KD_LOSSES.get("dkdd")


def test_hinton_kd_by_hand():
    s, te = t([[0.0, 0.0]]), t([[math.log(3.0), 0.0]])
    assert L.hinton_kd(s, te, temperature=1.0).item() == pytest.approx(kl([0.75, 0.25], [0.5, 0.5]),
                                                                       rel=1e-5)
    r3 = math.sqrt(3.0)  # at T=2 the teacher's odds become sqrt(3):1, and the loss is scaled by 4
    expected = 4 * kl([r3 / (r3 + 1), 1 / (r3 + 1)], [0.5, 0.5])
    assert L.hinton_kd(s, te, temperature=2.0).item() == pytest.approx(expected, rel=1e-5)
    assert L.hinton_kd(te, te).item() == pytest.approx(0.0, abs=1e-7)


def test_dkd_by_hand_and_kd_decomposition():
    # teacher p = (.4, .4, .2), student uniform, target class 0
    s, te, y = t([[0.0, 0.0, 0.0]]), t([[math.log(2.0), math.log(2.0), 0.0]]), torch.tensor([0])
    tckd = kl([0.4, 0.6], [1 / 3, 2 / 3])
    nckd = kl([2 / 3, 1 / 3], [0.5, 0.5])
    got = L.dkd(s, te, y, alpha=1.0, beta=8.0, temperature=1.0).item()
    assert got == pytest.approx(tckd + 8 * nckd, rel=1e-5)
    # Zhao et al.'s identity: KD = TCKD + (1 - p_t[gt]) * NCKD
    kd = L.hinton_kd(s, te, temperature=1.0).item()
    decomposed = L.dkd(s, te, y, alpha=1.0, beta=0.6, temperature=1.0).item()
    assert decomposed == pytest.approx(kd, rel=1e-4)
    assert L.dkd(te, te, y).item() == pytest.approx(0.0, abs=1e-6)


def test_dist_matches_numpy_pearson():
    g = torch.Generator().manual_seed(0)
    s, te = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ps, pt = torch.softmax(s / 2, 1).numpy(), torch.softmax(te / 2, 1).numpy()
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(6)])
    intra = 1 - np.mean([np.corrcoef(ps[:, j], pt[:, j])[0, 1] for j in range(4)])
    got = L.dist(s, te, beta=1.0, gamma=3.0, temperature=2.0).item()
    assert got == pytest.approx(4 * (inter + 3 * intra), rel=1e-4)
    assert L.dist(te, te).item() == pytest.approx(0.0, abs=1e-6)


def test_fitnets_is_mse():
    assert L.fitnets(t([[1.0, 2.0]]), t([[0.0, 0.0]])).item() == pytest.approx(2.5)


def test_attention_by_hand_with_different_channels():
    s = t([[[[3.0, 4.0]]]])  # (1, 1, 1, 2)
    te = t([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): mean of squares over channels (.5, 0)
    n = math.hypot(9.0, 16.0)
    expected = ((9 / n - 1) ** 2 + (16 / n) ** 2) / 2
    assert L.attention(s, te).item() == pytest.approx(expected, rel=1e-5)
    # spatial mismatch: the larger map is pooled to the smaller size
    big = torch.rand(2, 3, 8, 8)
    small = torch.nn.functional.adaptive_avg_pool2d(big, 4)
    assert torch.isfinite(L.attention(big, small))


def _rkd_reference(s: np.ndarray, te: np.ndarray) -> tuple[float, float]:
    def huber(a, b):
        d = np.abs(a - b)
        return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()

    def dists(e):
        d = np.array([[np.linalg.norm(a - b) for b in e] for a in e])
        return d / d[d > 0].mean()

    def angles(e):
        n = len(e)
        out = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            u, v = e[i] - e[j], e[k] - e[j]  # angle at j
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            out[j, i, k] = 0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv)
        return out

    return float(huber(dists(s), dists(te))), float(huber(angles(s), angles(te)))


def test_rkd_by_reference_and_scale_invariance():
    s = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 2.0]], dtype=np.float32)
    te = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    d_ref, a_ref = _rkd_reference(s, te)
    assert L.rkd_distance(t(s), t(te)).item() == pytest.approx(d_ref, rel=1e-4)
    assert L.rkd_angle(t(s), t(te)).item() == pytest.approx(a_ref, rel=1e-4)
    got = L.rkd(t(s), t(te), distance_weight=25.0, angle_weight=50.0).item()
    assert got == pytest.approx(25 * d_ref + 50 * a_ref, rel=1e-4)
    # distances are normalised by their mean: a scaled teacher carries the same relations
    assert L.rkd(t(s), t(s) * 7.0).item() == pytest.approx(0.0, abs=1e-5)


def test_pkt_by_reference():
    g = torch.Generator().manual_seed(1)
    s, te = torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g)

    def kernel(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        k = (e @ e.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ks, kt = kernel(s.numpy().astype(np.float64)), kernel(te.numpy().astype(np.float64))
    expected = np.mean([sum(kt[i, j] * math.log(kt[i, j] / ks[i, j]) for j in range(5))
                        for i in range(5)])
    assert L.pkt(s, te).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert L.pkt(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_crd_nce_by_hand():
    # one sample, K=1 negative, n_data=2 -> K * P_n = 1/2; scores 0 and log Z = 0 -> P = 1
    # D1 = 1 / (1 + 1/2), D0 = (1/2) / (1 + 1/2)
    scores = t([[0.0, 0.0]])
    got = L.crd(scores, torch.tensor(0.0), temperature=1.0, n_data=2).item()
    assert got == pytest.approx(-(math.log(2 / 3) + math.log(1 / 3)), rel=1e-6)
    # a confident positive and a dissimilar negative cost less
    better = L.crd(t([[1.0, -1.0]]), torch.tensor(0.0), temperature=0.5, n_data=2).item()
    assert better < got


def test_crd_memory_state():
    pos = torch.tensor([10, 3, 7, 5])  # dataset positions, not 0..n-1
    mem = CRDMemory(6, 9, pos, feat_dim=4, nce_k=100, momentum=0.5)
    assert mem.nce_k == 3 and mem.n_data == 4 and torch.isnan(mem.log_z).all()
    before = mem.memory_s.clone()
    batch_pos = torch.tensor([3, 5])
    s_scores, t_scores, log_z = mem(torch.randn(2, 6), torch.randn(2, 9), batch_pos, 0.07)
    assert s_scores.shape == t_scores.shape == (2, 4)
    assert torch.isfinite(log_z).all()
    changed = (mem.memory_s != before).any(1)
    assert changed.tolist() == [False, True, False, True]  # rows of positions 3 and 5
    assert torch.allclose(mem.memory_s[changed].norm(dim=1), torch.ones(2), atol=1e-5)
    assert {"memory_s", "memory_t", "log_z"} <= set(mem.state_dict())
    assert "row_of" not in mem.state_dict()


def test_losses_run_in_fp32_under_autocast_and_survive_fp16_extremes():
    s = torch.tensor([[3e4, -3e4, 0.0]], dtype=torch.float16)
    te = torch.tensor([[-3e4, 3e4, 0.0]], dtype=torch.float16)
    y = torch.tensor([0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for value in (L.hinton_kd(s, te), L.dkd(s, te, y), L.dist(s, te), L.pkt(s, te)):
            assert value.dtype == torch.float32 and torch.isfinite(value)
        ref = L.hinton_kd(s.float(), te.float(), temperature=4.0)
        low = L.hinton_kd(s.bfloat16(), te.bfloat16()).item()
        assert low == pytest.approx(ref.item(), rel=1e-2)


def test_adapter_shapes_and_bad_pairs():
    a = Adapter((2, 8, 14, 14), (2, 16, 7, 7), "x")
    assert a(torch.rand(2, 8, 14, 14)).shape == (2, 16, 7, 7)
    up = Adapter((2, 8, 7, 7), (2, 16, 14, 14), "x")
    assert up(torch.rand(2, 8, 7, 7)).shape == (2, 16, 14, 14)
    assert Adapter((2, 8), (2, 32), "x")(torch.rand(2, 8)).shape == (2, 32)
    with pytest.raises(EdgektError, match="no adapter bridges"):
        Adapter((2, 8, 7, 7), (2, 32), "losses[0]")
