"""Samplers: diffusers' scheduler classes on Kolors' noise schedule, plus DiffSynth's DDIM for old stories.

Kolors was trained on a scaled-linear schedule from 0.00085 to 0.014 over 1100
timesteps and is sampled on the "leading" grid with offset 1 (the official
``scheduler_config.json``). Building diffusers' own classes with those settings
gives the same timesteps, sigmas, input scaling and steps as diffusers'
``KolorsPipeline``. ``ddim`` is DiffSynth's ``EnhancedDDIMScheduler`` (timesteps
1099..0), which every story made before samplers could be chosen used; a spec
without ``sampler`` keeps it, so those stories regenerate bit for bit.

:class:`Sampler` is the one interface the denoising loop needs: the timesteps
for a step count and strength, the starting latents, input scaling, one step,
and re-noising a clean latent to a timestep (img2img and inpainting).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kstory.core.errors import KstoryError

if TYPE_CHECKING:  # torch loads only when a sampler is made: the spec reads the names here cheaply
    import torch

LEGACY = "ddim"  # what a spec without `sampler` gets: the sampler of every story made before the choice existed
DEFAULT_FOR_NEW_SPECS = "euler"  # Kolors' recommended sampler; the spec templates kstory writes say so
KOLORS_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1100, "beta_start": 0.00085, "beta_end": 0.014, "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon",
}


def _diffusers_classes() -> dict[str, tuple[str, dict[str, Any]]]:
    """Sampler name -> (diffusers scheduler class name, its settings on top of Kolors' schedule)."""
    return {
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
        "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    }


SAMPLERS = (LEGACY, *_diffusers_classes())


def check_sampler(name: str) -> str:
    """``name`` if it is a known sampler, else a KstoryError listing them."""
    if name not in SAMPLERS:
        raise KstoryError(f"unknown sampler {name!r}", fix=f"use one of: {', '.join(SAMPLERS)} (see docs/story.md)")
    return name


def diffusers_scheduler(name: str) -> Any:
    """A fresh diffusers scheduler for ``name`` on Kolors' schedule (what ``KolorsPipeline`` would be given)."""
    import diffusers

    class_name, extra = _diffusers_classes()[check_sampler(name)] if name != LEGACY else (None, {})
    if class_name is None:
        raise KstoryError("ddim is DiffSynth's scheduler, not a diffusers one", fix="pick a diffusers sampler")
    return getattr(diffusers, class_name)(**KOLORS_SCHEDULE, **extra)


def sampler_record(name: str) -> dict[str, Any]:
    """The manifest's description of a sampler; for ``ddim`` exactly what older manifests hold."""
    if name == LEGACY:
        return {"name": LEGACY, "scheduler": "EnhancedDDIMScheduler", "num_train_timesteps": 1100, "beta_end": 0.014}
    class_name, extra = _diffusers_classes()[check_sampler(name)]
    return {"name": name, "scheduler": class_name, **KOLORS_SCHEDULE, **extra}


@dataclass
class Sampler:
    """One denoising run's schedule (a fresh one per batch: diffusers' schedulers keep a step index)."""

    name: str
    scheduler: Any
    timesteps: list[torch.Tensor]

    @property
    def diffusers(self) -> bool:
        return self.name != LEGACY

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """Starting latents of a generation from noise alone."""
        return noise * self.scheduler.init_noise_sigma if self.diffusers else noise

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``clean`` latents re-noised to ``timestep`` with ``noise`` (img2img start, inpainting blend)."""
        return self.scheduler.add_noise(clean, noise, timestep.reshape(1).to(clean.device))

    def scale(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The UNet's input at ``timestep`` (diffusers' ``scale_model_input``; DDIM needs none)."""
        return self.scheduler.scale_model_input(latents, timestep) if self.diffusers else latents

    def step(self, noise_pred: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor,
             generators: list[torch.Generator]) -> torch.Tensor:
        """One step; ancestral and SDE samplers draw their fresh noise from each frame's own generator."""
        if not self.diffusers:
            return self.scheduler.step(noise_pred, timestep.reshape(1), latents)
        kwargs = {"generator": generators} if _accepts(self.scheduler.step, "generator") else {}
        return self.scheduler.step(noise_pred, timestep, latents, return_dict=False, **kwargs)[0]


def _accepts(function: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(function).parameters


def make_sampler(name: str, steps: int, strength: float = 1.0, device: str | torch.device = "cpu") -> Sampler:
    """The sampler ``name`` set to ``steps`` steps, of which the last ``strength`` share is run.

    ``strength`` 1 runs every step from noise; below 1 (img2img, inpainting) diffusers' rule drops the first
    ``steps - int(steps * strength)`` steps (so a strength too small for the step count leaves none), and DDIM
    takes DiffSynth's ``denoising_strength`` (its grid shrinks to end at 0 and keeps at least one step).
    """
    if name == LEGACY:
        from diffsynth.schedulers import EnhancedDDIMScheduler

        scheduler = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)
        scheduler.set_timesteps(steps, denoising_strength=strength)
        return Sampler(name, scheduler, list(scheduler.timesteps))
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(steps, device=device)
    start = steps - min(int(steps * strength), steps)
    begin = start * scheduler.order
    if strength < 1 and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return Sampler(name, scheduler, list(scheduler.timesteps[begin:]))
