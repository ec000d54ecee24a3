"""The face of a person's photo for FaceID-Plus: insightface ``antelopev2`` finds it, as the official sample does.

insightface is optional (it needs onnxruntime and the ``antelopev2`` model
files, which it would otherwise try to download at the first call); without
them a story can still give the embedding (``numpy.save`` of the 512 values)
and the face crop itself. The largest face wins; its box is made square and the
crop resized to 336 px, the CLIP encoder's input (the official sample's rule).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kstory.core.errors import KstoryError

CROP_SIZE = 336
MODEL_NAME = "antelopev2"
_INSTALL = ("pip install insightface onnxruntime (onnxruntime-gpu on a GPU), and put the antelopev2 models "
            "(scrfd_10g_bnkps.onnx, glintr100.onnx, ...) into {folder}; or give character.face.embedding "
            "(a .npy of the 512-d embedding) and character.face.crop instead")


def insightface_root() -> Path:
    """Where insightface looks for ``models/antelopev2`` (``$INSIGHTFACE_HOME``, else ``~/.insightface``)."""
    return Path(os.environ.get("INSIGHTFACE_HOME") or Path.home() / ".insightface").expanduser()


def face_models_folder() -> Path:
    return insightface_root() / "models" / MODEL_NAME


def load_face_analysis() -> Any:
    """insightface's ``FaceAnalysis('antelopev2')`` on the CPU, or an error naming what to install and download."""
    folder = face_models_folder()
    try:
        from insightface.app import FaceAnalysis
    except ImportError as error:
        raise KstoryError("detecting a face needs insightface, which is not installed",
                          fix=_INSTALL.format(folder=folder)) from error
    if not folder.is_dir() or not any(folder.glob("*.onnx")):
        raise KstoryError(f"the insightface {MODEL_NAME} models are not on this machine", path=folder,
                          fix=_INSTALL.format(folder=folder))
    app = FaceAnalysis(name=MODEL_NAME, root=str(insightface_root()), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


def square_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """The face box made square around its centre (left, top, right, bottom)."""
    left, top, right, bottom = box
    cx, cy, half = (left + right) / 2, (top + bottom) / 2, max(right - left, bottom - top) / 2
    return cx - half, cy - half, cx + half, cy + half


def detect_face(image: Image.Image, path: Path, app: Any | None = None) -> tuple[np.ndarray, Image.Image]:
    """(the largest face's 512-d embedding, its square crop at 336 px) of ``image`` (read from ``path``)."""
    app = app if app is not None else load_face_analysis()
    rgb = np.asarray(image.convert("RGB"))
    faces = app.get(rgb[:, :, ::-1].copy())  # insightface reads BGR, as OpenCV does
    if not faces:
        raise KstoryError("insightface found no face in the picture", path=path,
                          fix="use a photo with a clearly visible face, or give character.face.embedding and crop")
    face = max(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))
    crop = image.convert("RGB").crop(tuple(int(round(v)) for v in square_box(tuple(face["bbox"]))))
    return np.asarray(face["embedding"], dtype=np.float32), crop.resize((CROP_SIZE, CROP_SIZE))


def load_embedding(path: Path) -> np.ndarray:
    """A face embedding saved with ``numpy.save`` (no pickles), or an error naming the file."""
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise KstoryError(f"the face embedding cannot be read ({error})", path=path,
                          fix="save the 512 values with numpy.save(path, embedding) (a .npy file)") from error
    if values.dtype.kind not in "fiu":
        raise KstoryError(f"the face embedding holds {values.dtype} values, not numbers", path=path,
                          fix="save the 512 float values with numpy.save")
    return values.astype(np.float32)
