"""Brute-force references written from the paper's equations, for tests; no pipeline code here.

Losses (Eq 2–12): explicit loops over items, modalities, classes and code entries with scalar
float64 torch ops, so a reference value can also be differentiated and its gradient compared
with the vectorised implementation's. The self-paced weights are constants of the step
(computed from float values), as Eq 10–12 prescribe.

Retrieval: the exact MAP of a uniformly random ranking, the baseline a trained model must beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# ------------------------------------------------------------------------------------- losses


def f64(*xs: torch.Tensor, grad: bool = False) -> list[torch.Tensor]:
    """Detached float64 copies (leaf tensors that require grad with ``grad=True``)."""
    return [x.detach().to(torch.float64).requires_grad_(grad) for x in xs]


def value(x: Any) -> float:
    """A reference value as a Python float (a constant: no gradient flows through it)."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    s = a[0] * b[0]
    for t in range(1, a.shape[0]):
        s = s + a[t] * b[t]
    return s


def robust(p: Any, r: float) -> Any:
    """(1 − r)(1 − p^r)/r + r(1 − p), the summand of Eq 3, 6 and 7."""
    return (1 - r) * (1 - p**r) / r + r * (1 - p)


def term(p: torch.Tensor, r: float, form: str = "robust") -> torch.Tensor:
    return robust(p, r) if form == "robust" else -torch.log(p)


def chl_q(
    codes: Sequence[torch.Tensor],
    tau: float,
    exclude_self: bool = False,
    all_codes: Sequence[torch.Tensor] | None = None,
    offset: int = 0,
) -> list[list[torch.Tensor]]:
    """q(i | x_i^m) of Eq 2 as ``q[m][i]``; keys ``all_codes[j][z]``, anchor i is key offset+i."""
    keys, off = (codes, 0) if all_codes is None else (all_codes, offset)
    M, B, N = len(codes), codes[0].shape[0], keys[0].shape[0]
    q = []
    for m in range(M):
        row = []
        for i in range(B):
            num, den = 0.0, 0.0
            for j in range(M):
                for z in range(N):
                    if exclude_self and j == m and z == off + i:
                        continue
                    e = torch.exp(dot(codes[m][i], keys[j][z]) / tau)
                    den = den + e
                    if z == off + i:
                        num = num + e
            row.append(num / den)
        q.append(row)
    return q


def chl(
    codes: Sequence[torch.Tensor],
    tau: float,
    r: float,
    exclude_self: bool = False,
    all_codes: Sequence[torch.Tensor] | None = None,
    offset: int = 0,
    form: str = "robust",
) -> torch.Tensor:
    """L_C of Eq 3: (1/B) Σ_i Σ_m term(q(i | x_i^m)) over the B anchors."""
    q = chl_q(codes, tau, exclude_self, all_codes, offset)
    B = len(q[0])
    total = 0.0
    for row in q:
        for i in range(B):
            total = total + term(row[i], r, form)
    return total / B


def center_p(h: torch.Tensor, centers: torch.Tensor, tau: float) -> list[torch.Tensor]:
    """p(k | x) of Eq 4 for one code ``h`` (L,), a list over the K centers."""
    e = [torch.exp(dot(h, centers[k]) / tau) for k in range(centers.shape[0])]
    z = 0.0
    for x in e:
        z = z + x
    return [x / z for x in e]


def aggregation_v(h: torch.Tensor, centers: torch.Tensor, y: Sequence[float], tau: float):
    """v of Eq 5: Σ_k y_k p(k | x)."""
    p = center_p(h, centers, tau)
    v = 0.0
    for k in range(len(p)):
        if float(y[k]) != 0.0:
            v = v + float(y[k]) * p[k]
    return v


def ell(
    codes: Sequence[torch.Tensor],
    centers: torch.Tensor,
    labels: Any,
    tau: float,
    r: float,
    form: str = "robust",
) -> list[torch.Tensor]:
    """ℓ_i of Eq 7: Σ_m term(v_i^m), a list over the items."""
    out = []
    for i in range(codes[0].shape[0]):
        s = 0.0
        for h in codes:
            s = s + term(aggregation_v(h[i], centers, labels[i], tau), r, form)
        out.append(s)
    return out


def predicted(codes: Sequence[torch.Tensor], centers: torch.Tensor, tau: float) -> list[int]:
    """argmax_k Σ_m p(k | x_i^m) per item (the first of equal maxima)."""
    out = []
    for i in range(codes[0].shape[0]):
        score = [0.0] * centers.shape[0]
        for h in codes:
            for k, p in enumerate(center_p(h[i], centers, tau)):
                score[k] += value(p)
        out.append(max(range(len(score)), key=lambda k, s=score: (s[k], -k)))
    return out


def spl_weight(loss: float, gamma: float) -> float:
    """argmin over w ∈ [0, 1] of w·ℓ + γ(½w² − w) (Eq 10): the parabola's vertex 1 − ℓ/γ,
    clipped to the interval."""
    return min(1.0, max(0.0, 1.0 - loss / gamma))


def _pdf(x: float, mean: float, var: float) -> float:
    return math.exp(-((x - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def clean_posterior(loss: float, pi, mean, var) -> float:
    """P(clean | ℓ) of a two-Gaussian mixture, ℓ clipped to [mean_0, mean_1]; 1 if not mean_1 >
    mean_0."""
    if not mean[1] > mean[0]:
        return 1.0
    x = min(max(loss, mean[0]), mean[1])
    a, b = pi[0] * _pdf(x, mean[0], var[0]), pi[1] * _pdf(x, mean[1], var[1])
    return a / (a + b)


def mean_of(xs: Sequence[Any]) -> Any:
    s = 0.0
    for x in xs:
        s = s + x
    return s / len(xs)


def objective(
    h_image: torch.Tensor,
    h_text: torch.Tensor,
    centers: torch.Tensor,
    labels: Any,
    *,
    epoch: int,
    warmup_epochs: int,
    gamma: float,
    alpha: float,
    r: float,
    tau: float = 1.0,
    exclude_self: bool = False,
    weighting: str = "spl",
    loss_form: str = "robust",
    keep_rate: float = 1.0,
    tau_center: float = 0.0,
    mixture: tuple[Any, Any, Any] | None = None,  # (pi, mean, var)
    pseudo_labels: bool = False,
) -> dict[str, Any]:
    """Eq 9: L_p + α L_C during warm-up (epoch < N_w), then the weighted center term + α L_C.

    Weightings after warm-up: "spl" L_S of Eq 7/8 with w of Eq 12; "hard" mean(1[ℓ < γ]·ℓ);
    "none" L_p; "small_loss" the mean ℓ of the ⌈keep_rate·B⌉ smallest; "mixture" mean(w·ℓ) with
    w = P(clean | ℓ) (all ones without a fit), plus mean((1 − w)·ℓ_pred) with ``pseudo_labels``.
    ``weights`` are Eq 12's (the mixture's for "mixture") in warm-up, for monitoring.
    """
    codes = [h_image, h_text]
    tc = tau_center or tau
    l_c = chl(codes, tau, r, exclude_self, form=loss_form)
    ls = ell(codes, centers, labels, tc, r, loss_form)
    lf = [value(x) for x in ls]
    n = len(ls)
    w = [spl_weight(x, gamma) for x in lf]
    if weighting == "mixture":
        w = [clean_posterior(x, *mixture) if mixture else 1.0 for x in lf]
    warm = epoch < warmup_epochs
    if warm or weighting == "none":
        center = mean_of(ls)
        if weighting == "none" and not warm:
            w = [1.0] * n
    elif weighting == "spl":
        reg = [gamma * (0.5 * wi * wi - wi) for wi in w]
        center = mean_of([wi * x for wi, x in zip(w, ls, strict=True)]) + sum(reg) / n
    elif weighting == "hard":
        w = [1.0 if x < gamma else 0.0 for x in lf]
        center = mean_of([wi * x for wi, x in zip(w, ls, strict=True)])
    elif weighting == "small_loss":
        keep = min(n, max(1, math.ceil(keep_rate * n - 1e-9)))
        kept = sorted(range(n), key=lambda i: (lf[i], i))[:keep]
        w = [1.0 if i in kept else 0.0 for i in range(n)]
        center = mean_of([ls[i] for i in kept])
    elif weighting == "mixture":
        center = mean_of([wi * x for wi, x in zip(w, ls, strict=True)])
        if pseudo_labels:
            pred = predicted(codes, centers, tc)
            one_hot = [[1.0 if k == c else 0.0 for k in range(centers.shape[0])] for c in pred]
            l_pred = ell(codes, centers, one_hot, tc, r, loss_form)
            center = center + mean_of([(1 - wi) * x for wi, x in zip(w, l_pred, strict=True)])
    else:
        raise ValueError(weighting)
    return {
        "total": center + alpha * l_c,
        "chl": l_c,
        "center": center,
        "ell": ls,
        "weights": w,
        "warmup": warm,
        "predicted": predicted(codes, centers, tc),
    }


# ---------------------------------------------------------------------------------- retrieval


def random_ranking_ap(n_relevant: int, n: int) -> float:
    """E[AP] of a uniformly random ranking of n items of which R are relevant (0 when R = 0).

    AP = (1/R) Σ_k rel_k·P@k. Position k holds a relevant item with probability R/n, and given
    that, the other k − 1 places above hold (k − 1)(R − 1)/(n − 1) relevant items on average, so
    E[AP] = (1/n) Σ_k (1 + (k − 1)(R − 1)/(n − 1))/k = (R − 1)/(n − 1) + (n − R)·H_n/(n(n − 1)).
    """
    if n_relevant == 0:
        return 0.0
    if n == 1:
        return 1.0
    harmonic = sum(1.0 / k for k in range(1, n + 1))
    return (n_relevant - 1) / (n - 1) + (n - n_relevant) * harmonic / (n * (n - 1))


def random_ranking_map(query_labels: Any, db_labels: Any) -> float:
    """MAP of a random ranking: the mean over queries of ``random_ranking_ap``, where an item is
    relevant to a query when they share a label (multi-hot rows)."""
    ql, dl = np.asarray(query_labels) > 0, np.asarray(db_labels) > 0
    rel = (ql.astype(np.int64) @ dl.astype(np.int64).T) > 0
    return float(np.mean([random_ranking_ap(int(row.sum()), dl.shape[0]) for row in rel]))


# ---------- SCBCH reliability: loops over items, float64, (sim desc, id asc) ----------


def _unit(v: Any) -> list[float]:
    n = math.sqrt(sum(float(x) * float(x) for x in v))
    return [float(x) / max(n, 1e-12) for x in v]


def reliability_neighbours_loop(
    img: Any, txt: Any, ids: Any, k: int, neighbours: str = "cross"
) -> list[list[tuple]]:
    """Per item: the k (sim, id, row) with the largest sim_ij, j ≠ i, ties by smaller id; sim is
    ½(cos(img_i, txt_j) + cos(txt_i, img_j)) ("cross") or ½(cos(img_i, img_j) + cos(txt_i, txt_j))
    ("intra")."""
    im = [_unit(r) for r in img]
    tx = [_unit(r) for r in txt]
    a_side, b_side = (tx, im) if neighbours == "cross" else (im, tx)
    n = len(ids)
    k = min(k, n - 1)
    out = []
    for i in range(n):
        cand = []
        for j in range(n):
            if j == i:
                continue
            a = sum(x * y for x, y in zip(im[i], a_side[j], strict=True))
            b = sum(x * y for x, y in zip(tx[i], b_side[j], strict=True))
            cand.append((0.5 * (a + b), int(ids[j]), j))
        cand.sort(key=lambda t: (-t[0], t[1]))
        out.append(cand[:k])
    return out


def reliability_weights_loop(
    img: Any, txt: Any, labels: Any, ids: Any, k: int, g: float, neighbours: str = "cross"
) -> np.ndarray:
    """SCBCH's reliability w_i = g + (1 − g)·cos(ŷ_i, y_i) over the k neighbours j of i (loops,
    float64): "cross", ŷ_i = Σ_j (1 + s_ij)/2 · y_j; "intra" (the authors' form),
    ŷ_i = Σ_j s_ij·y_j / (Σ_j s_ij + 1e-8)."""
    w = []
    for i, nbrs in enumerate(reliability_neighbours_loop(img, txt, ids, k, neighbours)):
        total = sum(s for s, _, _ in nbrs) + 1e-8
        y_hat = [0.0] * len(labels[0])
        for s, _, j in nbrs:
            coef = 0.5 * (1.0 + s) if neighbours == "cross" else s / total
            for c in range(len(labels[0])):
                y_hat[c] += coef * float(labels[j][c])
        y = [float(v) for v in labels[i]]
        dot = sum(a * b for a, b in zip(y_hat, y, strict=True))
        den = math.sqrt(sum(a * a for a in y_hat)) * math.sqrt(sum(b * b for b in y))
        w.append(g + (1.0 - g) * (dot / den if den > 0 else 0.0))
    return np.array(w)


def upstream_contrastive_loop(
    u_img: Any, u_txt: Any, labels: Any, margin: float, shift: float, tau: float
) -> float:
    """The authors' SCBCH contrastive loss, entry by entry (S = u_img·u_txtᵀ, T = Jaccard)."""
    ui, ut, y = (np.asarray(a, dtype=np.float64).tolist() for a in (u_img, u_txt, labels))
    n = len(ui)
    S = [
        [sum(a * b for a, b in zip(ui[i], ut[j], strict=True)) for j in range(n)] for i in range(n)
    ]

    def jac(a: list[float], b: list[float]) -> float:
        inter = sum(1 for x, z in zip(a, b, strict=True) if x > 0 and z > 0)
        union = sum(1 for x, z in zip(a, b, strict=True) if x > 0 or z > 0)
        return inter / union if union else 0.0

    ranking = positive = 0.0
    for i in range(n):
        for j in range(n):
            t = jac(y[i], y[j])
            c_txt = S[i][j] if S[i][j] >= S[i][i] - margin else S[i][j] - shift
            c_img = S[i][j] if S[i][j] >= S[j][j] - margin else S[i][j] - shift
            if i == j:
                c_txt, c_img = max(c_txt, 0.0), max(c_img, 0.0)
            ranking += tau * math.exp(c_txt / tau * (1 - t)) + tau * math.exp(c_img / tau * (1 - t))
            if i != j and t > 0:
                positive += math.exp(shift - S[i][j])
    diag = sum(S[i][i] for i in range(n)) / n
    return ranking / (n * n) + positive / (n * n) - diag
