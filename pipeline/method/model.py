"""Hash heads, the class hash-center network and RSHNL's model (no Ray, no MLflow); SCBCH's model
is in :mod:`pipeline.method.scbch`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("image", "text")


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, d_out),
    )


class HashHead(nn.Module):
    """H^m of Eq 1 before the sign: MLP d→h→h→L, tanh, L2-normalised.

    The normalisation follows the authors' implementation; the paper only says tanh.
    """

    def __init__(self, d_in: int, bits: int, hidden: int = 4096, normalize: bool = True) -> None:
        super().__init__()
        self.net = _mlp(d_in, hidden, bits)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(self.net(x))
        return F.normalize(u, dim=1) if self.normalize else u


class CenterNet(nn.Module):
    """Class hash centers c_k (Eq 4) produced from one-hot class vectors by an MLP K→h→h→L.

    The paper describes random binary centers; the authors' implementation learns them jointly
    with the heads through this network (tanh, L2-normalised), which is the default here.
    """

    def __init__(self, num_classes: int, bits: int, hidden: int = 4096) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = _mlp(num_classes, hidden, bits)

    def forward(self) -> torch.Tensor:
        eye = torch.eye(self.num_classes, device=self.net[0].weight.device)
        return F.normalize(torch.tanh(self.net(eye)), dim=1)


CENTER_MODES = ("learned", "random", "hadamard")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), entries ±1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard centers need a power-of-two number of bits, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fixed_centers(mode: str, num_classes: int, bits: int, seed: int) -> torch.Tensor:
    """L2-normalised ±1 class centers: random signs, or K rows of a Hadamard matrix (L ≥ K)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        c = torch.randint(0, 2, (num_classes, bits), generator=g).float() * 2 - 1
    elif mode == "hadamard":
        if bits < num_classes:
            raise ValueError(f"Hadamard centers need bits ≥ classes ({bits} < {num_classes})")
        rows = torch.randperm(bits, generator=g)[:num_classes]
        c = hadamard(bits)[rows]
    else:
        raise ValueError(f"fixed center mode must be 'random' or 'hadamard', got {mode!r}")
    return F.normalize(c, dim=1)


class FixedCenters(nn.Module):
    """Non-trainable class centers held in a buffer (synchronised like any DDP buffer)."""

    def __init__(self, num_classes: int, bits: int) -> None:
        super().__init__()
        self.register_buffer("centers", torch.zeros(num_classes, bits))

    def forward(self) -> torch.Tensor:
        return self.centers


class HashModel(nn.Module):
    """Both hash heads, the class centers and the train-split feature normalisation: what RSHNL
    and SCBCH share. ``encode`` gives continuous codes; ``sign`` of them gives b^m (Eq 1).

    Subclasses set ``method``, whether the codes are L2-normalised (``normalize``, which an
    instance may override), and may fix the centers.
    """

    method = ""
    normalize = True
    fixed_center_mode: str | None = None

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_classes: int,
        bits: int,
        hidden: int = 4096,
        center_mode: str = "learned",
        method: str | None = None,
        normalize: bool | None = None,
    ) -> None:
        super().__init__()
        if method not in (None, self.method):
            raise ValueError(f"{type(self).__name__} is method {self.method!r}, got {method!r}")
        center_mode = self.fixed_center_mode or center_mode
        if center_mode not in CENTER_MODES:
            raise ValueError(f"center_mode must be one of {CENTER_MODES}, got {center_mode!r}")
        self.num_classes, self.bits = num_classes, bits
        norm = self.normalize if normalize is None else normalize
        self.image_head = HashHead(image_dim, bits, hidden, normalize=norm)
        self.text_head = HashHead(text_dim, bits, hidden, normalize=norm)
        self.center_net: nn.Module = (
            CenterNet(num_classes, bits, hidden)
            if center_mode == "learned"
            else FixedCenters(num_classes, bits)
        )
        for m, d in (("image", image_dim), ("text", text_dim)):
            self.register_buffer(f"{m}_mean", torch.zeros(d))
            self.register_buffer(f"{m}_scale", torch.ones(d))

    def set_normalisation(self, modality: str, mean: torch.Tensor, scale: torch.Tensor) -> None:
        getattr(self, f"{modality}_mean").copy_(mean)
        getattr(self, f"{modality}_scale").copy_(scale)

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Continuous codes in [-1, 1]^L of features ``x`` of ``modality``."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        x = (x - getattr(self, f"{modality}_mean")) / getattr(self, f"{modality}_scale")
        head = self.image_head if modality == "image" else self.text_head
        return head(x)


class RSHNLModel(HashModel):
    """RSHNL: L2-normalised codes h^m (Eq 1) and the class-center network (Eq 4)."""

    method = "rshnl"

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(h_image, h_text, centers)."""
        return self.encode(image, "image"), self.encode(text, "text"), self.center_net()


def sign_codes(h: torch.Tensor) -> torch.Tensor:
    """b = sign(h) with sign(0) taken as +1, as int8 ±1."""
    return torch.where(h >= 0, 1, -1).to(torch.int8)


def model_from_arch(arch: dict[str, Any]) -> HashModel:
    """The model an architecture dict describes (``method`` picks RSHNL's or SCBCH's)."""
    if arch.get("method", "rshnl") == "scbch":
        from pipeline.method.scbch import SCBCHModel

        return SCBCHModel(**arch)
    return RSHNLModel(**arch)
