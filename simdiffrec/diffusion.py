"""The deterministic diffusion of Section 4.2: schedule, closed-form forward process, restore.

The paper's forward step (Eq. 8) is `z_t = α_t z_{t-1} + β_t · noise` with a *fixed* noise
vector, so the chain collapses to the closed form of Eq. 9, `z_t = a_t z_0 + b_t · noise` with
`a_t = Π α_s` and `b_t = Σ_s β_s Π_{i>s} α_i`; the code calls them `z0_weight` and
`noise_weight`.  We specify the schedule by these two (index 0 is the clean sequence: a_0 = 1,
b_0 = 0); Eq. 8's per-step α_t, β_t follow from them: `α_t = a_t / a_{t-1}`,
`β_t = b_t - α_t b_{t-1}`.

`a_t = sqrt(ᾱ_t)` for one of three ᾱ curves, all reaching ᾱ_T = 0 so that z_T is the noise itself:
- cosine: ᾱ_t = cos²(π/2 · t/T)
- sqrt:   ᾱ_t = 1 - sqrt(t/T)            (Diffusion-LM, CaDiRec)
- linear: DDPM's linear β from 1e-4 to 0.02, rescaled to zero terminal SNR (the authors' code)
and `b_t` either `1 - a_t` (mix=convex: z_t slides from z_0 to the noise on a straight line) or
`sqrt(1 - a_t²)` (mix=vp: DDPM's variance-preserving weights, as the authors' code does).
The names are checked once, by `Config` (its CHOICES); the functions here take them as valid.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> predicted z_0


def alpha_bar(steps: int, kind: str) -> torch.Tensor:
    """ᾱ_t for t = 0..T, float64, ᾱ_0 = 1 and ᾱ_T = 0."""
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "cosine":
        out = torch.cos(frac * math.pi / 2) ** 2
    elif kind == "sqrt":
        out = 1 - frac.sqrt()
    else:  # linear
        betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
        root = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]).sqrt()
        first, last = root[1], root[-1]
        root[1:] = (root[1:] - last) * first / (first - last)  # zero terminal SNR (Lin et al. 2024)
        out = root ** 2
    out[0], out[-1] = 1.0, 0.0
    return out


def coefficients(steps: int, kind: str, mix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0_weight, noise_weight), the a_t and b_t of Eq. 9, for t = 0..T, float64."""
    z0_weight = alpha_bar(steps, kind).clamp(min=0).sqrt()
    if mix == "convex":
        return z0_weight, 1 - z0_weight
    return z0_weight, (1 - z0_weight ** 2).clamp(min=0).sqrt()  # vp


def q_sample(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, z0_weight: torch.Tensor,
             noise_weight: torch.Tensor) -> torch.Tensor:
    """Eq. 9: z_t = a_t z_0 + b_t noise, one t per sequence (z0, noise: (B, L, d); t: (B,))."""
    return z0_weight[t].view(-1, 1, 1) * z0 + noise_weight[t].view(-1, 1, 1) * noise


def restore_times(steps: int, restore_steps: int) -> list[int]:
    """The timesteps visited when restoring from z_T: T, ..., T/n (evenly spaced, descending)."""
    return [round(steps * (restore_steps - i) / restore_steps) for i in range(restore_steps)]


def restore(denoise: Denoise, z_T: torch.Tensor, z0_weight: torch.Tensor, noise_weight: torch.Tensor,
            restore_steps: int, last: Denoise | None = None) -> torch.Tensor:
    """Reverse process from z_T with an x0-predicting denoiser (deterministic, DDIM-style).

    Each step predicts ẑ_0, infers the noise that z_t implies, and re-noises to the next (lower)
    timestep; one step is simply f(z_T, T).  With a fixed noise and ᾱ_T = 0 the inferred noise is
    exact at t = T, so extra steps only let the denoiser refine its guess at lower noise levels.
    `last`, if given, replaces `denoise` at the final step (to read another output of it there).
    """
    a, b = z0_weight, noise_weight  # Eq. 9's a_t, b_t
    times = restore_times(a.shape[0] - 1, restore_steps)
    z = z_T
    for t, s in zip(times, times[1:]):
        z0_hat = denoise(z, _timestep(z, t))
        noise_hat = (z - a[t] * z0_hat) / b[t]
        z = a[s] * z0_hat + b[s] * noise_hat
    return (last or denoise)(z, _timestep(z, times[-1]))


def _timestep(z: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
