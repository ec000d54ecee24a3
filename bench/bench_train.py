"""Seconds per step and peak memory: kstory's LoRA trainer vs DiffSynth's own ``LightningModelForT2ILoRA`` set-up.

    python bench/bench_train.py                 # GPU: full-size random Kolors, 1024 px, rank 16, batch 1
    python bench/bench_train.py --steps 6       # no GPU: the tiny Kolors at 256 px (said in the output)

Each side runs in its own subprocess so its peak memory is its own (VRAM on a
GPU, peak RSS on a CPU). Both sides use the same UNet, LoRA (rank 16 on
to_q,to_k,to_v,to_out), precision, gradient checkpointing and Lightning.
What differs is the set-up: DiffSynth keeps ChatGLM and the VAE on the device
and encodes the caption and image on every step (as its Kolors example does);
kstory reads latents and prompt embeddings from its on-disk cache (the
one-time caching pass is not timed) and the encoders are not in memory.
Weights are random: the numbers are about speed and memory, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kstory  # noqa: E402,F401  (before anything that imports torchvision/diffsynth)

PROMPT = "a watercolor fox in a snowy forest, soft light"
TARGETS = "to_q,to_k,to_v,to_out"


# --- models ---------------------------------------------------------------------------


def _full_models(device: str, dtype):
    """Full-size Kolors networks with random weights, built from DiffSynth's classes on the device."""
    import torch
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

    from kstory.core.models.tiny import TinyKolorsSpec, text_encoder_config

    real = TinyKolorsSpec(
        unet_channels=(320, 640, 1280), unet_head_dim=64, unet_transformer_depth=(2, 10), cross_attention_dim=2048,
        addition_time_embed_dim=256, text_hidden_size=4096, text_layers=28, text_heads=32, text_kv_channels=128,
        text_kv_groups=2, text_ffn_hidden_size=13696, vae_channels=(128, 256, 512, 512),
    )
    with torch.device(device):
        unet = SDXLUNet(is_kolors=True).to(dtype)
        vae_encoder, vae_decoder = SDXLVAEEncoder(), SDXLVAEDecoder()  # DiffSynth runs the VAE in float32

    def text_encoder():
        config = ChatGLMConfig(**{k: v for k, v in text_encoder_config(real).items() if k != "architectures"})
        model = ChatGLMModel(config, device=device, empty_init=True).to(dtype)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02)  # skip_init leaves garbage memory; small normals keep activations finite
        return model

    return unet, text_encoder, vae_encoder, vae_decoder, real.text_hidden_size


def _tiny_models(cache_dir: Path | None):
    from kstory.core.models import kolors_models, load_kolors_model_manager, resolve_model
    from kstory.core.models.tiny import TinyKolorsSpec

    nets = kolors_models(load_kolors_model_manager(resolve_model("tiny", cache_dir)))
    return nets.unet, (lambda: nets.text_encoder), nets.vae_encoder, nets.vae_decoder, TinyKolorsSpec().text_hidden_size


# --- timing -----------------------------------------------------------------------------


def _timer():
    import lightning as pl
    import torch

    class StepTimer(pl.Callback):
        def __init__(self):
            self.times: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    return StepTimer()


def _trainer(args, timer):
    import lightning as pl

    return pl.Trainer(
        accelerator="auto", devices=1, precision=args.precision, max_steps=args.steps, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[timer],
    )


# --- the two sides ---------------------------------------------------------------------


def run_kstory(args) -> dict:
    import torch
    from safetensors.torch import save_file

    from kstory.train.batches import BatchPlan, StepDataset
    from kstory.train.cache import CachedSample, TrainCache
    from kstory.train.lora_io import inject_lora
    from kstory.train.module import KolorsLoraModule
    from kstory.core.train_settings import TrainSettings
    from kstory.train.validation import kolors_scheduler

    unet, _, _, _, hidden = _models(args)  # the text encoder and VAE are never built: the cache replaces them
    settings = TrainSettings(
        rank=args.rank, resolution=args.resolution, batch_size=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing, max_steps=args.steps,
    )
    inject_lora(unet, settings.rank, settings.lora_alpha, settings.target_modules, settings.seed)
    latent_side = args.resolution // 8
    with tempfile.TemporaryDirectory() as folder:
        root, samples = Path(folder), []
        generator = torch.Generator().manual_seed(0)
        for i in range(4):  # what train.cache writes: one latent file and one text file per sample
            latent, text = root / f"latent{i}.safetensors", root / f"text{i}.safetensors"
            save_file({"latent": torch.randn(4, latent_side, latent_side, generator=generator)}, str(latent))
            save_file({"prompt_emb": torch.randn(256, hidden, generator=generator) * 0.1,
                       "pooled": torch.randn(hidden, generator=generator) * 0.1}, str(text))
            samples.append(CachedSample(latent, text, (args.resolution, args.resolution), latent))
        save_file({"prompt_emb": torch.zeros(256, hidden), "pooled": torch.zeros(hidden)}, str(root / "empty.safetensors"))
        cache = TrainCache(samples, root / "empty.safetensors", {}, root)
        scheduler = kolors_scheduler()
        scheduler.set_timesteps(1100)
        module = KolorsLoraModule(
            unet, settings, alphas_cumprod=torch.tensor(scheduler.alphas_cumprod, dtype=torch.float64),
            timesteps=scheduler.timesteps, prediction_type="epsilon", total_steps=args.steps,
        )
        module.train()
        dataset = StepDataset(cache, BatchPlan(samples, args.batch_size, 0), start=0, length=args.steps,
                              num_train_timesteps=1100, random_flip=False, caption_dropout=0.0, seed=0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None)
        return _fit(args, module, loader)


def run_diffsynth(args) -> dict:
    import torch
    from diffsynth.pipelines.sdxl_image import SDXLImagePipeline
    from diffsynth.prompters import KolorsPrompter
    from diffsynth.schedulers import EnhancedDDIMScheduler
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA

    unet, text_encoder, vae_encoder, vae_decoder, _ = _models(args)

    class KolorsLoRA(LightningModelForT2ILoRA):
        """DiffSynth's Kolors example set-up: whole pipeline in the module, LoRA on the UNet."""

        def __init__(self):
            super().__init__(learning_rate=1e-4, use_gradient_checkpointing=args.gradient_checkpointing)
            pipe = SDXLImagePipeline(device="cpu", torch_dtype=args.weight_dtype)
            pipe.text_encoder_kolors, pipe.unet = text_encoder(), unet
            pipe.vae_encoder, pipe.vae_decoder = vae_encoder, vae_decoder
            pipe.prompter = KolorsPrompter()
            pipe.prompter.fetch_models(pipe.text_encoder_kolors)
            pipe.scheduler = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)
            pipe.scheduler.set_timesteps(1100)
            self.pipe = pipe
            self.freeze_parameters()
            self.add_lora_to_model(pipe.denoising_model(), lora_rank=args.rank, lora_alpha=args.rank,
                                   lora_target_modules=TARGETS, init_lora_weights="gaussian")

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return args.steps * args.batch_size

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"text": PROMPT, "image": torch.rand(3, args.resolution, args.resolution, generator=generator) * 2 - 1}

    torch.manual_seed(0)
    module = KolorsLoRA()
    loader = torch.utils.data.DataLoader(Images(), batch_size=args.batch_size)
    return _fit(args, module, loader)


def _models(args):
    if args.full:
        return _full_models("cuda", args.weight_dtype)
    return _tiny_models(Path(args.cache_dir) if args.cache_dir else None)


def _fit(args, module, loader) -> dict:
    import torch

    timer = _timer()
    trainer = _trainer(args, timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - started
    timed = timer.times[args.warmup:] or timer.times
    result = {
        "steps": len(timer.times), "timed_steps": len(timed), "seconds_per_step": statistics.median(timed),
        "fit_seconds": wall, "last_loss": timer.losses[-1] if timer.losses else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if torch.cuda.is_available():
        result["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    return result


# --- driver -------------------------------------------------------------------------------


def _child(args) -> None:
    import torch

    args.weight_dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    result = run_kstory(args) if args.side == "kstory" else run_diffsynth(args)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _spawn(side: str, args) -> dict:
    command = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--resolution", str(args.resolution), "--rank", str(args.rank), "--batch-size", str(args.batch_size),
               "--precision", args.precision]
    command += ["--full"] if args.full else []
    command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    process = subprocess.run(command, capture_output=True, text=True)
    for line in process.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    sys.stderr.write(process.stdout[-4000:] + process.stderr[-4000:])
    raise SystemExit(f"{side} run failed (exit {process.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["kstory", "diffsynth"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default 12 GPU, 6 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 on a GPU, 256 without")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", default=None, help="Lightning precision (default bf16-mixed GPU, 32-true CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both sides")
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help="kstory model cache (tiny model)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per side, fastest kept (default 1 GPU, 3 CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.side:
        _child(args)
        return

    import torch

    gpu = torch.cuda.is_available()
    args.full = gpu
    args.steps = args.steps or (12 if gpu else 6)
    args.resolution = args.resolution or (1024 if gpu else 256)
    args.precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    args.repeat = args.repeat or (1 if gpu else 3)
    if gpu:
        where = f"GPU {torch.cuda.get_device_name(0)}: full-size Kolors UNet/ChatGLM/VAE with random weights"
    else:
        where = "no GPU: tiny random-weight Kolors on CPU (shows set-up overhead, not real Kolors speed or memory)"
    print(f"{where}\n{args.resolution}px, rank {args.rank}, batch {args.batch_size}, {args.precision}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.steps} steps (first {args.warmup} not timed), best of {args.repeat} run(s) per side")
    runs: dict[str, list[dict]] = {"kstory": [], "diffsynth": []}
    for _ in range(args.repeat):  # alternate sides so background load hits both alike
        for side in runs:
            runs[side].append(_spawn(side, args))
    # The fastest run is the least disturbed by other processes; memory is deterministic enough.
    results = {side: {**min(rs, key=lambda r: r["seconds_per_step"]),
                      "all_seconds_per_step": [r["seconds_per_step"] for r in rs]} for side, rs in runs.items()}
    memory_key = "peak_vram_bytes" if gpu else "peak_rss_bytes"
    memory_label = "peak VRAM (GiB)" if gpu else "peak RSS (GiB)"
    k, d = results["kstory"], results["diffsynth"]
    print(f"{'':24}{'kstory':>12}{'diffsynth':>12}{'diffsynth/kstory':>18}")
    print(f"{'seconds/step':24}{k['seconds_per_step']:>12.3f}{d['seconds_per_step']:>12.3f}"
          f"{d['seconds_per_step'] / k['seconds_per_step']:>17.2f}x")
    print(f"{memory_label:24}{k[memory_key] / 2**30:>12.2f}{d[memory_key] / 2**30:>12.2f}"
          f"{d[memory_key] / k[memory_key]:>17.2f}x")
    if args.json:
        payload = {"gpu": gpu, "resolution": args.resolution, "rank": args.rank, "batch_size": args.batch_size,
                   "precision": args.precision, "steps": args.steps, "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
