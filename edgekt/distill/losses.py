"""Knowledge-distillation losses as pure tensor functions, registered in ``KD_LOSSES``.

Every function takes the student's tensor first and the teacher's second, is computed in fp32
with autocast disabled (fp16 softmax/log/normalisation terms underflow and go NaN), and works in
log space where a probability would otherwise be logged. Stateful parts (FitNets adapters, the
CRD memory bank) live in ``edgekt.distill.bridges``; these functions only see tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from edgekt.registry import Registry

Tensor = torch.Tensor


@dataclass(frozen=True)
class KDLoss:
    """A registered KD loss and what the distillation task must feed it."""

    fn: Callable[..., Tensor]
    inputs: Literal["logits", "maps", "vectors"]
    """``logits``: class scores; ``maps``: (B, C, H, W) feature maps; ``vectors``: any tap,
    flattened to (B, D)."""
    targets: bool = False
    """The function takes the labels as its third argument."""
    bridge: Literal["none", "adapter", "crd"] = "none"
    """Trainable module between the taps and the function (see ``bridges``)."""


KD_LOSSES: Registry[KDLoss] = Registry("KD loss")


def fp32(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``fn`` on fp32 copies of its tensor arguments with autocast disabled."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next(a.device.type for a in args if isinstance(a, Tensor))
        args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a
                     for a in args)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def register(name: str, inputs: Literal["logits", "maps", "vectors"], *, targets: bool = False,
             bridge: Literal["none", "adapter", "crd"] = "none"):
    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        wrapped = fp32(fn)
        KD_LOSSES.register(name)(KDLoss(wrapped, inputs, targets, bridge))
        return wrapped

    return deco


# ---- logit methods -----------------------------------------------------------------------------
@register("hinton_kd", "logits")
def hinton_kd(student: Tensor, teacher: Tensor, *, temperature: float = 4.0) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": T^2 KL(pt || ps)."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


@register("dkd", "logits", targets=True)
def dkd(student: Tensor, teacher: Tensor, target: Tensor, *, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """Zhao et al. 2022, "Decoupled Knowledge Distillation": alpha * TCKD + beta * NCKD."""
    b, c = student.shape
    gt = F.one_hot(target, c).bool()
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    # Binary (target vs all others) distributions, in log space: log(1 - p_gt) = logsumexp(others).
    def binary(logp: Tensor) -> Tensor:
        return torch.stack([logp[gt], torch.logsumexp(logp.masked_fill(gt, -math.inf), 1)], 1)

    tckd = F.kl_div(binary(log_s), binary(log_t), reduction="batchmean", log_target=True)
    # Distributions over the non-target classes only: drop the target column.
    s_nt = (student / temperature)[~gt].view(b, c - 1)
    t_nt = (teacher / temperature)[~gt].view(b, c - 1)
    nckd = F.kl_div(F.log_softmax(s_nt, 1), F.log_softmax(t_nt, 1), reduction="batchmean",
                    log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register("dist", "logits")
def dist(student: Tensor, teacher: Tensor, *, beta: float = 1.0, gamma: float = 1.0,
         temperature: float = 1.0) -> Tensor:
    """Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher" (DIST): inter- and
    intra-class Pearson relations of the softened predictions."""
    ps = F.softmax(student / temperature, dim=1)
    pt = F.softmax(teacher / temperature, dim=1)
    inter = 1.0 - _pearson_rows(ps, pt).mean()
    intra = 1.0 - _pearson_rows(ps.t(), pt.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


# ---- feature methods ---------------------------------------------------------------------------
@register("fitnets", "maps", bridge="adapter")
def fitnets(student: Tensor, teacher: Tensor) -> Tensor:
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets": MSE between the adapted student
    hint and the teacher's guided layer."""
    return F.mse_loss(student, teacher)


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """L2-normalised spatial attention sum_c |f_c|^p, flattened to (B, H*W)."""
    return F.normalize(feat.abs().pow(p).mean(1).flatten(1), dim=1)


@register("attention", "maps")
def attention(student: Tensor, teacher: Tensor, *, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (AT); the larger map is
    average-pooled to the smaller one's size; channel counts may differ."""
    hs, ht = student.shape[-2:], teacher.shape[-2:]
    if hs != ht:
        size = (min(hs[0], ht[0]), min(hs[1], ht[1]))
        student = F.adaptive_avg_pool2d(student, size)
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def _pairwise_distances(e: Tensor) -> Tensor:
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Smooth-L1 between pairwise distances, each normalised by its mean non-zero distance."""
    with torch.no_grad():
        td = _pairwise_distances(teacher)
        td = td / td[td > 0].mean()
    sd = _pairwise_distances(student)
    sd = sd / sd[sd > 0].mean()
    return F.smooth_l1_loss(sd, td)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Smooth-L1 between the cosines of all triplet angles."""

    def angles(e: Tensor) -> Tensor:
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    with torch.no_grad():
        ta = angles(teacher)
    return F.smooth_l1_loss(angles(student), ta)


@register("rkd", "vectors")
def rkd(student: Tensor, teacher: Tensor, *, distance_weight: float = 25.0,
        angle_weight: float = 50.0) -> Tensor:
    """Park et al. 2019, "Relational Knowledge Distillation": distance + angle potentials."""
    loss = student.new_zeros(())
    if distance_weight:
        loss = loss + distance_weight * rkd_distance(student, teacher)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle(student, teacher)
    return loss


@register("pkt", "vectors")
def pkt(student: Tensor, teacher: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
    Transfer": KL between cosine-similarity kernel distributions."""

    def kernel(e: Tensor) -> Tensor:
        e = F.normalize(e, dim=1, eps=eps)
        k = (e @ e.t() + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    ks, kt = kernel(student), kernel(teacher)
    return (kt * torch.log((kt + eps) / (ks + eps))).sum(1).mean()


@register("crd", "vectors", bridge="crd")
def crd(scores: Tensor, log_z: Tensor, *, temperature: float = 0.07, n_data: int) -> Tensor:
    """Tian et al. 2020, "Contrastive Representation Distillation": the NCE loss of one view.

    Args:
        scores: (B, 1+K) cosine similarities of an embedding with its positive (column 0) and K
            negatives drawn from the other view's memory bank.
        log_z: log of the partition constant Z (fixed from the first batch, as the paper's code).
        n_data: size of the memory bank; the noise distribution is uniform, P_n = 1 / n_data.
    """
    k = scores.shape[1] - 1
    log_p = scores / temperature - log_z
    log_noise = math.log(k / n_data)  # log(K * P_n)
    log_d1 = log_p[:, 0] - torch.logaddexp(log_p[:, 0], torch.full_like(log_p[:, 0], log_noise))
    neg = log_p[:, 1:]
    log_d0 = log_noise - torch.logaddexp(neg, torch.full_like(neg, log_noise))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]
