"""Guide images: OpenPose renders in the standard colours, canny edges, resizing, and model-less errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kstory.core.errors import KstoryError
from kstory.story.guides.canny import canny_edges
from kstory.story.guides.pose import BODY_COLOURS, draw_openpose, render_keypoints, render_library_pose
from kstory.story.guides.pose_library import library_pose, pose_names
from kstory.story.guides.render import render_guide
from kstory.story.spec import CannyGuide, DepthGuide, ImageGuide, Keypoints, PoseGuide


def test_library_has_enough_poses_for_a_story():
    assert {"standing", "walking", "sitting", "waving", "running", "pointing"} <= set(pose_names())
    for name in pose_names():
        points = library_pose(name)
        assert len(points) == 18
        assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in filter(None, points))


def test_keypoints_are_drawn_in_the_openpose_colours():
    image = np.asarray(render_library_pose("standing", 512, 512))
    for index in (0, 1, 4, 10, 13):  # nose, neck, right wrist, right ankle, left ankle
        x, y = library_pose("standing")[index]
        assert tuple(image[round(y * 512), round(x * 512)]) == BODY_COLOURS[index]
    assert image[5, 5].tolist() == [0, 0, 0]  # black background


def test_flip_mirrors_the_figure():
    plain = np.asarray(render_library_pose("waving", 256, 256))
    flipped = np.asarray(render_library_pose("waving", 256, 256, flip=True))
    # A mirror image: the raised right hand becomes a raised left hand, drawn in the left wrist's colour.
    x, y = library_pose("waving", flip=True)[7]
    assert x > 0.5 and y < 0.2 and tuple(flipped[round(y * 256), round(x * 256)]) == BODY_COLOURS[7]
    assert not np.array_equal(plain, flipped)


def test_openpose_keypoints_with_hands_and_face_scale_from_their_canvas():
    body = [64.0, 40.0, 1.0] * 18
    body[3:6] = [64.0, 60.0, 1.0]
    hand = [v for i in range(21) for v in (70.0 + i, 90.0, 1.0)]
    face = [v for i in range(70) for v in (50.0 + i % 20, 30.0, 1.0)]
    keypoints = Keypoints(people=[{"pose_keypoints_2d": body, "hand_left_keypoints_2d": hand,
                                   "face_keypoints_2d": face}], canvas_width=128, canvas_height=128)
    image = np.asarray(render_keypoints(keypoints, 256, 256))
    assert tuple(image[120, 128]) == BODY_COLOURS[1]  # the neck at (64, 60) on the 128 px canvas
    assert image.sum() > 0
    assert np.asarray(draw_openpose(64, 64, [None] * 18)).sum() == 0


def _reference(tmp_path, size=(64, 64)):
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill="black")
    image.save(tmp_path / "ref.png")
    return tmp_path / "ref.png"


def test_canny_finds_the_edges_and_honours_thresholds(tmp_path):
    reference = Image.open(_reference(tmp_path))
    edges = np.asarray(canny_edges(reference, 100, 200))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[16, 20].tolist() == [255, 255, 255] or edges[15, 20].tolist() == [255, 255, 255]
    assert np.asarray(canny_edges(reference, 2000, 3000)).sum() == 0


def test_a_guide_image_of_the_wrong_size_is_resized_and_reported(tmp_path):
    _reference(tmp_path, size=(100, 80))
    rendered = render_guide(CannyGuide(type="canny", image="ref.png"), 64, 64, tmp_path)
    assert rendered.image.size == (64, 64)
    assert rendered.notes == ["canny reference ref.png is 100x80, resized to the frame's 64x64"]
    ready = render_guide(ImageGuide(type="image", image="ref.png", controlnet="depth"), 128, 64, tmp_path)
    assert ready.image.size == (128, 64) and ready.task == "depth" and ready.notes


def test_model_guides_without_weights_say_what_to_do(tmp_path):
    _reference(tmp_path)
    with pytest.raises(KstoryError, match="needs a local depth model"):
        render_guide(DepthGuide(type="depth", image="ref.png"), 64, 64, tmp_path)
    with pytest.raises(KstoryError, match="OpenPose detector"):
        render_guide(PoseGuide(type="pose", image="ref.png"), 64, 64, tmp_path)
    with pytest.raises(KstoryError, match="not found"):
        render_guide(CannyGuide(type="canny", image="missing.png"), 64, 64, tmp_path)
