"""ChatGLM one layer at a time: every prompt through layer 1, free it, load layer 2, ... (``text_encoder_offload``).

Kolors reads two things from ChatGLM: the input of its last layer (the
``[256, 4096]`` prompt embedding, ``clip_skip=2``) and the last token of its
last layer's output (the pooled vector). Neither needs the whole 12.5 GB
network in memory at once. This encoder builds ChatGLM empty (on the meta
device), keeps only the token embedding, and streams the 28 blocks from the
weight files: each block is read, converted to the run's dtype, run on every
prompt and dropped before the next is read. Peak memory is the embedding plus
one block (about 1 GB in bf16) instead of the whole encoder, and the output is
the same arithmetic as DiffSynth's ``KolorsPrompter`` on the whole model, bit
for bit (each prompt alone, as the prompter encodes it).

Weights are read from what ``from_pretrained`` would read: sharded or single
safetensors (memory-mapped) and ``.bin`` shards (``torch.load`` with
``mmap=True, weights_only=True``), with or without the ``transformer.`` prefix
of the published checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kstory.core.models.files import text_encoder_files
from kstory.core.models.quantize import quantize_text_encoder
from kstory.core.models.read_ahead import ReadAhead

_PREFIX = "transformer."


class _WeightFiles:
    """Tensor name -> file of a ChatGLM folder, read one file at a time."""

    def __init__(self, folder: Path):
        files = text_encoder_files(Path(folder), fix="download the text encoder again")
        self.config = files.config
        if files.index is not None:
            weight_map = json.loads(files.index.read_text(encoding="utf-8"))["weight_map"]
            self.where = {name: files.index.parent / file for name, file in weight_map.items()}
        else:
            self.where = {name: files.shards[0] for name in _names(files.shards[0])}
        self._open: tuple[Path, Any] | None = None
        self.read_ahead: ReadAhead | None = None  # started by the first tensor read, stopped by close()

    def model_names(self, prefix: str) -> list[str]:
        """Checkpoint names under ``prefix`` (a ChatGLMModel name such as ``encoder.layers.3.``), in file order."""
        return [name for name in self.where if _strip(name).startswith(prefix)]

    def tensor(self, name: str) -> torch.Tensor:
        path = self.where[name]
        if self._open is None or self._open[0] != path:
            if self.read_ahead is None:
                self.read_ahead = ReadAhead(sorted(set(self.where.values())))  # shard names number them in order
            self.read_ahead.using(path)
            self._open = (path, _reader(path))
        return self._open[1](name)

    def close(self) -> None:
        self._open = None
        if self.read_ahead is not None:
            self.read_ahead.close()
            self.read_ahead = None


def _strip(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def _names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True))


def _reader(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        return handle.get_tensor
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return state.__getitem__


class StreamedChatGLM:
    """Encode prompts as ``KolorsPrompter.encode_prompt`` does, holding one ChatGLM block at a time."""

    def __init__(self, folder: Path, *, device: str | torch.device, dtype: torch.dtype, quant: str = "none"):
        from accelerate import init_empty_weights
        from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel
        from diffsynth.prompters import KolorsPrompter

        self.files = _WeightFiles(folder)
        self.device, self.dtype, self.quant = torch.device(device), dtype, quant
        config = ChatGLMConfig.from_pretrained(str(self.files.config.parent))
        config.torch_dtype = dtype
        with init_empty_weights():
            self.model = ChatGLMModel(config, empty_init=False).eval()
        self._materialise("embedding.")
        self._materialise("rotary_pos_emb.")
        with contextlib.redirect_stdout(io.StringIO()):
            self.prompter = KolorsPrompter()

    def _materialise(self, prefix: str) -> None:
        """Read the tensors of the submodule ``prefix`` into the empty model, in the run's dtype and device."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self.files.model_names(prefix):
            value = self.files.tensor(name)
            value = value.to(self.dtype) if value.is_floating_point() else value
            set_module_tensor_to_device(self.model, _strip(name), self.device, value=value)

    def _layers(self) -> Iterator[torch.nn.Module]:
        """Each block in turn, loaded; after the caller is done with it, its memory is given back."""
        for index, layer in enumerate(self.model.encoder.layers):
            self._materialise(f"encoder.layers.{index}.")
            quantize_text_encoder(layer, self.quant)  # int8/int4 per block: what quantising the whole model gives
            yield layer
            layer.to("meta")
        self.files.close()

    @torch.no_grad()
    def encode(self, prompts: list[tuple[str, bool]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pooled, embedding) per (prompt, positive), as ``KolorsPrompter.encode_prompt(..., clip_skip_2=2)``."""
        states, masks, rotaries = [], [], []
        for prompt, positive in prompts:
            text = self.prompter.process_prompt(prompt, positive=positive)
            tokens = self.prompter.tokenizer(text, padding="max_length", max_length=256, truncation=True,
                                             return_tensors="pt").to(self.device)
            ids, attention = tokens["input_ids"], tokens["attention_mask"]
            states.append(self.model.embedding(ids))
            padded = not attention.all()
            masks.append(self.model.get_masks(ids, None, padding_mask=attention) if padded else None)
            rotary = self.model.rotary_pos_emb(self.model.seq_length)[tokens["position_ids"]]
            rotaries.append(rotary.transpose(0, 1).contiguous())
        last_inputs = list(states)
        count = len(self.model.encoder.layers)
        for index, layer in enumerate(self._layers()):
            if index == count - 1:
                last_inputs = list(states)  # the second-to-last hidden state: Kolors' prompt embedding
            states = [layer(h, mask, rotary, kv_cache=None, use_cache=False)[0]
                      for h, mask, rotary in zip(states, masks, rotaries)]
        return [(final[-1, :, :].clone(), before.permute(1, 0, 2).clone())
                for final, before in zip(states, last_inputs)]
