"""ChatGLM in bf16 (the `cpu` memory profile) against float32: how far apart are the prompt embeddings?

Encodes the same prompts through DiffSynth's ``KolorsPrompter`` with the text
encoder loaded by kstory in float32 and in bf16, and prints the cosine
similarity and the largest absolute difference of the ``[256, D]`` embedding
and the pooled vector, side by side. Default: the tiny model (offline);
``--model PATH`` for any Kolors folder (a full-size one needs ~25 GB of RAM
for the float32 side).

    .venv/bin/python bench/bench_text_encoder_dtype.py [--model PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io

import kstory  # noqa: F401  (installs the torchvision import fix first)
import torch

PROMPTS = ("kstory style, a small fox in a blue scarf waves to a friend across the market",
           "低质量，模糊，变形的手")


def encode(weights, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from diffsynth.prompters import KolorsPrompter

    from kstory.core.models import load_kolors_model_manager

    manager = load_kolors_model_manager(weights, device="cpu", torch_dtype=dtype, parts=("text_encoder",))
    prompter = KolorsPrompter()
    with contextlib.redirect_stdout(io.StringIO()):
        prompter.fetch_models(manager.fetch_model("kolors_text_encoder"))
    with torch.no_grad():
        out = [tuple(t.float() for t in prompter.encode_prompt(p, clip_skip=1, clip_skip_2=2, device="cpu"))
               for p in PROMPTS]
    del manager, prompter
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default), kolors, or a Kolors folder")
    args = parser.parse_args()
    from kstory.core.models import resolve_model

    weights = resolve_model(args.model)
    reference, half = encode(weights, torch.float32), encode(weights, torch.bfloat16)
    print(f"model: {weights.identity}")
    print(f"{'prompt':<8} {'tensor':<10} {'cosine':>10} {'max abs err':>12} {'max abs value':>14}")
    for index, (ref, test) in enumerate(zip(reference, half), start=1):
        for name, a, b in (("pooled", ref[0], test[0]), ("embedding", ref[1], test[1])):
            cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
            print(f"{index:<8} {name:<10} {cosine:>10.6f} {(a - b).abs().max().item():>12.4f} "
                  f"{a.abs().max().item():>14.2f}")


if __name__ == "__main__":
    main()
