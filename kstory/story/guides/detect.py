"""Guides that need a model: depth maps and OpenPose detection from reference photos.

Both run only when their weights are on disk (kstory downloads nothing at
story time); without them the error says what to download or what to use
instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kstory.core.errors import KstoryError


def estimate_depth(image: Image.Image, model_dir: Path | None, where: Path | None = None) -> Image.Image:
    """Depth map (near = bright, 3 channels) from a local transformers depth-estimation model folder."""
    if model_dir is None or not Path(model_dir).is_dir():
        raise KstoryError(
            "a depth guide from a reference image needs a local depth model"
            + (f" (not found: {model_dir})" if model_dir is not None else ""),
            path=where,
            fix="download a transformers depth-estimation model (e.g. depth-anything/Depth-Anything-V2-Small-hf) "
            "and set depth_model: to its folder, or give a ready depth map with type: image",
        )
    from transformers import pipeline

    try:
        estimator = pipeline("depth-estimation", model=str(model_dir), device="cpu")
    except (OSError, ValueError) as error:
        raise KstoryError(f"could not load the depth model ({error})", path=model_dir,
                          fix="point depth_model at a complete transformers depth-estimation folder") from error
    depth = np.asarray(estimator(image.convert("RGB"))["predicted_depth"].squeeze().float().numpy())
    span = float(depth.max() - depth.min()) or 1.0
    grey = ((depth - depth.min()) / span * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1)).resize(image.size, Image.BICUBIC)


def detect_pose(image: Image.Image, detector_dir: Path | None, where: Path | None = None) -> Image.Image:
    """OpenPose render of a reference photo with controlnet_aux's detector and local weights."""
    fix = (
        "pip install controlnet_aux, download lllyasviel/Annotators (body_pose_model.pth, hand_pose_model.pth, "
        "facenet.pth) and set detector: to that folder; or use a built-in pose name or keypoints instead"
    )
    if detector_dir is None or not Path(detector_dir).is_dir():
        raise KstoryError("a pose guide from a reference photo needs local OpenPose detector weights",
                          path=where, fix=fix)
    try:
        from controlnet_aux import OpenposeDetector
    except ImportError as error:
        raise KstoryError("the OpenPose detector needs the controlnet_aux package", path=where, fix=fix) from error
    detector = OpenposeDetector.from_pretrained(str(detector_dir))
    width, height = image.size
    result = detector(image.convert("RGB"), detect_resolution=min(width, height), image_resolution=min(width, height),
                      include_body=True, include_hand=True, include_face=True)
    return result.resize((width, height))
