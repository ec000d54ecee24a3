"""The Lightning module: noise-prediction MSE on DiffSynth's Kolors UNet with peft LoRA.

Same objective as DiffSynth's ``LightningModelForT2ILoRA.training_step`` for
Kolors (scheduler set to its 1100 training timesteps, epsilon target, unit
weight), but on cached latents and prompt embeddings, with one timestep per
sample instead of one per batch, and with every random draw supplied by the
batch (see train.batches) so resumes are exact.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as pl
import torch

from kstory.core.train_settings import TrainSettings


class NonFiniteLoss(RuntimeError):
    """The loss (or a LoRA weight) became NaN or infinite."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss is {value} at step {step}")
        self.step, self.value = step, value


class LRLambda:
    """Warm-up then constant / cosine / linear decay; a class (not a closure) so its state is plain data."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings,
                   learning_rate: float | None = None) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked (the caller checked it is installed).

    ``learning_rate``: the rate to use when it is not ``settings.learning_rate`` (``scale_lr``).
    """
    lr = settings.learning_rate if learning_rate is None else learning_rate
    if settings.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)


class KolorsLoraModule(pl.LightningModule):
    """Trains only the LoRA factors inside ``unet``; everything else is frozen."""

    def __init__(
        self, unet: torch.nn.Module, settings: TrainSettings, *, alphas_cumprod: torch.Tensor,
        timesteps: torch.Tensor, prediction_type: str, total_steps: int, start_step: int = 0,
        learning_rate: float | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.settings = settings
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.register_buffer("train_timesteps", timesteps.to(torch.float32), persistent=False)
        self.prediction_type = prediction_type
        self.total_steps, self.start_step = total_steps, start_step
        self.lr_scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.step_losses: list[float] = []  # micro-batch losses of the optimizer step in progress
        self.learning_rate = settings.learning_rate if learning_rate is None else learning_rate
        self.step_lr = self.learning_rate
        self.restore: Any = None  # a train.checkpoint.Checkpoint to load on train start
        self.gradient_checkpointing = settings.gradient_checkpointing  # a memory profile may turn it on

    @property
    def step(self) -> int:
        """Optimizer steps completed in the whole run (across resumes)."""
        return self.start_step + self.trainer.global_step

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """In name order: the optimizer state is saved by this index."""
        return sorted((n, p) for n, p in self.unet.named_parameters() if p.requires_grad)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Noise the latents at the batch's timesteps and regress the scheduler's training target."""
        latents = batch["latents"].to(self.device, torch.float32)
        noise = batch["noise"].to(self.device, torch.float32)
        ids = batch["timestep_ids"].to(self.device)
        timesteps = self.train_timesteps[ids]
        alpha = self.alphas_cumprod[timesteps.long()].to(torch.float32).view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        if self.prediction_type == "epsilon":
            target = noise
        else:  # v-prediction, as EnhancedDDIMScheduler.training_target
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        height, width = latents.shape[2] * 8, latents.shape[3] * 8
        add_time_id = torch.tensor([height, width, 0, 0, height, width], device=self.device).repeat(latents.shape[0])
        prediction = self.unet(
            noisy, timestep=timesteps, encoder_hidden_states=batch["prompt_emb"].to(self.device),
            add_text_embeds=batch["pooled"].to(self.device), add_time_id=add_time_id,
            use_gradient_checkpointing=self.gradient_checkpointing,
        )
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if not self.step_losses:
            self.step_lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        loss = self.compute_loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(self.step + 1, value)
        self.step_losses.append(value)
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["latents"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = make_optimizer([p for _, p in self.trainable_parameters()], self.settings, self.learning_rate)
        schedule = LRLambda(self.settings.lr_scheduler, self.settings.warmup_steps, self.total_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return optimizer

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step the LR schedule right after the optimizer, so a checkpoint taken at batch end sees both."""
        optimizer.step(closure=optimizer_closure)
        self.lr_scheduler.step()

    def on_train_start(self) -> None:
        self.unet.train()
        if self.restore is not None:
            self.restore.apply_training_state(self.trainer, self)
            self.restore = None
