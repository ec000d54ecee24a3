"""OpenPose renders in the standard OpenPose/ControlNet colour scheme, from keypoints or the pose library.

The Kolors Pose ControlNet and the Union ControlNet were trained on images
drawn this way (black background, coloured limb ellipses, keypoint dots), so
the colours and the limb order are data that must match, not a style choice.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np
from PIL import Image

from kstory.story.spec import Keypoints, PoseGuide
from kstory.story.guides.pose_library import library_pose

# Body limbs as COCO-18 index pairs, in the standard drawing order; limb i uses BODY_COLOURS[i].
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
BODY_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# Hand: 21 points, 5 fingers of 4 bones from the wrist; bone i is coloured by hue i/20.
HAND_BONES = tuple(
    pair for finger in range(5) for pair in ((0 if j == 0 else 4 * finger + j, 4 * finger + j + 1) for j in range(4))
)
HAND_POINT_COLOUR = (0, 0, 255)
FACE_POINT_COLOUR = (255, 255, 255)
LIMB_DIM = 0.6  # limbs are drawn at 60 % of their keypoint colour
_REFERENCE_SIZE = 512  # stick width 4 and dot radius 4 are the values at 512 px

Points = list[tuple[float, float] | None]


def _triples(values: list[float] | None, scale_x: float, scale_y: float) -> Points:
    if not values:
        return []
    return [
        (values[k] * scale_x, values[k + 1] * scale_y) if values[k + 2] > 0 else None for k in range(0, len(values), 3)
    ]


def draw_openpose(
    width: int, height: int, body: Points, hands: list[Points] = (), face: Points = ()
) -> Image.Image:
    """Draw one person's keypoints (pixels; None = not visible) on a black ``width`` x ``height`` canvas."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    unit = max(1.0, min(width, height) / _REFERENCE_SIZE)
    stick, dot = max(1, round(4 * unit)), max(1, round(4 * unit))
    for (a, b), colour in zip(BODY_LIMBS, BODY_COLOURS):
        if a >= len(body) or b >= len(body) or body[a] is None or body[b] is None:
            continue
        (xa, ya), (xb, yb) = body[a], body[b]
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(yb - ya, xb - xa))
        centre = (int(round((xa + xb) / 2)), int(round((ya + yb) / 2)))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), stick), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, tuple(int(c * LIMB_DIM) for c in colour))
    for point, colour in zip(body, BODY_COLOURS):
        if point is not None:
            cv2.circle(canvas, (int(round(point[0])), int(round(point[1]))), dot, colour, thickness=-1)
    for hand in hands:
        for i, (a, b) in enumerate(HAND_BONES):
            if a < len(hand) and b < len(hand) and hand[a] is not None and hand[b] is not None:
                colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_BONES), 1.0, 1.0))
                start = (int(round(hand[a][0])), int(round(hand[a][1])))
                end = (int(round(hand[b][0])), int(round(hand[b][1])))
                cv2.line(canvas, start, end, colour, thickness=max(1, stick // 2))
        for point in hand:
            if point is not None:
                cv2.circle(canvas, (int(round(point[0])), int(round(point[1]))), dot, HAND_POINT_COLOUR, thickness=-1)
    for point in face:
        if point is not None:
            cv2.circle(canvas, (int(round(point[0])), int(round(point[1]))), max(1, dot - 1), FACE_POINT_COLOUR, -1)
    return Image.fromarray(canvas)


def render_keypoints(keypoints: Keypoints, width: int, height: int) -> Image.Image:
    """Every person of an OpenPose-format block, scaled from its canvas to the frame."""
    sx = width / (keypoints.canvas_width or width)
    sy = height / (keypoints.canvas_height or height)
    layers = []
    for person in keypoints.people:
        hands = [_triples(person.hand_left_keypoints_2d, sx, sy), _triples(person.hand_right_keypoints_2d, sx, sy)]
        layers.append(np.asarray(draw_openpose(
            width, height, _triples(person.pose_keypoints_2d, sx, sy), [h for h in hands if h],
            _triples(person.face_keypoints_2d, sx, sy),
        )))
    return Image.fromarray(np.maximum.reduce(layers))


def render_library_pose(name: str, width: int, height: int, flip: bool = False) -> Image.Image:
    body = [(p[0] * width, p[1] * height) if p is not None else None for p in library_pose(name, flip)]
    return draw_openpose(width, height, body)


def pose_from_guide(guide: PoseGuide, width: int, height: int) -> Image.Image:
    """The pose image of a guide given by library name or keypoints (reference photos go through detect)."""
    if guide.pose is not None:
        return render_library_pose(guide.pose, width, height, guide.flip)
    assert guide.keypoints is not None
    return render_keypoints(guide.keypoints, width, height)
