"""``--lora PATH[:SCALE]`` on the command line: the story's own trained LoRA and the user's own ones."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from kstory.core.errors import KstoryError

if TYPE_CHECKING:  # the command line starts without torch; the LoRA code loads it
    from kstory.core.lora_stack import LoraRequest

LORA_HELP = (
    "a LoRA file, optionally with its scale: PATH or PATH:SCALE (repeatable). The first one written by `kstory "
    "train` is the story's own LoRA (its trigger word, base-model check and --lora-scale); every other one "
    "(kohya/ComfyUI, diffusers/peft or DiffSynth keys, e.g. --lora style.safetensors:0.8 --lora "
    "char.safetensors:0.6) is stacked on it at its scale (default 1.0). See docs/story.md, 'Bringing LoRAs'"
)


def parse_lora(text: str) -> tuple[Path, float | None]:
    """``PATH`` or ``PATH:SCALE``; a suffix that is not a number stays part of the path."""
    head, colon, tail = text.rpartition(":")
    if colon and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), None


def split_loras(values: list[str] | None, lora_scale: float | None
                ) -> tuple[Path | None, float | None, list[LoraRequest]]:
    """(own LoRA, its scale, the user's LoRAs) from the ``--lora`` values, in the order given."""
    from kstory.core.lora import is_kstory_lora
    from kstory.core.lora_stack import LoraRequest

    own: Path | None = None
    own_scale = lora_scale
    extra: list[LoraRequest] = []
    for text in values or []:
        path, scale = parse_lora(text)
        if own is None and is_kstory_lora(path):
            if scale is not None and lora_scale is not None and scale != lora_scale:
                raise KstoryError(f"--lora {text} and --lora-scale {lora_scale} give the trained LoRA two scales",
                                  fix="give its scale once, as PATH:SCALE or with --lora-scale")
            own, own_scale = path, scale if scale is not None else lora_scale
        else:
            extra.append(LoraRequest(path, 1.0 if scale is None else scale))
    return own, own_scale, extra
