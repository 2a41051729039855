"""One training step of RSHNL in plain PyTorch (no Ray, no MLflow).

``compute_loss`` is the same code on every worker and in a single process, so a run on N workers
can be checked against one process on the concatenated batch.
"""

from __future__ import annotations

import hashlib
import math
import random
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.method.losses import LossMixture, LossTerms, rshnl_objective
from pipeline.method.model import HashModel, fixed_centers, model_from_arch
from pipeline.method.scbch import TERM_NAMES as SCBCH_TERMS
from pipeline.method.scbch import scbch_objective


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (``lr``, ``weight_decay``) with torch's fused kernel where the device has one.

    Same update as the per-tensor loop to float rounding (tests/test_optimizer.py); on the 2-core
    CPU box a Wikipedia epoch took 2.4 s instead of 4.1 s, Adam being half of the step there.
    """
    params = list(model.parameters())
    try:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def center_checksum(centers: torch.Tensor) -> str:
    """SHA-256 of the exact bytes of the centers (bit-identical ⇔ equal checksums)."""
    return hashlib.sha256(centers.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def assert_centers_synced(centers: torch.Tensor, step: int) -> None:
    gathered = [torch.empty_like(centers) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, centers.contiguous())
    for rank, c in enumerate(gathered):
        if not torch.equal(c, gathered[0]):
            raise RuntimeError(f"hash centers differ between rank 0 and rank {rank} at step {step}")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows from every rank; backward sums every rank's gradient for the local rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank, top = dist.get_rank(), max(sizes)
        padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank, ctx.top = sizes, rank, top
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's codes
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of ``x`` from every rank (gradient flows to the local part); returns (all, offset)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes_t = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes_t, n)
    sizes = [int(s.item()) for s in sizes_t]
    return _GatherWithGrad.apply(x, sizes), sum(sizes[: dist.get_rank()])


def compute_loss(
    model: torch.nn.Module,
    image: torch.Tensor,
    text: torch.Tensor,
    label: torch.Tensor,
    cfg: TrainConfig,
    epoch: int,
    global_negatives: bool,
    weights: torch.Tensor | None = None,
    mixture: LossMixture | None = None,
) -> LossTerms:
    """Forward pass and the objective of Eq 9 for one local batch.

    ``mixture``: the loss mixture fitted on the previous epoch's ℓ_i of the whole training set,
    used by ``weighting: mixture`` and ``gamma_mode: mixture`` (γ at its P(clean) = ½ point).

    With ``global_negatives`` the CHL denominator (Eq 2) runs over every rank's codes; each rank's
    loss is a mean over its own items, so DDP's gradient average equals the gradient of the loss of
    one batch holding all ranks' items.
    """
    amp = torch.autocast(image.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    with amp:
        out = model(image, text)
    if cfg.method == "scbch":
        return _scbch_loss(out, label, cfg, epoch, weights)
    h_img, h_txt, centers = (t.float() for t in out)
    all_codes, offset = None, 0
    if global_negatives and is_distributed():
        all_img, offset = gather_with_grad(h_img)
        all_txt, _ = gather_with_grad(h_txt)
        all_codes = [all_img, all_txt]
    return rshnl_objective(
        h_img,
        h_txt,
        centers,
        label,
        epoch=epoch,
        warmup_epochs=cfg.warmup_epochs,
        gamma=epoch_gamma(cfg, mixture),
        alpha=cfg.alpha,
        r=cfg.r,
        tau=cfg.tau,
        exclude_self=cfg.chl_exclude_self,
        all_codes=all_codes,
        offset=offset,
        weighting=cfg.weighting,
        loss_form=cfg.loss_form,
        keep_rate=cfg.keep_rate or 1.0,
        tau_center=cfg.tau_center,
        mixture=mixture,
        pseudo_labels=cfg.pseudo_labels,
    )


def needs_loss_mixture(cfg: TrainConfig) -> bool:
    """Whether the run fits a loss mixture on each epoch's ℓ_i (``weighting``/``gamma_mode``)."""
    return cfg.method == "rshnl" and (cfg.weighting == "mixture" or cfg.gamma_mode == "mixture")


def epoch_gamma(cfg: TrainConfig, mixture: LossMixture | None) -> float:
    """γ of Eq 12 for this epoch: ``cfg.gamma``, or the mixture's P(clean) = ½ point."""
    if cfg.gamma_mode == "mixture" and mixture is not None:
        b = mixture.boundary()
        return b if math.isfinite(b) and b > 0 else cfg.gamma
    return cfg.gamma


def _scbch_loss(
    out: tuple[torch.Tensor, ...],
    label: torch.Tensor,
    cfg: TrainConfig,
    epoch: int,
    weights: torch.Tensor | None,
) -> LossTerms:
    """SCBCH's objective in :class:`LossTerms` (``chl``: BSCH, ``center``: the weighted BCE; logged
    under their own names, see :func:`loss_term_names`).

    Its contrastive term uses the local batch only (no cross-worker negatives).
    """
    u_img, u_txt, _, lg_img, lg_txt = (t.float() for t in out)
    warm = epoch < cfg.warmup_epochs or weights is None
    w = torch.ones(label.shape[0], device=label.device) if warm else weights
    t = scbch_objective(
        u_img,
        u_txt,
        lg_img,
        lg_txt,
        label,
        None if warm else w,
        alpha=cfg.scbch_alpha,
        beta=cfg.scbch_beta,
        separation_weight=cfg.scbch_separation,
        form=cfg.scbch_form,
        **cfg.scbch_params(),
    )
    return LossTerms(
        total=t.total,
        chl=t.contrastive,
        center=t.classification,
        ell=t.per_item,
        weights=w.detach(),
        warmup=warm,
        predicted=((lg_img + lg_txt) / 2).detach().argmax(dim=1),
    )


def scbch_neighbours(cfg: TrainConfig) -> str:
    """The reliability neighbours of the config's SCBCH form: upstream's are intra-modal."""
    return "intra" if cfg.scbch_form == "upstream" else "cross"


def loss_term_names(cfg: TrainConfig) -> tuple[str, str]:
    """Metric names of the objective's two parts: RSHNL's CHL and center term (L_p in warm-up,
    L_S after), SCBCH's BSCH and reliability-weighted classification."""
    first, second = SCBCH_TERMS if cfg.method == "scbch" else ("chl", "center")
    return f"loss_{first}", f"loss_{second}"


def build_model(cfg: TrainConfig, dims: dict[str, int], num_classes: int) -> HashModel:
    return model_from_arch(arch_of(cfg, dims, num_classes))


def resolve_keep_rate(manifest: dict[str, Any]) -> float:
    """Small-loss selection keeps 1 − the noise rate recorded for the data (at least 5 %)."""
    return max(0.05, 1.0 - float(manifest.get("noise", {}).get("rate") or 0.0))


def setup_model(
    cfg: TrainConfig,
    manifest: dict[str, Any],
    dims: dict[str, int],
    num_classes: int,
    normalisation: dict[str, Any],
) -> tuple[TrainConfig, HashModel]:
    """The config with what the data decides (small-loss keep rate) and the model every executor
    trains: feature normalisation (``{}``: none) and, for fixed RSHNL centers, the seeded ones."""
    if cfg.weighting == "small_loss" and not cfg.keep_rate:
        cfg = cfg.replace(keep_rate=resolve_keep_rate(manifest))
    model = build_model(cfg, dims, num_classes)
    for m, (mean, scale) in normalisation.items():
        model.set_normalisation(m, torch.tensor(mean), torch.tensor(scale))
    if cfg.centers != "learned" and model.method == "rshnl":
        model.center_net.centers.copy_(fixed_centers(cfg.centers, num_classes, cfg.bits, cfg.seed))
    return cfg, model


def arch_of(cfg: TrainConfig, dims: dict[str, int], num_classes: int) -> dict[str, Any]:
    arch = {
        "image_dim": dims["image"],
        "text_dim": dims["text"],
        "num_classes": num_classes,
        "bits": cfg.bits,
        "hidden": cfg.hidden_dim,
        "center_mode": cfg.centers,
        "method": cfg.method,
    }
    if cfg.method == "scbch":
        arch["form"] = cfg.scbch_form
    return arch
