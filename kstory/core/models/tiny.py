"""A tiny random-weight Kolors built from DiffSynth's own classes.

The real Kolors weights are ~17 GB and need a download; tests and dry runs
need something that exercises exactly the same code (DiffSynth's UNet,
ChatGLM text encoder, SDXL VAE, their state-dict converters and the Kolors
pipeline) in seconds on a CPU. So the tiny model keeps the real block
topology and only shrinks the widths; it is written in the published
Kwai-Kolors/Kolors layout with diffusers keys, so loading it goes through the
same converters as the real files. Its outputs mean nothing: the weights are
random.

DiffSynth hard-codes the full widths in ``SDXLUNet.__init__`` and the VAE
``__init__``s, but their ``forward`` only walks the attributes set there. The
builders below create the objects without running those ``__init__``s and fill
the same attributes with DiffSynth's own blocks at small widths.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel, RMSNorm
from diffsynth.models.sd_unet import (
    AttentionBlock,
    DownSampler,
    PopBlock,
    PushBlock,
    ResnetBlock,
    Timesteps,
    UpSampler,
)
from diffsynth.models.sd_vae_decoder import VAEAttentionBlock
from diffsynth.models.sdxl_unet import SDXLUNet
from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder
from diffsynth.models.utils import load_state_dict
from safetensors.torch import save_file

from kstory.core.atomic import atomic_directory, write_json
from kstory.core.models.weights import SPEC_FILE, KolorsWeights
from kstory.core.hashing import sha256_file as _sha256
from kstory.core.models.writers import LAYOUTS, TensorEntry, write_kolors_weights

TINY_FORMAT = 1
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILES = ("text_encoder/config.json", "text_encoder/model.safetensors")
KOLORS_VOCAB_SIZE = 65024  # DiffSynth's bundled Kolors tokenizer needs the real vocabulary
VAE_SCALING_FACTOR = 0.13025  # SDXL VAE, as set by DiffSynth's SDXLVAEEncoder/Decoder


@dataclass(frozen=True)
class TinyKolorsSpec:
    """Widths of the tiny model; the real Kolors values are in the comments."""

    seed: int = 0
    unet_channels: tuple[int, int, int] = (32, 64, 64)  # (320, 640, 1280)
    unet_head_dim: int = 32  # 64
    unet_transformer_depth: tuple[int, int] = (1, 1)  # (2, 10) for the two attention levels
    cross_attention_dim: int = 32  # 2048, the output of text_intermediate_proj
    addition_time_embed_dim: int = 16  # 256
    text_hidden_size: int = 32  # 4096
    text_layers: int = 2  # 28
    text_heads: int = 2  # 32
    text_kv_channels: int = 16  # 128
    text_kv_groups: int = 2  # 2 (multi-query attention groups)
    text_ffn_hidden_size: int = 64  # 13696
    vae_channels: tuple[int, int, int, int] = (32, 32, 64, 64)  # (128, 256, 512, 512)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TinyKolorsSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown tiny-kolors spec fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


KOLORS_SPEC = TinyKolorsSpec(
    unet_channels=(320, 640, 1280),
    unet_head_dim=64,
    unet_transformer_depth=(2, 10),
    cross_attention_dim=2048,
    addition_time_embed_dim=256,
    text_hidden_size=4096,
    text_layers=28,
    text_heads=32,
    text_kv_channels=128,
    text_kv_groups=2,
    text_ffn_hidden_size=13696,
    vae_channels=(128, 256, 512, 512),
)
"""The real Kolors widths: the builders below give DiffSynth's full-size models at these (see the tests)."""


# --- topology ---------------------------------------------------------------
# Each layout is a list of (diffusers key prefix or None, DiffSynth block) in
# DiffSynth's block order; the prefixes give the diffusers key format.

Layout = list[tuple[str | None, torch.nn.Module]]


def _unet_layout(spec: TinyKolorsSpec) -> Layout:
    channels, depth, head_dim = spec.unet_channels, spec.unet_transformer_depth, spec.unet_head_dim
    temb = 4 * channels[0]

    def attention(ch: int, level: int) -> AttentionBlock:
        return AttentionBlock(ch // head_dim, head_dim, ch, depth[level - 1], spec.cross_attention_dim)

    layout: Layout = []
    ch = channels[0]
    skips = [ch]  # conv_in's output is the first entry of DiffSynth's res_stack
    last = len(channels) - 1
    for level, out in enumerate(channels):
        for j in range(2):
            layout.append((f"down_blocks.{level}.resnets.{j}", ResnetBlock(ch, out, temb)))
            ch = out
            if level > 0:
                layout.append((f"down_blocks.{level}.attentions.{j}", attention(ch, level)))
            layout.append((None, PushBlock()))
            skips.append(ch)
        if level < last:
            layout += [(f"down_blocks.{level}.downsamplers.0", DownSampler(ch)), (None, PushBlock())]
            skips.append(ch)
    layout += [
        ("mid_block.resnets.0", ResnetBlock(ch, ch, temb)),
        ("mid_block.attentions.0", attention(ch, last)),
        ("mid_block.resnets.1", ResnetBlock(ch, ch, temb)),
    ]
    for i, out in enumerate(reversed(channels)):
        level = last - i
        for j in range(3):
            layout.append((None, PopBlock()))
            layout.append((f"up_blocks.{i}.resnets.{j}", ResnetBlock(ch + skips.pop(), out, temb)))
            ch = out
            if level > 0:
                layout.append((f"up_blocks.{i}.attentions.{j}", attention(ch, level)))
        if level > 0:
            layout.append((f"up_blocks.{i}.upsamplers.0", UpSampler(ch)))
    return layout


def _vae_encoder_layout(spec: TinyKolorsSpec) -> Layout:
    channels = spec.vae_channels
    layout: Layout = []
    ch = channels[0]
    for i, out in enumerate(channels):
        for j in range(2):
            layout.append((f"encoder.down_blocks.{i}.resnets.{j}", ResnetBlock(ch, out, eps=1e-6)))
            ch = out
        if i < len(channels) - 1:
            layout.append((f"encoder.down_blocks.{i}.downsamplers.0", DownSampler(ch, padding=0, extra_padding=True)))
    return layout + _vae_mid_layout("encoder", ch)


def _vae_decoder_layout(spec: TinyKolorsSpec) -> Layout:
    channels = spec.vae_channels
    ch = channels[-1]
    layout = _vae_mid_layout("decoder", ch)
    for i, out in enumerate(reversed(channels)):
        for j in range(3):
            layout.append((f"decoder.up_blocks.{i}.resnets.{j}", ResnetBlock(ch, out, eps=1e-6)))
            ch = out
        if i < len(channels) - 1:
            layout.append((f"decoder.up_blocks.{i}.upsamplers.0", UpSampler(ch)))
    return layout


def _vae_mid_layout(side: str, ch: int) -> Layout:
    return [
        (f"{side}.mid_block.resnets.0", ResnetBlock(ch, ch, eps=1e-6)),
        (f"{side}.mid_block.attentions.0", VAEAttentionBlock(1, ch, ch, 1, eps=1e-6)),
        (f"{side}.mid_block.resnets.1", ResnetBlock(ch, ch, eps=1e-6)),
    ]


def _bare(cls: type[torch.nn.Module]) -> Any:
    """An instance of ``cls`` with ``cls.__init__`` skipped (it would allocate full width)."""
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    return model


def tiny_unet(spec: TinyKolorsSpec) -> tuple[SDXLUNet, list[str | None]]:
    """DiffSynth's Kolors ``SDXLUNet`` at tiny widths, plus each block's diffusers prefix."""
    c0, temb = spec.unet_channels[0], 4 * spec.unet_channels[0]
    layout = _unet_layout(spec)
    unet = _bare(SDXLUNet)
    unet.time_proj = Timesteps(c0)
    unet.time_embedding = torch.nn.Sequential(torch.nn.Linear(c0, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
    unet.add_time_proj = Timesteps(spec.addition_time_embed_dim)
    # Kolors conditions on the pooled ChatGLM state plus six size/crop time ids.
    add_in = spec.text_hidden_size + 6 * spec.addition_time_embed_dim
    unet.add_time_embedding = torch.nn.Sequential(
        torch.nn.Linear(add_in, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb)
    )
    unet.conv_in = torch.nn.Conv2d(4, c0, kernel_size=3, padding=1)
    unet.text_intermediate_proj = torch.nn.Linear(spec.text_hidden_size, spec.cross_attention_dim)
    unet.blocks = torch.nn.ModuleList(block for _, block in layout)
    unet.conv_norm_out = torch.nn.GroupNorm(num_channels=c0, num_groups=32, eps=1e-5)
    unet.conv_act = torch.nn.SiLU()
    unet.conv_out = torch.nn.Conv2d(c0, 4, kernel_size=3, padding=1)
    unet.is_kolors = True
    return unet, [prefix for prefix, _ in layout]


def tiny_vae_encoder(spec: TinyKolorsSpec) -> tuple[SDXLVAEEncoder, list[str | None]]:
    """DiffSynth's ``SDXLVAEEncoder`` at tiny widths: 8x downscale, 4 latent channels."""
    layout = _vae_encoder_layout(spec)
    first, last = spec.vae_channels[0], spec.vae_channels[-1]
    encoder = _bare(SDXLVAEEncoder)
    encoder.scaling_factor = VAE_SCALING_FACTOR
    encoder.quant_conv = torch.nn.Conv2d(8, 8, kernel_size=1)
    encoder.conv_in = torch.nn.Conv2d(3, first, kernel_size=3, padding=1)
    encoder.blocks = torch.nn.ModuleList(block for _, block in layout)
    encoder.conv_norm_out = torch.nn.GroupNorm(num_channels=last, num_groups=32, eps=1e-6)
    encoder.conv_act = torch.nn.SiLU()
    encoder.conv_out = torch.nn.Conv2d(last, 8, kernel_size=3, padding=1)
    return encoder, [prefix for prefix, _ in layout]


def tiny_vae_decoder(spec: TinyKolorsSpec) -> tuple[SDXLVAEDecoder, list[str | None]]:
    """DiffSynth's ``SDXLVAEDecoder`` at tiny widths."""
    layout = _vae_decoder_layout(spec)
    first, last = spec.vae_channels[0], spec.vae_channels[-1]
    decoder = _bare(SDXLVAEDecoder)
    decoder.scaling_factor = VAE_SCALING_FACTOR
    decoder.post_quant_conv = torch.nn.Conv2d(4, 4, kernel_size=1)
    decoder.conv_in = torch.nn.Conv2d(4, last, kernel_size=3, padding=1)
    decoder.blocks = torch.nn.ModuleList(block for _, block in layout)
    decoder.conv_norm_out = torch.nn.GroupNorm(num_channels=first, num_groups=32, eps=1e-5)
    decoder.conv_act = torch.nn.SiLU()
    decoder.conv_out = torch.nn.Conv2d(first, 3, kernel_size=3, padding=1)
    return decoder, [prefix for prefix, _ in layout]


def text_encoder_config(spec: TinyKolorsSpec) -> dict[str, Any]:
    """config.json for the tiny ChatGLM, with the same fields as the published Kolors one."""
    return {
        "architectures": ["ChatGLMModel"],  # what DiffSynth's ModelManager dispatches on
        "model_type": "chatglm",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": spec.text_ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": spec.text_hidden_size,
        "kv_channels": spec.text_kv_channels,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": spec.text_kv_groups,
        "num_attention_heads": spec.text_heads,
        "num_layers": spec.text_layers,
        "original_rope": True,
        "padded_vocab_size": KOLORS_VOCAB_SIZE,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 32768,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


# --- diffusers key format ---------------------------------------------------

_UNET_TOP = {
    "time_embedding.0": "time_embedding.linear_1",
    "time_embedding.2": "time_embedding.linear_2",
    "add_time_embedding.0": "add_embedding.linear_1",
    "add_time_embedding.2": "add_embedding.linear_2",
    "text_intermediate_proj": "encoder_hid_proj",
}
_UNET_PARTS = {"to_out": "to_out.0", "act_fn": "ff.net.0", "ff": "ff.net.2"}
_VAE_TOP = {
    "encoder": {"conv_in": "encoder.conv_in", "conv_norm_out": "encoder.conv_norm_out", "conv_out": "encoder.conv_out"},
    "decoder": {"conv_in": "decoder.conv_in", "conv_norm_out": "decoder.conv_norm_out", "conv_out": "decoder.conv_out"},
}


def _rename(name: str, prefixes: list[str | None], top: dict[str, str], parts: dict[str, str], strip: str = "") -> str:
    module, _, leaf = name.rpartition(".")
    if not module.startswith("blocks."):
        return f"{top.get(module, module)}.{leaf}"
    _, index, rest = module.split(".", 2)  # block parameters always sit in a submodule
    rest = ".".join(parts.get(part, part) for part in rest.removeprefix(strip).split("."))
    return f"{prefixes[int(index)]}.{rest}.{leaf}"


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], prefixes: list[str | None]) -> dict[str, torch.Tensor]:
    """DiffSynth UNet keys -> diffusers ``UNet2DConditionModel`` keys (the inverse of ``from_diffusers``)."""
    return {_rename(k, prefixes, _UNET_TOP, _UNET_PARTS): v for k, v in state_dict.items()}


def vae_to_diffusers(
    encoder: dict[str, torch.Tensor],
    encoder_prefixes: list[str | None],
    decoder: dict[str, torch.Tensor],
    decoder_prefixes: list[str | None],
) -> dict[str, torch.Tensor]:
    """DiffSynth VAE encoder + decoder keys -> one diffusers ``AutoencoderKL`` state dict."""
    # DiffSynth wraps the VAE mid attention in transformer_blocks.0 and calls its GroupNorm "norm".
    parts, strip = {"norm": "group_norm", "to_out": "to_out.0"}, "transformer_blocks.0."
    out = {_rename(k, encoder_prefixes, _VAE_TOP["encoder"], parts, strip): v for k, v in encoder.items()}
    out.update({_rename(k, decoder_prefixes, _VAE_TOP["decoder"], parts, strip): v for k, v in decoder.items()})
    return out


def from_diffusers(
    model: torch.nn.Module, diffusers_state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run DiffSynth's own converter for ``model``'s class; returns (state dict, extra init kwargs)."""
    result = type(model).state_dict_converter().from_diffusers(diffusers_state_dict)
    return result if isinstance(result, tuple) else (result, {})


# --- deterministic random init ----------------------------------------------

_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, RMSNorm)
_PROJECTIONS = (torch.nn.Linear, torch.nn.Conv2d)


def _generator(seed: int, component: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int, component: str) -> None:
    """Seed every parameter from (seed, component, name): order- and RNG-state-independent."""
    done: set[str] = set()
    for module_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        for param_name, param in own.items():
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, _NORMS):
                param.fill_(1.0 if param_name == "weight" else 0.0)
            elif isinstance(module, _PROJECTIONS) and param_name == "bias":
                param.zero_()
            elif isinstance(module, _PROJECTIONS):
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=_generator(seed, component, name)) / fan_in**0.5)
            elif isinstance(module, torch.nn.Embedding):
                param.copy_(torch.randn(param.shape, generator=_generator(seed, component, name)))
            else:
                raise TypeError(f"no init rule for {name} ({type(module).__name__})")
            done.add(name)
    missing = {name for name, _ in model.named_parameters()} - done
    if missing:
        raise TypeError(f"parameters left uninitialised: {sorted(missing)}")


def _materialise(model: torch.nn.Module, seed: int, component: str) -> torch.nn.Module:
    """Allocate a meta-built model, then seed every parameter.

    ``to_empty`` also blanks buffers, so it is skipped for models built off
    meta (ChatGLM computes its rotary ``inv_freq`` buffer at construction).
    """
    if any(param.is_meta for param in model.parameters()):
        model.to_empty(device="cpu")
    _init_weights(model, seed, component)
    return model.eval()


# --- build / load -----------------------------------------------------------


def _check_round_trip(
    model: torch.nn.Module, original: dict[str, torch.Tensor], diffusers: dict[str, torch.Tensor]
) -> None:
    converted, _ = from_diffusers(model, diffusers)
    if converted.keys() != original.keys() or any(not torch.equal(converted[k], original[k]) for k in original):
        raise RuntimeError(f"diffusers keys for {type(model).__name__} do not round-trip through DiffSynth's converter")


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state_dict.items()}


def build_tiny_kolors(target: str | Path, spec: TinyKolorsSpec = TinyKolorsSpec(), layout: str = "single") -> Path:
    """Write the tiny model to ``target`` (which must not exist) in one of the published file layouts.

    ``layout`` is one of ``kstory.models.writers.LAYOUTS``: ``single`` (the
    default and the cached ``tiny`` model: float32, one ChatGLM safetensors
    file), or ``official`` / ``diffusers``, written in fp16 with the file names,
    shards and index of Kwai-Kolors/Kolors and Kolors-diffusers. Built in a
    staging folder and moved into place, so ``target`` is either absent or
    complete. Same spec and layout -> byte-identical files.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {LAYOUTS})")
    target = Path(target)
    with atomic_directory(target) as staging:
        with torch.device("meta"):
            unet, unet_prefixes = tiny_unet(spec)
            encoder, encoder_prefixes = tiny_vae_encoder(spec)
            decoder, decoder_prefixes = tiny_vae_decoder(spec)
        _materialise(unet, spec.seed, "unet")
        _materialise(encoder, spec.seed, "vae_encoder")
        _materialise(decoder, spec.seed, "vae_decoder")
        # empty_init=True (DiffSynth's default) allocates without running the default init.
        text_encoder = _materialise(ChatGLMModel(ChatGLMConfig(**text_encoder_config(spec))), spec.seed, "text_encoder")

        unet_sd = _contiguous(unet.state_dict())
        unet_diffusers = unet_to_diffusers(unet_sd, unet_prefixes)
        _check_round_trip(unet, unet_sd, unet_diffusers)
        encoder_sd, decoder_sd = _contiguous(encoder.state_dict()), _contiguous(decoder.state_dict())
        vae_diffusers = vae_to_diffusers(encoder_sd, encoder_prefixes, decoder_sd, decoder_prefixes)
        _check_round_trip(encoder, encoder_sd, vae_diffusers)
        _check_round_trip(decoder, decoder_sd, vae_diffusers)
        text_encoder_sd = _contiguous(text_encoder.state_dict())

        config = text_encoder_config(spec)
        if layout == "single":
            for relative in (UNET_FILE, VAE_FILE, TEXT_ENCODER_FILES[1]):
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            save_file(unet_diffusers, staging / UNET_FILE, metadata={"format": "pt"})
            save_file(vae_diffusers, staging / VAE_FILE, metadata={"format": "pt"})
            save_file(text_encoder_sd, staging / TEXT_ENCODER_FILES[1], metadata={"format": "pt"})
            weight_files = [staging / name for name in (TEXT_ENCODER_FILES[1], UNET_FILE, VAE_FILE)]
        else:  # the published releases are fp16 throughout
            config["torch_dtype"] = "float16"
            parts = [_fp16_part(sd) for sd in (text_encoder_sd, unet_diffusers, vae_diffusers)]
            weight_files = write_kolors_weights(staging, layout, *parts)
        write_json(staging / TEXT_ENCODER_FILES[0], config)
        files = [path.relative_to(staging).as_posix() for path in [staging / TEXT_ENCODER_FILES[0], *weight_files]]
        write_json(
            staging / SPEC_FILE,
            {
                "kind": "kstory/tiny-kolors",
                "format": TINY_FORMAT,
                "note": "random weights for tests and dry runs; its images mean nothing",
                "spec": spec.to_json(),
                **({} if layout == "single" else {"layout": layout}),
                "files": {name: _sha256(staging / name) for name in files},
            },
        )
    return target


def _fp16_part(state_dict: dict[str, torch.Tensor]) -> tuple[list[TensorEntry], Any]:
    """A state dict as fp16 writer entries, keys sorted as safetensors writes them."""
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state_dict.items()}
    entries = [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in sorted(half.items())]
    return entries, lambda entry: half[entry.name]


def read_tiny_manifest(root: str | Path) -> dict[str, Any]:
    """The parsed ``kstory_tiny.json`` of a tiny model folder."""
    return json.loads((Path(root) / SPEC_FILE).read_text(encoding="utf-8"))


def is_complete(root: str | Path, spec: TinyKolorsSpec) -> bool:
    """True if ``root`` holds a finished build of ``spec`` whose files match their recorded hashes."""
    root = Path(root)
    try:
        manifest = read_tiny_manifest(root)
        if manifest["format"] != TINY_FORMAT or TinyKolorsSpec.from_json(manifest["spec"]) != spec:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    files: dict[str, str] = manifest.get("files", {})
    return bool(files) and all(
        (root / name).is_file() and _sha256(root / name) == digest for name, digest in files.items()
    )


def _load_single_file_models(
    path: Path, models: list[torch.nn.Module], device: str | torch.device, torch_dtype: torch.dtype
) -> list[torch.nn.Module]:
    """DiffSynth's single-file loading, minus the full-size class instantiation.

    Same steps as ``diffsynth.models.model_manager.load_model_from_single_file``:
    its ``load_state_dict``, the class's ``from_diffusers`` converter, the
    converter's ``upcast_to_float32`` hint, ``load_state_dict(assign=True)``.
    """
    state_dict = load_state_dict(str(path))
    loaded = []
    for model in models:
        converted, extra = from_diffusers(model, state_dict)
        dtype = torch.float32 if extra.get("upcast_to_float32", False) else torch_dtype
        model.load_state_dict(converted, strict=True, assign=True)
        loaded.append(model.eval().to(dtype=dtype, device=device))
    return loaded


def load_tiny_models(
    weights: KolorsWeights, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32,
    parts: list[str] | tuple[str, ...] = ("unet", "vae"),
) -> dict[str, torch.nn.Module]:
    """The tiny UNet and/or VAE halves (``parts``), keyed by DiffSynth's ModelManager names."""
    spec = TinyKolorsSpec.from_json(read_tiny_manifest(weights.root)["spec"])
    loaded: dict[str, torch.nn.Module] = {}
    if "unet" in parts:
        with torch.device("meta"):
            unet, _ = tiny_unet(spec)
        (loaded["sdxl_unet"],) = _load_single_file_models(weights.unet, [unet], device, torch_dtype)
    if "vae" in parts:
        with torch.device("meta"):
            encoder, _ = tiny_vae_encoder(spec)
            decoder, _ = tiny_vae_decoder(spec)
        encoder, decoder = _load_single_file_models(weights.vae, [encoder, decoder], device, torch_dtype)
        loaded.update(sdxl_vae_encoder=encoder, sdxl_vae_decoder=decoder)
    return loaded
