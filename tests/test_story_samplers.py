"""Samplers: kstory's denoising equals diffusers' KolorsPipeline on the tiny Kolors, and old specs keep DDIM.

Both sides run the same tiny UNet file (DiffSynth's SDXLUNet in kstory,
diffusers' UNet2DConditionModel in the pipeline) with the same prompt
embeddings (DiffSynth's Kolors prompter), seed, steps and CFG; what is compared
is everything the sampler decides: noise, timesteps, input scaling, CFG and steps.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from kstory.core.errors import KstoryError
from kstory.core.models import resolve_model
from kstory.story.generate import FramePlan, Session
from kstory.story.samplers import SAMPLERS, check_sampler, diffusers_scheduler, make_sampler, sampler_record
from kstory.submissions.parity import load_tiny_diffusers_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def session():
    weights = resolve_model("tiny")
    session = Session.load(weights, lora=None, lora_scale=None, controlnets={}, device="cpu",
                           torch_dtype=torch.float32)
    plans = [FramePlan(index=1, prompt="kstory style, a fox", frame_prompt="a fox", negative_prompt="blurry",
                       seed=7, width=64, height=64, steps=4, cfg_scale=5.0)]
    session.encode(plans)
    return session, plans[0], load_tiny_diffusers_unet(weights)


def _diffusers_latents(session, plan, unet, sampler: str) -> torch.Tensor:
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    pos, neg = session._embeddings[(plan.prompt, True)], session._embeddings[(plan.negative_prompt, False)]
    return pipe(prompt_embeds=pos["encoder_hidden_states"], pooled_prompt_embeds=pos["add_text_embeds"],
                negative_prompt_embeds=neg["encoder_hidden_states"],
                negative_pooled_prompt_embeds=neg["add_text_embeds"], height=plan.height, width=plan.width,
                num_inference_steps=plan.steps, guidance_scale=plan.cfg_scale,
                generator=torch.Generator("cpu").manual_seed(plan.seed), output_type="latent").images


@pytest.mark.parametrize("sampler", [name for name in SAMPLERS if name != "ddim"])
def test_latents_equal_diffusers_kolors_pipeline(session, sampler):
    session, plan, unet = session
    plan.sampler = sampler
    ours = session.denoise_latents([plan])
    theirs = _diffusers_latents(session, plan, unet, sampler)
    assert ours.shape == theirs.shape == (1, 4, 8, 8)
    # float32 on the CPU: the two UNets (and diffusers' batch order, negative first) differ in rounding only,
    # so the largest difference is a few float32 roundings of the (random-weight, large) latents
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error < 2e-5, error
    plan.sampler = "ddim"
    assert not torch.allclose(session.denoise_latents([plan]), theirs, atol=1e-2)  # the check is not vacuous


def test_euler_frame_equals_diffusers_decoded_within_one_level(session):
    """The PNG pixels: diffusers' latents decoded by the same VAE decoder differ by at most one level."""
    import numpy as np

    session, plan, unet = session
    plan.sampler = "euler"
    (image,) = session.denoise([plan])
    with torch.no_grad():
        theirs = session.pipe.decode_image(_diffusers_latents(session, plan, unet, "euler"))
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(theirs, dtype=int))
    assert diff.max() <= 1


def test_kolors_schedule_and_timesteps():
    euler = make_sampler("euler", 4)
    assert [int(t) for t in euler.timesteps] == [826, 551, 276, 1]  # leading spacing over 1100, offset 1
    assert euler.scheduler.config.beta_end == 0.014 and euler.scheduler.config.num_train_timesteps == 1100
    assert [int(t) for t in make_sampler("ddim", 4).timesteps] == [1099, 733, 366, 0]  # DiffSynth's grid
    assert [int(t) for t in make_sampler("euler", 4, strength=0.5).timesteps] == [276, 1]
    assert make_sampler("euler", 4, strength=0.2).timesteps == []
    assert sampler_record("ddim") == {"name": "ddim", "scheduler": "EnhancedDDIMScheduler",
                                      "num_train_timesteps": 1100, "beta_end": 0.014}
    with pytest.raises(KstoryError, match="unknown sampler 'lms'"):
        check_sampler("lms")


def _spec(path, sampler=None, frame_sampler=None):
    defaults = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 5.0}
    if sampler:
        defaults["sampler"] = sampler
    frames = [{"prompt": "a fox", "seed": 1}, {"prompt": "a cat", "seed": 2}]
    if frame_sampler:
        frames[1]["sampler"] = frame_sampler
    path.write_text(yaml.safe_dump({"title": "t", "frame_count": 2, "defaults": defaults, "frames": frames}))
    return path


def test_spec_without_sampler_keeps_ddim_and_frames_choose_their_own(tmp_path):
    import kstory.story as story

    old = story.generate_story(_spec(tmp_path / "old.yaml"), tmp_path / "old", model="tiny")
    explicit = story.generate_story(_spec(tmp_path / "ddim.yaml", "ddim"), tmp_path / "ddim", model="tiny")
    manifest = json.loads(old.manifest_path.read_text())
    assert manifest["sampler"] == sampler_record("ddim")
    assert json.loads(explicit.manifest_path.read_text())["setup_id"] == manifest["setup_id"]
    assert explicit.frame_hashes == old.frame_hashes
    mixed = story.generate_story(_spec(tmp_path / "mixed.yaml", "ddim", "euler"), tmp_path / "mixed", model="tiny")
    frames = json.loads(mixed.manifest_path.read_text())["frames"]
    assert [frames[k]["sampler"] for k in ("1", "2")] == ["ddim", "euler"]
    assert frames["1"]["batch"] == [1] and frames["2"]["batch"] == [2]  # one sampler per batch
    assert mixed.frame_hashes[2] != old.frame_hashes[2]
    with pytest.raises(KstoryError, match="sampler"):
        story.load_spec(_spec(tmp_path / "bad.yaml", "lms"))
