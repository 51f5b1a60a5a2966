"""Beta schedules and timestep respacing, computed once in float64 numpy on the host.

`schedule_arrays` reproduces guided-diffusion / glide-text2im's `SpacedDiffusion` tables bit for
bit (same float64 operations in the same order); `make_schedule` rounds them to a float32
`Schedule` pytree that the jnp math in `gaussian.py` indexes with respaced timesteps.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_ALIASES = {"cosine": "squaredcos_cap_v2"}

# Float arrays of `schedule_arrays` that live on the device `Schedule` (length N each).
_TABLES = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """β_t for t = 0..num_steps−1, float64 [num_steps].

    "linear": Ho et al.'s 1e-4 → 0.02 rescaled by 1000/num_steps; "squaredcos_cap_v2" (alias
    "cosine"): Nichol & Dhariwal's ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), β capped at 0.999.
    """
    name = SCHEDULE_ALIASES.get(name, name)
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
             for i in range(num_steps)],
            dtype=np.float64,
        )
    raise ValueError(
        f"unknown noise schedule {name!r}; expected 'linear', 'squaredcos_cap_v2' or 'cosine'"
    )


def _section_steps(num_steps: int, counts: list[int]) -> list[int]:
    """Split [0, num_steps) into len(counts) near-equal sections; counts[i] strided steps each."""
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float index and round half-to-even exactly like the reference, so the
        # kept steps (and hence the model's timesteps) match it.
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return steps


def space_timesteps(num_steps: int, respacing: str) -> list[int]:
    """Kept original timesteps, ascending.

    respacing: "" (all steps), "N" or "N1,N2,..." (N_i evenly strided steps from each of
    len(list) equal sections), "ddimN" (integer stride giving exactly N steps from 0) or
    "fast27" (GLIDE's upsampler list: "10,10,3,2,2" with T−1 replaced by T−3).
    """
    respacing = respacing.strip()
    if not respacing:
        return list(range(num_steps))
    if respacing.startswith("ddim"):
        try:
            want = int(respacing[len("ddim"):])
        except ValueError:
            raise ValueError(f"bad respacing {respacing!r}: expected 'ddimN'") from None
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == want:
                return list(range(0, num_steps, stride))
        raise ValueError(f"cannot take exactly {want} of {num_steps} steps with an integer stride")
    if respacing == "fast27":
        steps = set(space_timesteps(num_steps, "10,10,3,2,2"))
        # GLIDE: drop the noisiest step to reduce DDIM artifacts.
        steps.discard(num_steps - 1)
        steps.add(num_steps - 3)
        return sorted(steps)
    try:
        counts = [int(c) for c in respacing.split(",")]
    except ValueError:
        raise ValueError(
            f"bad respacing {respacing!r}: expected '', 'N', 'N1,N2,...', 'ddimN' or 'fast27'"
        ) from None
    steps = sorted(set(_section_steps(num_steps, counts)))
    if not steps:
        raise ValueError(f"respacing {respacing!r} keeps no timesteps")
    return steps


def schedule_arrays(noise_schedule: str, steps: int = 1000,
                    respacing: str = "") -> dict[str, np.ndarray]:
    """Float64 diffusion tables of the respaced process (names as the parity `sched.*` arrays).

    β'_i = 1 − ᾱ[map_i]/ᾱ[map_{i−1}] (ᾱ[map_{−1}] = 1), then every table of guided-diffusion's
    GaussianDiffusion from β'. Also `base_betas` [steps], `log_betas`, `timestep_map` (int64 [N])
    and `num_timesteps` (int64 scalar N).
    """
    base_betas = get_named_beta_schedule(noise_schedule, steps)
    base_alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
    timestep_map = space_timesteps(steps, respacing)
    betas, last = [], 1.0
    for i in timestep_map:
        betas.append(1 - base_alphas_cumprod[i] / last)
        last = base_alphas_cumprod[i]
    betas = np.array(betas, dtype=np.float64)

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # β̃_0 = 0, so the log is clipped by repeating β̃_1 (a single step keeps log β̃_0 = −inf).
    clipped = posterior_variance
    if len(betas) > 1:
        clipped = np.append(posterior_variance[1], posterior_variance[1:])
    with np.errstate(divide="ignore"):
        posterior_log_variance_clipped = np.log(clipped)
    return {
        "base_betas": base_betas,
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "alphas_cumprod_next": alphas_cumprod_next,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        "timestep_map": np.array(timestep_map, dtype=np.int64),
        "num_timesteps": np.array(len(timestep_map), dtype=np.int64),
    }


class Schedule(NamedTuple):
    """Respaced diffusion tables as a pytree: float32 [N] arrays indexed by respaced t, plus
    `timestep_map` int32 [N] (respaced index -> original timestep the model is called with).

    N = `num_timesteps` is static (read from the array shapes), so a Schedule can be a jit
    argument without retracing per value.
    """

    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timestep_map: jax.Array

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(noise_schedule: str, steps: int = 1000, respacing: str = "") -> Schedule:
    """`schedule_arrays` rounded once from float64 to float32 (timestep_map to int32)."""
    arrays = schedule_arrays(noise_schedule, steps, respacing)
    tables = {k: jnp.asarray(arrays[k].astype(np.float32)) for k in _TABLES}
    return Schedule(**tables, timestep_map=jnp.asarray(arrays["timestep_map"].astype(np.int32)))
