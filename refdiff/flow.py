"""Noise injection for flow-matching models (Flux, SD 3): x_t = (1 - t) x0 + t noise, then Euler steps.

The analogue of Eq. 3 for rectified-flow models (docs/METHOD.md, "Diffusion transformers"). ``t`` is the
noise fraction itself (ComfyUI's sigma for its CONST sampling), after any timestep shift: the model is
evaluated at sigma = t and the shift only changes which timestep embedding that sigma maps to.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import InputError

# The default noise fraction: the flow t whose signal-to-noise ratio equals that of Ref-Diff's injection at
# DDPM t = 101 (alpha_bar 0.893): (1 - t) / t = sqrt(alpha_bar / (1 - alpha_bar)) gives t = 0.257.
DEFAULT_FLOW_T: float = 0.25


def flow_ts(t: float, steps: int = 1) -> list[float]:
    """The noise fractions the model is evaluated at: ``steps`` uniform Euler steps from ``t`` towards 0."""
    if not 0.0 < float(t) <= 1.0:
        raise InputError(f"flow_t must be in (0, 1], got {t}")
    if int(steps) < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    return [float(t) * (1.0 - i / int(steps)) for i in range(int(steps))]


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise (rectified flow; ComfyUI's CONST noise_scaling at sigma = t)."""
    if x0.shape != noise.shape:
        raise InputError(f"latent {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    return (1.0 - float(t)) * x0 + float(t) * noise.to(x0.dtype)


def flow_loop(x0: torch.Tensor, noise: torch.Tensor, ts: list[float],
              denoise: Callable[[torch.Tensor, float, int], torch.Tensor],
              before_step: Callable[[int], None] = lambda i: None) -> torch.Tensor:
    """Noise x0 to ts[0], then for each t: x0_hat = denoise(x_t, t, i) and an Euler step to the next t (0 after
    the last); returns the last x0 prediction. Every backend's flow capture runs this loop."""
    x = flow_noise(x0, noise, ts[0])
    pred = x0
    for i, t in enumerate(ts):
        before_step(i)
        pred = denoise(x, t, i)
        t_next = ts[i + 1] if i + 1 < len(ts) else 0.0
        x = x + (t_next - t) * (x - pred) / t  # velocity (x_t - x0_hat) / t
    return pred


__all__ = ["DEFAULT_FLOW_T", "flow_ts", "flow_noise", "flow_loop"]
