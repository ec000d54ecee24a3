"""Which samples, noise and timesteps each micro-batch gets: a pure function of (seed, micro-step).

Nothing random is drawn from global generators while training. Batch order,
flips, caption dropout, noise and timesteps all come from a generator seeded
with the run seed and the micro-step index, so a resumed run replays exactly
what an uninterrupted one would have done, on any number of data workers.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from safetensors.torch import load_file

from kstory.train.cache import CachedSample, TrainCache

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, step) pairs over the 64-bit seed space


def step_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one (seed, index, stream) triple."""
    mixed = (seed * _SEED_MIX + index * 1_000_003 + stream * 7919) % (2**63 - 1)
    return torch.Generator("cpu").manual_seed(mixed)


class BatchPlan:
    """Epochs of same-size batches: shuffle within each bucket, cut into batches, shuffle the batches."""

    def __init__(self, samples: list[CachedSample], batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, sample in enumerate(samples):
            groups[sample.size].append(index)
        self.groups = [groups[size] for size in sorted(groups)]
        self.batches_per_epoch = sum(-(-len(g) // batch_size) for g in self.groups)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = step_generator(self.seed, epoch, stream=1)
            batches = []
            for group in self.groups:
                order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
                batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            self._epoch = (epoch, [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])
        return self._epoch[1]

    def batch(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        return self.epoch(epoch)[position]


class StepDataset(torch.utils.data.Dataset):
    """Item ``i`` is the whole micro-batch for micro-step ``start + i`` (use with ``batch_size=None``)."""

    def __init__(
        self, cache: TrainCache, plan: BatchPlan, *, start: int, length: int, num_train_timesteps: int,
        random_flip: bool, caption_dropout: float, seed: int,
    ):
        self.cache, self.plan = cache, plan
        self.start, self.length = start, length
        self.num_train_timesteps = num_train_timesteps
        self.random_flip, self.caption_dropout, self.seed = random_flip, caption_dropout, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        micro_step = self.start + index
        generator = step_generator(self.seed, micro_step)
        indices = self.plan.batch(micro_step)
        n = len(indices)
        flips = (torch.rand(n, generator=generator) < 0.5).tolist()
        drops = (torch.rand(n, generator=generator) < self.caption_dropout).tolist()
        timestep_ids = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        latents, prompt_embs, pooled = [], [], []
        for i, sample_index in enumerate(indices):
            sample = self.cache.samples[sample_index]
            latent = load_file(str(sample.latent))
            latents.append(latent["latent_flipped"] if self.random_flip and flips[i] else latent["latent"])
            text = load_file(str(self.cache.empty_text if drops[i] else sample.text))
            prompt_embs.append(text["prompt_emb"])
            pooled.append(text["pooled"])
        latents_t = torch.stack(latents)
        noise = torch.randn(latents_t.shape, generator=generator)
        return {
            "latents": latents_t,
            "prompt_emb": torch.stack(prompt_embs),
            "pooled": torch.stack(pooled),
            "noise": noise,
            "timestep_ids": timestep_ids,
            "micro_step": torch.tensor(micro_step),
        }
