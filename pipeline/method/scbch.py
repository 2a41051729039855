"""SCBCH: robust cross-modal hashing for noisy multi-label data — its model and losses (no Ray,
no MLflow).

Two parts, in the ``project`` form (a precise formulation of a method described in words):

* CSCC: a classifier on the codes of each modality, whose per-item BCE is weighted by a
  reliability weight w_i = g + (1 − g)·cos(ŷ_i, y_i), where ŷ_i propagates the labels of the k
  cross-modal nearest neighbours of item i over the whole training set.
* BSCH: a bidirectional soft contrastive loss whose soft targets are the Jaccard similarities of
  the label vectors, with a margin subtracted from the logits of label-sharing pairs, plus a
  soft-label BCE that separates pairs around a similarity shift.

total = alpha·BSCH + beta·quantization + mean_i w_i c_i.
Defaults: alpha 0.7, beta 0.3, k 20, g 0.5.

Two named forms (``FORMS``): ``project``, the above; ``upstream``, the formulation of the
authors' code (Plke/SCBCH @ cfcc18c): L2-normalised codes, bias-free orthogonally initialised
classifiers, an exponential contrastive loss on u·vᵀ (:func:`upstream_contrastive`), the
quantisation summed and the classification averaged over the two modalities, and reliability
neighbours by intra-modal similarity (:func:`reliability_weights` with ``neighbours="intra"``).
Where it still differs from that code: an item is never its own neighbour (theirs zeroes the
diagonal, so it can be picked when fewer than k similarities are positive), Jaccard has no 1e-8
in its denominator, sgn(0) = +1, and the BCE is taken on logits. ``upstream`` is the default
(best validation MAP on MIRFlickr at noise 0.5 and 0.8; the project form's codes collapsed in
half of those runs).

Shapes: B items, L bits, K labels. ``u_img`` and ``u_txt`` are (B, L) tanh outputs in (−1, 1),
L2-normalised in the upstream form; ``labels`` is (B, K) multi-hot float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.method.model import HashModel

DEFAULT_ALPHA = 0.7
DEFAULT_BETA = 0.3
DEFAULT_K = 20
DEFAULT_G = 0.5

# per-epoch loss terms as logged: BSCH and the reliability-weighted classification (CSCC)
TERM_NAMES = ("bsch", "cscc")

FORMS = ("project", "upstream")  # their margin, shift and tau defaults: pipeline.config


class SCBCHModel(HashModel):
    """Tanh codes and a linear multi-label classifier per modality on the codes.

    ``form`` "project": un-normalised codes, classifiers with bias; "upstream": L2-normalised
    codes, bias-free classifiers with orthogonal initial weights. The center buffer is fixed and
    unused (SCBCH has no class centers); it keeps the model file layout of
    :class:`~pipeline.method.model.RSHNLModel`.
    """

    method = "scbch"
    fixed_center_mode = "random"

    def __init__(self, *args: Any, form: str = "project", **kwargs: Any) -> None:
        if form not in FORMS:
            raise ValueError(f"SCBCH form must be one of {FORMS}, got {form!r}")
        super().__init__(*args, normalize=form == "upstream", **kwargs)
        self.form = form
        bias = form == "project"
        self.image_cls = nn.Linear(self.bits, self.num_classes, bias=bias)
        self.text_cls = nn.Linear(self.bits, self.num_classes, bias=bias)
        if form == "upstream":
            nn.init.orthogonal_(self.image_cls.weight)
            nn.init.orthogonal_(self.text_cls.weight)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(u_image, u_text, centers, image logits, text logits)."""
        u_img, u_txt = self.encode(image, "image"), self.encode(text, "text")
        return u_img, u_txt, self.center_net(), self.image_cls(u_img), self.text_cls(u_txt)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """J_ij = |a_i ∧ b_j| / |a_i ∨ b_j| for multi-hot rows, (N, M); 0 where the union is empty."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a = a.to(dtype)
    b = b.to(dtype)
    inter = a @ b.T
    union = a.sum(dim=1, keepdim=True) + b.sum(dim=1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def cosine_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_ij = <x_i, y_j> / (‖x_i‖‖y_j‖), (N, M), rows L2-normalised with eps 1e-12."""
    return F.normalize(x, dim=1, eps=1e-12) @ F.normalize(y, dim=1, eps=1e-12).T


def soft_targets(T: torch.Tensor, label_share: float) -> torch.Tensor:
    """t_i = (1 − λ)·e_i + λ·T_i / Σ_j T_ij: the item's own pair plus its label overlaps.

    Rows without any overlap (no labels) put all their mass on the own pair.
    """
    eye = torch.eye(T.shape[0], T.shape[1], dtype=T.dtype, device=T.device)
    row_sum = T.sum(dim=1, keepdim=True)
    share = torch.where(row_sum > 0, T / row_sum.clamp_min(1e-12), eye)
    return (1.0 - label_share) * eye + label_share * share


def soft_contrastive(
    u_img: torch.Tensor,
    u_txt: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    tau: float,
    label_share: float = 0.5,
) -> torch.Tensor:
    """½(L_i2t + L_t2i) with logits (S − margin·T)/tau, S = cos(u_img, u_txt), T = Jaccard(y, y).

    L_i2t = mean_i −Σ_j t_ij log softmax_j(logits)_ij with t = ``soft_targets(T, λ)``; L_t2i is
    the same with text anchors (S.T, T.T). With only the Jaccard share (λ = 1) the targets are
    so diffuse under many labels that a uniform prediction is nearly optimal and codes collapse;
    the own pair is label-noise free, so it carries the other half of the mass.
    """
    S = cosine_matrix(u_img, u_txt)
    T = jaccard(labels, labels).to(S.dtype)
    t_img, t_txt = soft_targets(T, label_share), soft_targets(T.T, label_share)
    l_i2t = -(t_img * F.log_softmax((S - margin * T) / tau, dim=1)).sum(dim=1).mean()
    l_t2i = -(t_txt * F.log_softmax((S.T - margin * T.T) / tau, dim=1)).sum(dim=1).mean()
    return 0.5 * (l_i2t + l_t2i)


def pair_separation(
    u_img: torch.Tensor, u_txt: torch.Tensor, labels: torch.Tensor, *, shift: float, tau: float
) -> torch.Tensor:
    """Soft-label BCE around the shift: ℓ = T·softplus(−z) + (1 − T)·softplus(z), z = (S − shift)/τ.

    Label-sharing pairs (T > 0) and disjoint pairs (T = 0) are averaged separately and the two
    means weighted equally: with many labels most pairs are disjoint, and a plain mean over all
    pairs drives every cross-modal similarity negative.
    """
    S = cosine_matrix(u_img, u_txt)
    T = jaccard(labels, labels).to(S.dtype)
    z = (S - shift) / tau
    ell = T * F.softplus(-z) + (1.0 - T) * F.softplus(z)
    pos = T > 0
    parts = [ell[m].mean() for m in (pos, ~pos) if bool(m.any())]
    return sum(parts) / len(parts)


def bsch_loss(
    u_img: torch.Tensor,
    u_txt: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    shift: float,
    tau: float,
    separation_weight: float = 1.0,
) -> torch.Tensor:
    """soft_contrastive + separation_weight·pair_separation."""
    con = soft_contrastive(u_img, u_txt, labels, margin=margin, tau=tau)
    sep = pair_separation(u_img, u_txt, labels, shift=shift, tau=tau)
    return con + separation_weight * sep


def upstream_contrastive(
    u_img: torch.Tensor,
    u_txt: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    shift: float,
    tau: float = 1.0,
) -> torch.Tensor:
    """The authors' contrastive loss on S = u_img·u_txtᵀ (the codes L2-normalised by the model).

    For text anchors c_ij = S_ij where S_ij ≥ S_ii − margin, else S_ij − shift (the mask is a
    constant of the step); image anchors use S_jj; the diagonal of each c is clamped at 0.
    loss = mean_ij τ(exp(c^t_ij(1 − T_ij)/τ) + exp(c^i_ij(1 − T_ij)/τ))
         + mean_ij 1[T_ij > 0, i ≠ j]·exp(shift − S_ij) − mean_i S_ii, T = Jaccard(y, y).
    """
    S = u_img @ u_txt.T
    T = jaccard(labels, labels).to(S.dtype)
    d = S.diagonal()
    eye = torch.eye(S.shape[0], S.shape[1], dtype=torch.bool, device=S.device)

    def lowered(anchor: torch.Tensor) -> torch.Tensor:
        c = torch.where((S >= anchor - margin).detach(), S, S - shift)
        return torch.where(eye, c.clamp_min(0.0), c)

    c_txt, c_img = lowered(d[:, None]), lowered(d[None, :])
    ranking = tau * (c_txt / tau * (1.0 - T)).exp() + tau * (c_img / tau * (1.0 - T)).exp()
    positive = ((T > 0) & ~eye).to(S.dtype)
    return ranking.mean() + (positive * (shift - S).exp()).mean() - d.mean()


def _sgn(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 0, torch.ones_like(u), -torch.ones_like(u))


def quantization_loss(
    u_img: torch.Tensor, u_txt: torch.Tensor, *, reduce: str = "mean"
) -> torch.Tensor:
    """½(mean|u_img − sgn(u_img)| + mean|u_txt − sgn(u_txt)|), with sgn(0) = +1; ``reduce``
    "sum" drops the ½ (the upstream form)."""
    q_img = (u_img - _sgn(u_img.detach())).abs().mean()
    q_txt = (u_txt - _sgn(u_txt.detach())).abs().mean()
    return q_img + q_txt if reduce == "sum" else 0.5 * (q_img + q_txt)


def classification_losses(
    logits_img: torch.Tensor,
    logits_txt: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduce: str = "sum",
) -> torch.Tensor:
    """c_i = Σ_{m ∈ {img, txt}} mean_k BCEWithLogits(logits_m[i, k], y[i, k]), shape (B,);
    ``reduce`` "mean" halves it (the upstream form)."""
    y = labels.to(logits_img.dtype)
    c_img = F.binary_cross_entropy_with_logits(logits_img, y, reduction="none").mean(dim=1)
    c_txt = F.binary_cross_entropy_with_logits(logits_txt, y, reduction="none").mean(dim=1)
    return 0.5 * (c_img + c_txt) if reduce == "mean" else c_img + c_txt


def weighted_classification(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean_i w_i c_i, with w detached."""
    return (w.detach().to(c.dtype) * c).mean()


def _knn_mask(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries per row; ties at the k-th value go to smaller j."""
    thresh = torch.topk(sim, k, dim=1).values[:, -1:]
    greater = sim > thresh
    need = k - greater.sum(dim=1, keepdim=True, dtype=torch.int32)
    equal = sim == thresh
    rank = torch.cumsum(equal, dim=1, dtype=torch.int32)
    return greater | (equal & (rank <= need))


@torch.no_grad()
def reliability_weights(
    codes_img: torch.Tensor,
    codes_txt: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    g: float,
    chunk: int = 4096,
    neighbours: str = "cross",
) -> torch.Tensor:
    """CSCC reliability w_i = g + (1 − g)·cos(ŷ_i, y_i) over a whole training set, float32 (N,).

    ``neighbours`` "cross": sim_ij = ½(cos(img_i, txt_j) + cos(txt_i, img_j)), j ≠ i; kNN(i) are
    the k largest sim_ij (k clipped to N − 1; ties broken by smaller j); ŷ_i = Σ_{j ∈ kNN(i)}
    ½(1 + sim_ij)·y_j (cosine mapped to [0, 1], so neighbours count even when all similarities
    are negative). "intra" (the upstream form): sim_ij = ½(cos(img_i, img_j) + cos(txt_i, txt_j))
    and ŷ_i = Σ_{j ∈ kNN(i)} sim_ij·y_j / (Σ_{j ∈ kNN(i)} sim_ij + 1e-8).
    cos(ŷ_i, y_i) is 0 when either vector is all zero. Rows are processed ``chunk`` at a time.
    """
    if neighbours not in ("cross", "intra"):
        raise ValueError(f"neighbours must be 'cross' or 'intra', got {neighbours!r}")
    img = F.normalize(codes_img.float(), dim=1, eps=1e-12)
    txt = F.normalize(codes_txt.float(), dim=1, eps=1e-12)
    y = labels.float()
    N = y.shape[0]
    k = min(int(k), N - 1)
    y_norm = y.norm(dim=1)
    out = torch.empty(N, dtype=torch.float32, device=y.device)
    for start in range(0, N, max(1, int(chunk))):
        stop = min(start + max(1, int(chunk)), N)
        rows = torch.arange(start, stop, device=y.device)
        if k <= 0:
            y_hat = torch.zeros(stop - start, y.shape[1], device=y.device)
        else:
            if neighbours == "cross":
                sim = 0.5 * (img[start:stop] @ txt.T + txt[start:stop] @ img.T)
            else:
                sim = 0.5 * (img[start:stop] @ img.T + txt[start:stop] @ txt.T)
            sim[rows - start, rows] = float("-inf")
            mask = _knn_mask(sim, k)
            if neighbours == "cross":
                y_hat = sim.add_(1.0).mul_(0.5).masked_fill_(~mask, 0.0) @ y
            else:
                top = sim.masked_fill_(~mask, 0.0)
                y_hat = (top / (top.sum(dim=1, keepdim=True) + 1e-8)) @ y
        dot = (y_hat * y[start:stop]).sum(dim=1)
        denom = y_hat.norm(dim=1) * y_norm[start:stop]
        c = torch.where(denom > 0, dot / denom.clamp_min(1e-12), torch.zeros_like(dot))
        out[start:stop] = g + (1.0 - g) * c
    return out


@dataclass
class SCBCHTerms:
    """The SCBCH objective and its parts; all but ``total`` are detached."""

    total: torch.Tensor
    contrastive: torch.Tensor
    quantization: torch.Tensor
    classification: torch.Tensor
    per_item: torch.Tensor


def scbch_objective(
    u_img: torch.Tensor,
    u_txt: torch.Tensor,
    logits_img: torch.Tensor,
    logits_txt: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    alpha: float,
    beta: float,
    margin: float,
    shift: float,
    tau: float,
    separation_weight: float,
    form: str = "project",
) -> SCBCHTerms:
    """total = alpha·bsch + beta·quantization + mean_i w_i c_i (w = 1 when ``weights`` is None);
    ``form`` "upstream": bsch is :func:`upstream_contrastive` (``separation_weight`` unused),
    the quantisation is summed and c_i averaged over the two modalities."""
    if form not in FORMS:
        raise ValueError(f"SCBCH form must be one of {FORMS}, got {form!r}")
    upstream = form == "upstream"
    if upstream:
        bsch = upstream_contrastive(u_img, u_txt, labels, margin=margin, shift=shift, tau=tau)
    else:
        bsch = bsch_loss(
            u_img,
            u_txt,
            labels,
            margin=margin,
            shift=shift,
            tau=tau,
            separation_weight=separation_weight,
        )
    quant = quantization_loss(u_img, u_txt, reduce="sum" if upstream else "mean")
    c = classification_losses(logits_img, logits_txt, labels, reduce="mean" if upstream else "sum")
    if weights is None:
        weights = torch.ones_like(c)
    cls = weighted_classification(c, weights)
    total = alpha * bsch + beta * quant + cls
    return SCBCHTerms(
        total=total,
        contrastive=bsch.detach(),
        quantization=quant.detach(),
        classification=cls.detach(),
        per_item=c.detach(),
    )
