"""Backgrounds: the colour seen along rays that leave the scene box, as a function of direction."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine_server.field.network import mlp

logger = logging.getLogger(__name__)


def _check_dirs(dirs: torch.Tensor) -> None:
    if dirs.dim() != 2 or dirs.shape[1] != 3:
        raise ValueError(f"background directions must be (N, 3), got {tuple(dirs.shape)}")


BACKGROUND_LIKENESS_WIDTH = 0.15
"""RGB distance at which a colour stops being the background's (the Gaussian's sigma): the nearest colour the
bundled prior is asked for (blue, 0.53 from its cyan) scores 0.002."""


def background_likeness(rgb: torch.Tensor, background_rgb: torch.Tensor | tuple[float, float, float],
                        width: float = BACKGROUND_LIKENESS_WIDTH) -> torch.Tensor:
    """How much colours (..., 3) are the plain background's: exp(-|rgb - bg|^2 / 2 width^2) -> (...,) in (0, 1].

    Over a plain background, matter of the background's colour and no matter render the same, so a prior
    that paints background in a gap (a torus's hole, between a table's legs) leaves a membrane there;
    this is how the coarse stage finds it (:meth:`~engine_server.pipelines.text_to_3d.TextTo3D.coarse_loss`).
    """
    bg = torch.as_tensor(background_rgb, dtype=rgb.dtype, device=rgb.device)
    return torch.exp(-((rgb - bg) ** 2).sum(-1) / (2.0 * width**2))


class FixedBackground(nn.Module):
    """One colour everywhere."""

    def __init__(self, rgb: tuple[float, float, float] | torch.Tensor = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        rgb = torch.as_tensor(rgb, dtype=torch.float32).reshape(-1)
        if rgb.numel() != 3:
            raise ValueError(f"background colour must have 3 values, got {rgb.numel()}")
        self.register_buffer("rgb", rgb)

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        """dirs: (N, 3) -> (N, 3) colour."""
        _check_dirs(dirs)
        return self.rgb.to(dirs.dtype).expand(dirs.shape[0], 3)


@dataclass
class MLPBackgroundConfig:
    """Shape of an `MLPBackground`."""

    n_frequencies: int = 4
    """Sin/cos frequency bands of the direction encoding (0: raw direction only)."""
    hidden: int = 32
    """Width of the hidden layers."""
    layers: int = 2
    """Hidden layers."""
    random_aug_prob: float = 0.0
    """In training mode, the chance that a call returns one random colour instead (stops the
    background from explaining the object during score distillation)."""

    def __post_init__(self) -> None:
        if self.n_frequencies < 0 or self.hidden < 1 or self.layers < 0:
            raise ValueError(
                f"MLPBackground needs n_frequencies >= 0, hidden >= 1, layers >= 0, got "
                f"{self.n_frequencies}, {self.hidden}, {self.layers}"
            )
        if not 0.0 <= self.random_aug_prob <= 1.0:
            raise ValueError(f"random_aug_prob must be in [0, 1], got {self.random_aug_prob}")


class MLPBackground(nn.Module):
    """A small MLP on the (frequency-encoded) view direction, colours in [0, 1]."""

    def __init__(self, config: MLPBackgroundConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or MLPBackgroundConfig()
        self.register_buffer("freqs", (2.0 ** torch.arange(c.n_frequencies, dtype=torch.float32)) * torch.pi)
        self.net = mlp(3 + 6 * c.n_frequencies, c.hidden, c.layers, 3)
        self.random_aug_prob = c.random_aug_prob

    def encode(self, dirs: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N, 3 + 6 * n_frequencies)."""
        if self.freqs.numel() == 0:
            return dirs
        ang = (dirs[:, :, None] * self.freqs).flatten(1)  # (N, 3 * n_frequencies)
        return torch.cat([dirs, torch.sin(ang), torch.cos(ang)], dim=-1)

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        """dirs: (N, 3) unit directions -> (N, 3) colour."""
        _check_dirs(dirs)
        if self.training and self.random_aug_prob > 0 and torch.rand(()).item() < self.random_aug_prob:
            return torch.rand(3, device=dirs.device, dtype=dirs.dtype).expand(dirs.shape[0], 3)
        return torch.sigmoid(self.net(self.encode(dirs)))
