"""ChatGLM's text-encoder options against fp16: how far apart are the prompt embeddings?

Encodes the same prompts through DiffSynth's ``KolorsPrompter`` with the text
encoder loaded by kstory in fp16 (the reference, as Kolors ships it), float32,
bf16 (the ``cpu`` memory profile), and bf16 with int8 and int4 linear weights
(``text_encoder_quant``, torchao), and prints for each the worst cosine
similarity and the largest absolute difference over the ``[256, D]``
embeddings and the pooled vectors, plus the linear weights' bytes.

    .venv/bin/python bench/bench_text_encoder_dtype.py                        # the tiny Kolors
    .venv/bin/python bench/bench_text_encoder_dtype.py --full-width-layers 2  # ChatGLM at full width, 2 random layers
    .venv/bin/python bench/bench_text_encoder_dtype.py --model PATH           # any Kolors folder (full size: ~25 GB RAM)

Random weights say how much each option perturbs the encoder's arithmetic,
not how much a picture changes; at full width the per-layer error is the
representative part, and the full model stacks 28 such layers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import tempfile
from pathlib import Path

import kstory  # noqa: F401  (installs the torchvision import fix first)
import torch

PROMPTS = ("kstory style, a small fox in a blue scarf waves to a friend across the market",
           "低质量，模糊，变形的手")
OPTIONS = (("float32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"),
           ("bf16 + int8", torch.bfloat16, "int8"), ("bf16 + int4", torch.bfloat16, "int4"))


def encode(weights, dtype: torch.dtype, quant: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """(pooled, embedding) per prompt in float32, and the bytes of the encoder's linear weights."""
    from diffsynth.prompters import KolorsPrompter

    from kstory.core.models import load_kolors_model_manager
    from kstory.core.models.quantize import quantize_text_encoder

    manager = load_kolors_model_manager(weights, device="cpu", torch_dtype=dtype, parts=("text_encoder",))
    prompter = KolorsPrompter()
    with contextlib.redirect_stdout(io.StringIO()):
        prompter.fetch_models(manager.fetch_model("kolors_text_encoder"))
    quantize_text_encoder(prompter.text_encoder, quant)
    linear_bytes = sum(_bytes(m.weight) for m in prompter.text_encoder.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        out = [tuple(t.float() for t in prompter.encode_prompt(p, clip_skip=1, clip_skip_2=2, device="cpu"))
               for p in PROMPTS]
    del manager, prompter
    gc.collect()
    return out, linear_bytes


def _bytes(weight: torch.Tensor) -> int:
    """Storage of a (possibly torchao-quantised) weight: the sum of its inner tensors."""
    if type(weight) in (torch.Tensor, torch.nn.Parameter) or not hasattr(weight, "__tensor_flatten__"):
        return weight.numel() * weight.element_size()
    names, _ = weight.__tensor_flatten__()
    return sum(_bytes(getattr(weight, name)) for name in names)


def _weights(args, folder: Path):
    from kstory.core.models import resolve_model
    from kstory.core.models.tiny import TinyKolorsSpec, build_tiny_kolors

    if not args.full_width_layers:
        return resolve_model(args.model)
    spec = TinyKolorsSpec(text_hidden_size=4096, text_layers=args.full_width_layers, text_heads=32,
                          text_kv_channels=128, text_kv_groups=2, text_ffn_hidden_size=13696)
    return resolve_model(str(build_tiny_kolors(folder / "kolors", spec)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default), kolors, or a Kolors folder")
    parser.add_argument("--full-width-layers", type=int, default=0,
                        help="instead: random ChatGLM at full width (4096 hidden) with this many layers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kstory-bench-te-") as tmp:
        weights = _weights(args, Path(tmp))
        reference, reference_bytes = encode(weights, torch.float16, "none")
        label = f"random ChatGLM, 4096 wide, {args.full_width_layers} layers" if args.full_width_layers else weights.identity
        print(f"text encoder: {label}; reference fp16, linear weights {reference_bytes / 1e6:.1f} MB")
        print("| option | worst cosine | max abs error | max abs value | linear weights vs fp16 |")
        print("| --- | --- | --- | --- | --- |")
        for name, dtype, quant in OPTIONS:
            test, size = encode(weights, dtype, quant)
            cosines, errors, values = [], [], []
            for ref, out in zip(reference, test):
                for a, b in zip(ref, out):
                    cosines.append(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item())
                    errors.append((a - b).abs().max().item())
                    values.append(a.abs().max().item())
            print(f"| {name} | {min(cosines):.6f} | {max(errors):.4f} | {max(values):.2f} | "
                  f"{size / reference_bytes:.2f}x |")


if __name__ == "__main__":
    main()
