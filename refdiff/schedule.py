"""Noise injection and the DDIM steps of Eq. 3 (docs/METHOD.md section 2), independent of any backend.

The schedule reproduces the released (LDM img2img) code: a uniform DDIM schedule of ``ddim_steps`` steps over
the training steps (timesteps 1, 51, 101, ... for 20 steps); strength 0.1 gives t_enc = 2, the latent is noised
with alpha_bar at DDPM t = 101, then the UNet runs DDIM steps at t = 51 and t = 1 (eta = 0), the last one
stepping to alphas_cumprod[0]. Random numbers come from CPU generators, so CPU and GPU runs share them.

``ddim_loop`` is the whole step loop: x_T from the latent, then per step pair the backend's noise prediction
(a callable: the diffusers UNet with its guidance batch, or a ComfyUI MODEL through its sampler) and the
DDIM update. Every backend runs it, so the schedule, the noising and the update are written once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import InputError

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")

# predict(x_t, t, i) -> the model output (epsilon or v, guided) at DDPM timestep t of step i
Predict = Callable[[torch.Tensor, int, int], torch.Tensor]


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = 1000) -> torch.Tensor:
    """alphas_cumprod [T] of SD's "scaled_linear" betas (linear in sqrt(beta)), float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def ddim_timesteps(ddim_steps: int = 20, num_train_timesteps: int = 1000) -> list[int]:
    """Uniform DDIM timesteps as LDM makes them: range(0, T, T // ddim_steps) + 1 -> [1, 51, ..., 951]."""
    if not 1 <= int(ddim_steps) <= int(num_train_timesteps):
        raise InputError(f"ddim_steps must be within 1..num_train_timesteps ({num_train_timesteps}), got {ddim_steps}")
    stride = int(num_train_timesteps) // int(ddim_steps)
    return [t + 1 for t in range(0, int(num_train_timesteps), stride)]


def injection_schedule(strength: float = 0.1, ddim_steps: int = 20,
                       num_train_timesteps: int = 1000) -> tuple[int, list[int]]:
    """(noise_t, step_ts): noise the latent at ddim_timesteps[t_enc], then step at reversed(ddim_timesteps[:t_enc]).

    t_enc = int(strength * ddim_steps); the defaults give (101, [51, 1]) as LDM's img2img script.
    """
    ts = ddim_timesteps(ddim_steps, num_train_timesteps)
    t_enc = int(strength * ddim_steps)
    if t_enc < 1:
        raise InputError(f"strength={strength} with ddim_steps={ddim_steps} gives t_enc = int(strength * ddim_steps)"
                         f" = {t_enc}: raise strength or ddim_steps so that at least one step runs")
    if t_enc >= len(ts):
        raise InputError(f"strength={strength} with ddim_steps={ddim_steps} gives t_enc = {t_enc}, beyond the "
                         f"{len(ts)} DDIM timesteps: use strength < 1")
    return ts[t_enc], ts[:t_enc][::-1]


def step_pairs(step_ts: Sequence[int]) -> list[tuple[int, int]]:
    """(t, t_prev) of each DDIM step; the last step goes to alphas_cumprod[0], as LDM's ddim_alphas_prev."""
    return list(zip(step_ts, list(step_ts[1:]) + [0]))


@dataclass(frozen=True)
class InjectionPlan:
    """Where Eq. 3 noises the latent (DDPM ``noise_timestep``) and the DDIM steps (t, t_prev) that follow."""

    noise_timestep: int
    steps: tuple[tuple[int, int], ...]

    @property
    def step_timesteps(self) -> list[int]:
        """t of each step."""
        return [t for t, _ in self.steps]

    @property
    def prev_timesteps(self) -> list[int]:
        """t_prev of each step (0 after the last: alphas_cumprod[0])."""
        return [t_prev for _, t_prev in self.steps]


def injection_plan(strength: float = 0.1, ddim_steps: int = 20, num_train_timesteps: int = 1000,
                   max_steps: int | None = None) -> InjectionPlan:
    """The plan of ``injection_schedule``, its steps capped at ``max_steps`` (speed option; None = all)."""
    if max_steps is not None and int(max_steps) < 1:
        raise InputError(f"max_steps must be >= 1 or None, got {max_steps}")
    noise_t, step_ts = injection_schedule(strength, ddim_steps, num_train_timesteps)
    pairs = step_pairs(step_ts)[:max_steps]
    return InjectionPlan(int(noise_t), tuple((int(t), int(tp)) for t, tp in pairs))


def injection_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The seeded Gaussian noise of Eq. 3, drawn on the CPU so that CPU and GPU runs share it."""
    return torch.randn(tuple(shape), generator=torch.Generator(device="cpu").manual_seed(int(seed)),
                       dtype=torch.float32)


def noise_latent(latent: torch.Tensor, alpha_bar: float, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion (Eq. 3): sqrt(alpha_bar) * latent + sqrt(1 - alpha_bar) * noise."""
    return math.sqrt(alpha_bar) * latent + math.sqrt(1.0 - alpha_bar) * noise


def ddim_step(x_t: torch.Tensor, model_output: torch.Tensor, alpha_t: float, alpha_prev: float,
              prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (eta = 0): (x_prev, pred_x0) from the model's epsilon or v prediction."""
    a, ap = float(alpha_t), float(alpha_prev)
    if prediction_type == "epsilon":
        eps = model_output
        pred_x0 = (x_t - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
    elif prediction_type == "v_prediction":
        pred_x0 = math.sqrt(a) * x_t - math.sqrt(1.0 - a) * model_output
        eps = math.sqrt(a) * model_output + math.sqrt(1.0 - a) * x_t
    else:
        raise InputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return math.sqrt(ap) * pred_x0 + math.sqrt(1.0 - ap) * eps, pred_x0


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """u + g (c - u): the guided prediction (and, on captured logits, the released code's map combination)."""
    return uncond + guidance_scale * (cond - uncond)


def sigma_of(alpha_bar: float) -> float:
    """The noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of a DDPM step (k-diffusion's parametrisation)."""
    return math.sqrt((1.0 - float(alpha_bar)) / float(alpha_bar))


def alphas_cumprod_of(sigmas: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod = 1 / (1 + sigma^2) of discrete noise levels (the inverse of ``sigma_of``), float64."""
    return 1.0 / (1.0 + sigmas.detach().double().cpu() ** 2)


def ddim_loop(latent: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, plan: InjectionPlan,
              predict: Predict, prediction_type: str = "epsilon", device: torch.device | None = None,
              before_step: Callable[[int], None] | None = None,
              after_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 and the DDIM steps: x_T = noise_latent(latent, alpha_bar[noise_t], noise) (float32, then on
    ``device``, default the latent's), then per step (t, t_prev) x <- ddim_step(x, predict(x, t, i)).

    ``before_step(i)`` runs before step i (e.g. an interrupt check, naming the capture step), ``after_step(i)``
    after it (progress). Returns (x after the last step, its pred_x0; x_T itself when there is no step).
    """
    ac = alphas_cumprod.double().cpu()
    for t in (plan.noise_timestep, *(t for pair in plan.steps for t in pair)):
        if not 0 <= int(t) < len(ac):
            raise InputError(f"timestep {t} of the injection plan is outside the model's {len(ac)} training steps")
    x = noise_latent(latent.float(), float(ac[plan.noise_timestep]), noise.to(latent.device).float())
    x = x.to(device) if device is not None else x
    pred_x0 = x
    for i, (t, t_prev) in enumerate(plan.steps):
        if before_step is not None:
            before_step(i)
        out = predict(x, int(t), i).float()
        x, pred_x0 = ddim_step(x, out, float(ac[t]), float(ac[t_prev]), prediction_type)
        if after_step is not None:
            after_step(i)
    return x, pred_x0


__all__ = ["PREDICTION_TYPES", "Predict", "scaled_linear_alphas_cumprod", "ddim_timesteps", "injection_schedule",
           "step_pairs", "InjectionPlan", "injection_plan", "injection_noise", "noise_latent", "ddim_step",
           "classifier_free_guidance", "sigma_of", "alphas_cumprod_of", "ddim_loop"]
