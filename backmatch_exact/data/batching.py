"""Training helpers: random augmentation of a batch, and the index batches of an epoch.

``augment(x, generator)`` applies random horizontal flips and small random
rotations to a batch; ``batches(n, batch_size, generator)`` yields the index
batches of one epoch.  Both are deterministic given a ``torch.Generator``.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    flip_p: float = 0.5,
    max_degrees: float = 15.0,
    padding_mode: str = "border",
) -> torch.Tensor:
    """Randomly flip and rotate a batch of images (for training only).

    Each image independently is mirrored left-right with probability
    ``flip_p`` and rotated about its centre by an angle drawn uniformly from
    ``[-max_degrees, max_degrees]`` (bilinear interpolation; pixels that come
    from outside the image copy the nearest edge pixel, which for padded
    MNIST-style images is the background).

    The random numbers come from ``generator`` only, so the same generator
    state gives the same output.  Exactly ``2 * N`` uniform numbers are drawn
    per call (``N`` = batch size), whatever the options.

    Args:
        x: ``N x C x H x W`` float tensor (any device).
        generator: a ``torch.Generator``; the random numbers are drawn on its
            device and moved to ``x``'s device.
        flip_p: probability of a horizontal flip.
        max_degrees: largest rotation, in degrees; 0 disables rotation.
        padding_mode: ``grid_sample`` padding mode (``"border"``,
            ``"zeros"`` or ``"reflection"``).

    Returns:
        A new tensor with the shape, dtype and device of ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"augment expects N x C x H x W, got shape {tuple(x.shape)}")
    n = x.shape[0]
    gen_device = generator.device
    u = torch.rand(2, n, generator=generator, device=gen_device, dtype=torch.float64)
    u = u.to(x.device)
    flip = u[0] < flip_p
    out = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    if max_degrees:
        angle = (u[1] * 2.0 - 1.0) * math.radians(max_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(cos)
        # affine_grid maps output coords to input coords in [-1, 1] units;
        # for non-square images the aspect ratio must be accounted for.
        h, w = x.shape[-2:]
        ar = w / h
        theta = torch.stack(
            [
                torch.stack([cos, -sin / ar, zero], dim=1),
                torch.stack([sin * ar, cos, zero], dim=1),
            ],
            dim=1,
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode=padding_mode,
                            align_corners=False)
    return out


def batches(
    n: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the index batches of one pass over ``n`` examples.

    With a ``generator`` the order is a random permutation drawn from it
    (``torch.randperm``), so the same generator state gives the same batches;
    with ``generator=None`` the order is ``0, 1, ..., n-1`` (for evaluation).

    Args:
        n: number of examples.
        batch_size: examples per batch; the last batch may be smaller.
        generator: source of randomness, or ``None`` for sequential order.
        drop_last: skip a final batch smaller than ``batch_size``.

    Yields:
        ``int64`` CPU tensors of indices, usable as ``x[idx]``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if generator is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
