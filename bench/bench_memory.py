"""Peak RSS and wall time: kstory's train and story vs DiffSynth's own Kolors LoRA trainer and pipeline.

    python bench/bench_memory.py                                  # the tiny Kolors (fast; proves the script)
    python bench/bench_memory.py --model /models/Kolors --resolution 512 --steps 2   # a full-size folder

Four subprocesses, one per side, so each peak RSS is its own (the child's
``VmHWM``), and the wall time covers everything the side does after the
imports, model loading included (that is where the peak is):

* train, kstory: ``train_lora`` from a cold cache (ChatGLM and the VAE encode,
  are freed, then the UNet loads and trains), ``mixed_precision: bf16``,
  ``--memory`` (default auto), rank 16, batch 1, gradient checkpointing.
* train, DiffSynth: ``LightningModelForT2ILoRA`` set up as DiffSynth's
  ``examples/train/kolors/train_kolors_lora.py`` does (one ``ModelManager``
  with ChatGLM, UNet and VAE in bf16, the whole pipeline in the module,
  caption and image encoded every step, ``TextImageDataset``), on the same
  images, rank, steps and precision. Its example hard-codes
  ``accelerator="gpu"``; here only the accelerator is switched to the CPU.
* story, kstory: ``generate_story`` of 2 frames (one batch), no ControlNet.
* story, DiffSynth: ``SDXLImagePipeline`` from one ``ModelManager``, ``pipe()``
  once per frame on the same prompts, seeds, size, steps and dtype as kstory's
  manifest records.

Before each side the page cache is dropped when the bench may (root on Linux),
so every side reads the weights from disk as a first run does; otherwise a
later side could read from memory what an earlier one left there (the header
line says which).

DiffSynth's ``ModelManager`` builds full-size networks, so with the tiny model
its sides load through kstory's loader (same ``ModelManager``, tiny widths).
Weights are whatever the folder holds; the numbers are about memory and time.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["a watercolor fox in a snowy forest, soft light", "a watercolor fox by a river at dawn"]
NEGATIVE = "blurry, low quality"


def _dataset(folder: Path, resolution: int, count: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["file_name,text"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(train / f"{i}.png")
        rows.append(f'{i}.png,"{PROMPTS[i % 2]}"')
    (train / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def _weights(args):
    from kstory.core.models import resolve_model

    return resolve_model(args.model, Path(args.cache_dir) if args.cache_dir else None)


def _manager(args, dtype):
    """One ModelManager with ChatGLM, UNet and VAE, as DiffSynth's examples load it (kstory's loader for tiny)."""
    import torch  # noqa: F401
    from diffsynth.models.model_manager import ModelManager

    from kstory.core.models import load_kolors_model_manager

    weights = _weights(args)
    if weights.is_tiny:
        return load_kolors_model_manager(weights, device="cpu", torch_dtype=dtype)
    manager = ModelManager(torch_dtype=dtype, device="cpu")
    manager.load_models([str(weights.text_encoder), str(weights.unet), str(weights.vae)])
    return manager


def train_kstory(args, work: Path) -> dict:
    from kstory.train import TrainSettings, train_lora

    settings = TrainSettings(rank=16, max_steps=args.steps, resolution=args.resolution, batch_size=1,
                             mixed_precision="bf16", gradient_checkpointing=True, checkpoint_every=0, center_crop=True,
                             unet_quant=args.unet_quant)
    result = train_lora(work / "data", work / "kstory-lora", settings, model=args.model,
                        cache_dir=Path(args.cache_dir) if args.cache_dir else work / "cache", memory=args.memory)
    return {"final_loss": result.final_loss, "memory": (result.memory or {}).get("profile")}


def train_diffsynth(args, work: Path) -> dict:
    import lightning as pl
    import torch
    from diffsynth.data.simple_text_image import TextImageDataset
    from diffsynth.pipelines.sdxl_image import SDXLImagePipeline
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA

    class LightningModel(LightningModelForT2ILoRA):
        """train_kolors_lora.py's module: the whole pipeline in one ModelManager, LoRA on the UNet."""

        def __init__(self):
            super().__init__(learning_rate=1e-4, use_gradient_checkpointing=True)
            self.pipe = SDXLImagePipeline.from_model_manager(_manager(args, torch.bfloat16))
            self.pipe.scheduler.set_timesteps(1100)
            self.freeze_parameters()
            self.add_lora_to_model(self.pipe.denoising_model(), lora_rank=16, lora_alpha=16,
                                   lora_target_modules="to_q,to_k,to_v,to_out", init_lora_weights="gaussian")

    torch.manual_seed(0)
    module = LightningModel()
    dataset = TextImageDataset(str(work / "data"), steps_per_epoch=args.steps, height=args.resolution,
                               width=args.resolution, center_crop=True)
    loader = torch.utils.data.DataLoader(dataset, shuffle=True, batch_size=1, num_workers=0)
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Losses()])  # the example's accelerator="gpu", switched to the CPU
    trainer.fit(module, loader)
    return {"final_loss": losses[-1] if losses else None}


def story_kstory(args, work: Path) -> dict:
    import yaml

    import kstory.story as story

    spec = {"title": "bench", "frame_count": 2, "character": {"negative_prompt": NEGATIVE},
            "defaults": {"width": args.resolution, "height": args.resolution, "steps": args.steps, "cfg_scale": 5.0},
            "generation": {"batch_size": 2},
            "frames": [{"prompt": p, "seed": 100 + i} for i, p in enumerate(PROMPTS)]}
    path = work / "story.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    story.generate_story(path, work / "kstory-story", model=args.model, memory=args.memory,
                         cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    manifest = json.loads((work / "kstory-story" / "manifest.json").read_text())
    return {"dtype": manifest["dtype"], "memory": manifest["memory"]["profile"]}


def story_diffsynth(args, work: Path) -> dict:
    import torch
    from diffsynth.pipelines.sdxl_image import SDXLImagePipeline

    pipe = SDXLImagePipeline.from_model_manager(_manager(args, getattr(torch, args.dtype)))
    for i, prompt in enumerate(PROMPTS):
        pipe(prompt=prompt, negative_prompt=NEGATIVE, cfg_scale=5.0, height=args.resolution, width=args.resolution,
             num_inference_steps=args.steps, seed=100 + i, progress_bar_cmd=lambda x: x)
    return {"dtype": args.dtype}


SIDES = {"train-kstory": train_kstory, "train-diffsynth": train_diffsynth,
         "story-kstory": story_kstory, "story-diffsynth": story_diffsynth}


def _child(args) -> None:
    import kstory  # noqa: F401  (before anything that imports torchvision/diffsynth)
    import diffsynth.pipelines.sdxl_image  # noqa: F401  (imports are not timed: both sides pay the same)
    import lightning  # noqa: F401
    import kstory.story.run  # noqa: F401
    import kstory.train.trainer  # noqa: F401

    started = time.perf_counter()
    result = SIDES[args.side](args, Path(args.work))
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_bytes"] = _peak_rss_bytes()
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _peak_rss_bytes() -> int:
    """This process's own high-water RSS: Linux's VmHWM (``ru_maxrss`` would keep the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: the best there is


def _drop_page_cache() -> bool:
    """Start each side from a cold page cache, so neither reads the files the other just read from memory
    (possible as root on Linux; otherwise the sides run as the cache happens to be, and the table says so)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n", encoding="ascii")
    except OSError:
        return False
    return True


def _spawn(side: str, args, work: Path, **extra: str) -> dict:
    command = [sys.executable, __file__, "--side", side, "--work", str(work), "--model", args.model,
               "--resolution", str(args.resolution), "--steps", str(args.steps), "--memory", args.memory,
               "--unet-quant", args.unet_quant]
    command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    for key, value in extra.items():
        command += [f"--{key}", value]
    cold = _drop_page_cache()
    process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in process.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return {**json.loads(line.removeprefix("BENCH_RESULT ")), "cold_page_cache": cold}
    tail = "\n".join((process.stdout + process.stderr).splitlines()[-15:])
    return {"failed": f"exit {process.returncode}", "tail": tail}


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / (1 << 30):.2f} GiB"


def _row(task: str, ours: dict, theirs: dict) -> list[str]:
    lines = []
    for label, key, fmt in (("peak RSS", "peak_rss_bytes", _gib), ("wall time", "seconds", lambda v: f"{v:.1f} s")):
        a, b = ours.get(key), theirs.get(key)
        ratio = f"{a / b:.2f}x" if a and b else "-"
        lines.append(f"| {task} | {label} | {fmt(a) if a else ours.get('failed', '-')} | "
                     f"{fmt(b) if b else theirs.get('failed', '-')} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default) or a full-size Kolors folder")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 tiny, 512 full)")
    parser.add_argument("--steps", type=int, default=2, help="training steps and sampling steps (default 2)")
    parser.add_argument("--memory", default="auto", help="kstory's memory profile (default auto)")
    parser.add_argument("--cache-dir", help="model cache (default: $KSTORY_CACHE or ~/.cache/kstory)")
    parser.add_argument("--only", choices=["train", "story"], help="run one comparison only")
    parser.add_argument("--unet-quant", default="none", choices=["none", "int8"],
                        help="kstory's train.unet_quant (int8: QLoRA-style base weights; DiffSynth's side has no such option)")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolution is None:
        args.resolution = 64 if args.model == "tiny" else 512
    if args.side:
        _child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="kstory-bench-memory-") as tmp:
        work = Path(tmp)
        _dataset(work / "data", args.resolution)
        results = {}
        if args.only in (None, "train"):
            results["train-kstory"] = _spawn("train-kstory", args, work)
            results["train-diffsynth"] = _spawn("train-diffsynth", args, work)
            rows += _row(f"train, {args.steps} steps", results["train-kstory"], results["train-diffsynth"])
        if args.only in (None, "story"):
            results["story-kstory"] = _spawn("story-kstory", args, work)
            dtype = results["story-kstory"].get("dtype", "float32")
            results["story-diffsynth"] = _spawn("story-diffsynth", args, work, dtype=dtype)
            rows += _row(f"story, 2 frames ({dtype})", results["story-kstory"], results["story-diffsynth"])
    quant = f", unet_quant {args.unet_quant}" if args.unet_quant != "none" else ""
    cold = all(result.get("cold_page_cache") for result in results.values())
    print(f"model {args.model}, {args.resolution} px, {args.steps} steps, CPU; kstory --memory {args.memory}{quant}; "
          + ("each side from a cold page cache" if cold else "page cache NOT dropped (not root): later sides may "
             "read files the earlier ones left in memory"))
    print("| what | measure | kstory | DiffSynth | kstory / DiffSynth |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
