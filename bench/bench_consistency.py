"""Time and peak memory of a story with the character reference and/or consistent attention, as a ratio to plain.

    python bench/bench_consistency.py                                  # tiny Kolors, 128 px, 4 steps, 8 frames
    python bench/bench_consistency.py --unet full --size 256 --steps 2  # full-width Kolors UNet, random, reduced size
    python bench/bench_consistency.py --unet full --size 1024 --steps 25   # on a GPU

Every configuration denoises the same eight frames (prompts, seeds, batch size 4)
through kstory's ``Session`` and decodes them with the VAE; only what ties the
frames together differs:

* ``plain``: neither, today's story.
* ``adapter``: the character reference (Kolors IP-Adapter-Plus, scale 0.5) on
  every frame: the image-encoder phase (inside the timing), the image
  keys/values beside the UNet and 16 more tokens in every cross-attention.
* ``consistent``: consistent attention with the paper's defaults (share 0.5,
  up-block self-attention, from step 1), frames 1-4 writing the bank and 5-8
  reading it (the same batches as ``plain``).
* ``both``: the two together.

Text embeddings are random tensors of ChatGLM's shape, so no text encoder is
loaded (it is not what is measured). The adapter is random too: the tiny one
on the tiny UNet; on the full-width UNet one of the real widths (image tokens
2048 wide, Resampler 2048 wide) read from the tiny CLIP image encoder (32
wide), so the real ViT-L/14's encoding time is not in the numbers. Each
configuration runs in its own process, so the CPU's peak RSS is its own; on a
GPU peak VRAM is measured too. The weights are random: the numbers are about
time and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kstory  # noqa: E402,F401  (before anything that imports torchvision/diffsynth)
import torch  # noqa: E402

CONFIGURATIONS = ("plain", "adapter", "consistent", "both")
FULL_RESAMPLER_WIDTH = 2048  # the published Kolors-IP-Adapter-Plus Resampler's width


def _spec(unet: str):
    from kstory.core.models.tiny import TinyKolorsSpec

    if unet == "full":
        return TinyKolorsSpec(unet_channels=(320, 640, 1280), unet_head_dim=64, unet_transformer_depth=(2, 10),
                              cross_attention_dim=2048, addition_time_embed_dim=256, text_hidden_size=4096,
                              vae_channels=(128, 256, 512, 512))
    return TinyKolorsSpec()


def _adapter(unet: str, spec, model: torch.nn.Module, folder: Path):
    """A random IP-Adapter-Plus for ``model``: the tiny one (cached), or one written to ``folder`` for the full UNet."""
    from safetensors.torch import save_file

    from kstory.story.ip_adapter import ENCODER_DIR, identify_ip_adapter
    from kstory.story.tiny_ip_adapter import (ADAPTER_FILE, build_tiny_ip_adapter, tiny_adapter_state,
                                              write_tiny_image_encoder)

    if unet == "tiny":
        return identify_ip_adapter(build_tiny_ip_adapter())
    state = tiny_adapter_state(spec, resampler_width=FULL_RESAMPLER_WIDTH, unet=model)
    save_file(state, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    write_tiny_image_encoder(folder / ENCODER_DIR)
    return identify_ip_adapter(folder)


def _session(unet: str, device: str, dtype: torch.dtype, frames: int, adapter_dir: Path | None):
    """A Session on random networks with random text embeddings of ChatGLM's shape, one per frame and prompt;
    with ``adapter_dir``, a random IP-Adapter-Plus too."""
    from diffsynth.models.model_manager import ModelManager
    from diffsynth.pipelines.sdxl_image import SDXLImagePipeline
    from diffsynth.schedulers import EnhancedDDIMScheduler

    from kstory.core.models import resolve_model
    from kstory.core.models.tiny import tiny_unet, tiny_vae_decoder
    from kstory.story.generate import Session

    spec = _spec(unet)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's dtype: a float32 copy would set the peak, not the story
    try:
        with torch.device(device):
            models = {"sdxl_unet": tiny_unet(spec)[0].eval(), "sdxl_vae_decoder": tiny_vae_decoder(spec)[0].eval()}
    finally:
        torch.set_default_dtype(default)
    adapter = _adapter(unet, spec, models["sdxl_unet"], adapter_dir) if adapter_dir is not None else None
    manager = ModelManager(torch_dtype=dtype, device=device)
    for name, model in models.items():
        manager.model.append(model)
        manager.model_path.append(f"random:{name}")
        manager.model_name.append(name)
    pipe = SDXLImagePipeline.from_model_manager(manager)
    pipe.scheduler = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)
    session = Session(resolve_model("tiny"), lora=None, lora_scale=None, controlnets={}, device=device,
                      torch_dtype=dtype, ip_adapter=adapter)
    session._pipe = pipe  # the random networks above instead of loading weights
    generator = torch.Generator().manual_seed(1)
    for index in range(1, frames + 1):
        for prompt, positive in ((f"frame {index}", True), ("blurry", False)):
            session._embeddings[(prompt, positive)] = {
                "encoder_hidden_states": torch.randn(1, 256, spec.text_hidden_size, generator=generator).to(device, dtype),
                "add_text_embeds": torch.randn(1, spec.text_hidden_size, generator=generator).to(device, dtype),
            }
    return session


def _plans(args, reference: bool):
    """The eight frames; with ``reference``, each uses one drawn reference picture at scale 0.5."""
    from PIL import Image

    from kstory.story.generate import FramePlan
    from kstory.story.references import ReferencePlan

    picture = Image.new("RGB", (args.size, args.size), (220, 110, 40))
    return [FramePlan(index=i, prompt=f"frame {i}", frame_prompt=f"frame {i}", negative_prompt="blurry", seed=1000 + i,
                      width=args.size, height=args.size, steps=args.steps, cfg_scale=5.0,
                      reference=ReferencePlan(0.5, 0.0, 1.0, image=picture, sha256="bench") if reference else None)
            for i in range(1, args.frames + 1)]


def run_plain(session, plans, batch_size: int):
    """Batches of ``batch_size`` in frame order (with the adapter: its image-encoder phase first)."""
    from kstory.story.generate import batches

    session.references.encode(plans)
    return [image for _, images, _ in session.generate(batches(plans, batch_size)) for image in images], None


def run_consistent(session, plans, batch_size: int):
    """Consistent attention with the paper's defaults: the first half writes the bank, the rest reads it."""
    from kstory.story.consistent_attention import AttentionBank, SharingSettings, split_by_role
    from kstory.story.generate import batches

    half = len(plans) // 2
    settings = SharingSettings(0.5, ("up",), 1, None, tuple(range(1, half + 1)), tuple(range(half + 1, len(plans) + 1)))
    bank = AttentionBank(settings)
    groups = [batch for part in split_by_role(plans, settings) for batch in batches(part, batch_size)]
    session.references.encode(plans)
    images = [image for _, images, _ in session.generate(groups, bank) for image in images]
    return images, bank.nbytes()


def measure(args) -> dict:
    """One configuration in this process: seconds per frame, peak VRAM (GPU) and peak RSS."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32 if args.unet == "tiny" else torch.bfloat16)
    reference = args.config in ("adapter", "both")
    with tempfile.TemporaryDirectory(prefix="kstory-bench-adapter-") as folder:
        session = _session(args.unet, device, dtype, args.frames, Path(folder) if reference else None)
        plans = _plans(args, reference)
        run = run_consistent if args.config in ("consistent", "both") else run_plain
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _, bank_bytes = run(session, plans, args.batch_size)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"config": args.config, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "s_per_frame": seconds / args.frames, "peak_vram": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "bank_bytes": bank_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--config", choices=CONFIGURATIONS, help="run one configuration here (used by the parent)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.config:
        print(json.dumps(measure(args)))
        return
    if args.unet == "tiny":  # built once here, so no configuration's timing includes writing it
        from kstory.story.tiny_ip_adapter import build_tiny_ip_adapter

        build_tiny_ip_adapter()
    rows = {}
    for config in CONFIGURATIONS:
        command = [sys.executable, __file__, "--config", config, *sys.argv[1:]]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[config] = json.loads(out.strip().splitlines()[-1])
    plain = rows["plain"]
    peak = "peak_vram" if plain["peak_vram"] is not None else "peak_rss"
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n is not None else "n/a"  # noqa: E731
    print(f"{args.unet} Kolors UNet (random), {args.frames} frames at {args.size}x{args.size}, {args.steps} steps, "
          f"CFG 5, batch size {args.batch_size}, {plain['device']} {plain['dtype']}")
    print(f"{'configuration':<14}{'s/frame':>9}{'x plain':>9}{'peak VRAM':>12}{'peak RSS':>12}{'x plain':>9}"
          f"{'bank':>12}")
    for config, row in rows.items():
        bank = f"{row['bank_bytes'] / 2**20:.1f} MiB" if row["bank_bytes"] is not None else "-"
        print(f"{config:<14}{row['s_per_frame']:>9.2f}{row['s_per_frame'] / plain['s_per_frame']:>9.2f}"
              f"{gib(row['peak_vram']):>12}{gib(row['peak_rss']):>12}{row[peak] / plain[peak]:>9.2f}{bank:>12}")
    print(f"memory x plain compares the peak {'VRAM' if peak == 'peak_vram' else 'RSS'}; plain: neither; adapter: "
          "the reference on every frame (scale 0.5); consistent: the first half writes the bank, the rest read it; "
          "both: the two")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
