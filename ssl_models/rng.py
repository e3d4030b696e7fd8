"""Random numbers for the batched ops (``augment``, the predictive objectives' views, tiles, masks).

One convention everywhere: numbers are drawn from an optional ``torch.Generator`` on *its own*
device (torch's default CPU generator when it is ``None``) and then moved to ``device`` (the CPU when
``device`` is ``None``). So a seed reproduces a batch exactly on any device, whatever else the
device's own generator has been used for; a CUDA generator works too, at the price of a copy.

Shapes: ``shape`` is an int (n,) or a sequence of ints.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Shape = Union[int, Sequence[int]]


def _drawn_on(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _shape(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device if device is not None else "cpu")


def rand(shape: Shape, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Uniform numbers in [0, 1)."""
    return _to(torch.rand(_shape(shape), generator=generator, device=_drawn_on(generator)), device)


def randn(shape: Shape, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Standard normal numbers."""
    return _to(torch.randn(_shape(shape), generator=generator, device=_drawn_on(generator)), device)


def randint(low: int, high: int, shape: Shape, generator: Optional[torch.Generator] = None,
            device=None) -> torch.Tensor:
    """Integers uniform in [low, high)."""
    return _to(torch.randint(low, high, _shape(shape), generator=generator, device=_drawn_on(generator)), device)


def uniform(shape: Shape, low: float, high: float, generator: Optional[torch.Generator] = None,
            device=None) -> torch.Tensor:
    """Uniform numbers in [low, high)."""
    return rand(shape, generator, device) * (high - low) + low


def coin(shape: Shape, p: float, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Bernoulli(p) draws, as bool."""
    return rand(shape, generator, device) < p
