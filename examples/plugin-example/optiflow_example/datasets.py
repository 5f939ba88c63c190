"""Synthetic 2-D classification data."""

from __future__ import annotations

import math

import torch


def make_spirals(n: int, *, arms: int = 2, turns: float = 1.5, noise: float = 0.05,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on ``arms`` interleaved Archimedean spirals (radius 0..1), Gaussian noise added.

    Returns float32 features ``(n, 2)`` and int64 labels ``(n,)``, the arm of each point.
    """
    if arms < 2 or n < arms:
        raise ValueError(f"spirals need arms >= 2 and n >= arms, got arms={arms}, n={n}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % arms
    radius = torch.rand(n, generator=generator)
    angle = radius * turns * 2 * math.pi + labels * (2 * math.pi / arms)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    points += noise * torch.randn(n, 2, generator=generator)
    return points.float(), labels
