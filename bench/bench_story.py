"""Seconds per frame and peak memory of story generation: kstory's Session vs DiffSynth's own pipeline call.

    python bench/bench_story.py             # GPU: full-size random Kolors, 1024 px, 25 steps, CFG 5, 8 frames, 1 ControlNet
    python bench/bench_story.py --steps 4   # no GPU: the tiny Kolors at 128 px (said in the output)

Both sides use the same networks in one process: the Kolors pipeline, a
Kolors Pose ControlNet (the DiffSynth port, random weights) at scale 0.8 and
the same eight pose guides, prompts and seeds. kstory encodes every prompt
once, then denoises frames of one size in batches with positive and negative
prompt in one UNet call. The baseline calls ``SDXLImagePipeline.__call__``
once per frame with the ControlNet in ``pipe.controlnet`` (what a DiffSynth
script would do): it encodes both prompts for every frame and runs the UNet
twice per step. Peak VRAM is measured per side; on a CPU the peak RSS is the
whole process's. Weights are random: the numbers are about speed and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kstory  # noqa: E402,F401  (before anything that imports torchvision/diffsynth)
import torch  # noqa: E402

POSES = ("standing", "walking", "waving", "pointing", "running", "sitting", "thinking", "arms_raised")
NEGATIVE = "blurry, low quality, extra limbs"


def _full_pipeline(device: str, dtype: torch.dtype):
    """Full-size Kolors (UNet, ChatGLM-6B, VAE) and a full-size Kolors Pose ControlNet, random, built on the device."""
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    from kstory.core.models.tiny import TinyKolorsSpec, text_encoder_config, tiny_unet, tiny_vae_decoder, tiny_vae_encoder
    from kstory.story.controlnet_kolors import KolorsControlNet
    from kstory.story.tiny import tiny_kolors_controlnet_config

    real = TinyKolorsSpec(
        unet_channels=(320, 640, 1280), unet_head_dim=64, unet_transformer_depth=(2, 10), cross_attention_dim=2048,
        addition_time_embed_dim=256, text_hidden_size=4096, text_layers=28, text_heads=32, text_kv_channels=128,
        text_kv_groups=2, text_ffn_hidden_size=13696, vae_channels=(128, 256, 512, 512),
    )
    with torch.device(device):  # PyTorch's default init on the device: random and fast
        unet = tiny_unet(real)[0].to(dtype)
        vae_encoder, vae_decoder = tiny_vae_encoder(real)[0], tiny_vae_decoder(real)[0]
        controlnet = KolorsControlNet(tiny_kolors_controlnet_config(real, conditioning=(16, 32, 96, 256))).to(dtype)
    config = ChatGLMConfig(**{k: v for k, v in text_encoder_config(real).items() if k != "architectures"})
    text_encoder = ChatGLMModel(config, device=device, empty_init=True).to(dtype)
    with torch.no_grad():
        for param in text_encoder.parameters():
            param.normal_(0.0, 0.02)  # skip_init leaves raw memory; small normals keep activations finite
    return _pipeline({"kolors_text_encoder": text_encoder, "sdxl_unet": unet, "sdxl_vae_encoder": vae_encoder,
                      "sdxl_vae_decoder": vae_decoder}, device, dtype), controlnet.eval()


def _pipeline(models: dict, device: str, dtype: torch.dtype):
    from diffsynth.models.model_manager import ModelManager
    from diffsynth.pipelines.sdxl_image import SDXLImagePipeline

    manager = ModelManager(torch_dtype=dtype, device=device)
    for name, model in models.items():
        manager.model.append(model.eval())
        manager.model_path.append(f"random:{name}")
        manager.model_name.append(name)
    return SDXLImagePipeline.from_model_manager(manager)


def _tiny_pipeline(device: str, dtype: torch.dtype):
    from kstory.core.models import load_kolors_pipeline, resolve_model
    from kstory.story.controlnet_kolors import load_kolors_controlnet
    from kstory.story.tiny import build_tiny_controlnets

    pipe = load_kolors_pipeline(resolve_model("tiny"), device=device, torch_dtype=dtype)
    return pipe, load_kolors_controlnet(build_tiny_controlnets()["pose"], device, dtype)


def _plans(args):
    from kstory.story.generate import FramePlan, GuidePlan
    from kstory.story.guides.pose import render_library_pose

    plans = []
    for index in range(1, args.frames + 1):
        pose = POSES[(index - 1) % len(POSES)]
        guide = GuidePlan(kind="pose", task="pose", controlnet="pose", scale=0.8, start=0.0, end=1.0,
                          image=render_library_pose(pose, args.size, args.size), file=f"guides/{index:02d}-pose.png")
        plans.append(FramePlan(index=index, prompt=f"kstory style, a fox in a blue scarf, {pose} in the village",
                               frame_prompt=pose, negative_prompt=NEGATIVE, seed=1000 + index, width=args.size,
                               height=args.size, steps=args.steps, cfg_scale=5.0, guides=[guide]))
    return plans


def _measure(cuda: bool, run) -> tuple[float, int | None, list]:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else None, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25 if cuda else 4)
    parser.add_argument("--size", type=int, default=1024 if cuda else 128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from diffsynth.controlnets import Annotator, ControlNetUnit, MultiControlNetManager

    from kstory.story.controlnets import ControlNetWeights
    from kstory.story.generate import Session, batches

    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    built = time.perf_counter()
    pipe, controlnet = _full_pipeline(device, dtype) if cuda else _tiny_pipeline(device, dtype)
    print(f"models ready in {time.perf_counter() - built:.1f} s")
    model = "full-size random-weight Kolors" if cuda else "tiny Kolors (no GPU: numbers are not comparable to a GPU run)"
    plans = _plans(args)

    weights = ControlNetWeights("pose", Path("random"), "kolors", "random")
    session = Session(pipe, {"pose": (weights, controlnet)})

    def kstory_side():
        session.encode(plans, release="never")
        return [image for _, images, _ in session.generate(batches(plans, args.batch_size)) for image in images]

    def diffsynth_side():
        pipe.controlnet = MultiControlNetManager([ControlNetUnit(Annotator("none", device=device), controlnet, 0.8)])
        return [
            pipe(prompt=p.prompt, negative_prompt=p.negative_prompt, cfg_scale=p.cfg_scale, height=p.height,
                 width=p.width, num_inference_steps=p.steps, seed=p.seed, controlnet_image=p.guides[0].image,
                 progress_bar_cmd=lambda x: x)
            for p in plans
        ]

    ours_s, ours_peak, ours = _measure(cuda, kstory_side)
    base_s, base_peak, theirs = _measure(cuda, diffsynth_side)
    import numpy as np

    diff = max(float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean()) for a, b in zip(ours, theirs))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n is not None else "n/a"  # noqa: E731
    print(f"\n{model}, {args.frames} frames at {args.size}x{args.size}, {args.steps} steps, CFG 5, "
          f"1 Kolors ControlNet, {device} {str(dtype).removeprefix('torch.')}, batch size {args.batch_size}")
    print(f"{'side':<34}{'s/frame':>10}{'peak VRAM':>14}")
    print(f"{'kstory Session (batched)':<34}{ours_s / args.frames:>10.2f}{gib(ours_peak):>14}")
    print(f"{'DiffSynth pipe() per frame':<34}{base_s / args.frames:>10.2f}{gib(base_peak):>14}")
    print(f"speed-up {base_s / ours_s:.2f}x; peak RSS of the process {gib(rss)}; "
          f"largest mean |pixel difference| between the sides {diff:.2f} / 255")
    if args.json:
        args.json.write_text(json.dumps({
            "model": model, "device": device, "frames": args.frames, "size": args.size, "steps": args.steps,
            "batch_size": args.batch_size, "kstory_s_per_frame": ours_s / args.frames,
            "diffsynth_s_per_frame": base_s / args.frames, "kstory_peak_vram": ours_peak,
            "diffsynth_peak_vram": base_peak, "peak_rss": rss, "mean_pixel_difference": diff,
        }, indent=2))


if __name__ == "__main__":
    main()
