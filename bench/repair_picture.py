"""The before/after picture of docs/story.md ("Repairing one frame"): frame 1 of the demo, inpainted in a box.

    python bench/repair_picture.py            # writes docs/images/repair-before-after.png

The demo story is made (tiny Kolors, random weights, the demo's
ControlNets and character reference), then ``kstory inpaint`` repaints a box of it with
latent blending and with the tiny Kolors-Inpainting UNet. The picture shows,
left to right: before, the mask over it, after blending, after the inpainting
UNet. The weights are random, so the content means nothing; what it shows is
that outside the mask (and its feathered edge) the frame is unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kstory  # noqa: E402,F401  (before anything that imports torchvision/diffsynth)

TARGET = Path(__file__).resolve().parent.parent / "docs" / "images" / "repair-before-after.png"
SIZE = 128


def _overlay(frame, mask):
    from PIL import Image

    red = Image.new("RGB", frame.size, (220, 40, 40))
    return Image.composite(Image.blend(frame, red, 0.6), frame, mask)


def main() -> None:
    from PIL import Image, ImageDraw

    import kstory.story as story
    from kstory.core.atomic import write_bytes
    from kstory.story.demo import make_demo_spec
    from kstory.story.manifest import png_bytes
    from kstory.story.repair_frame import repair_frame

    with tempfile.TemporaryDirectory(prefix="kstory-repair-picture-") as tmp:
        root = Path(tmp)
        tiny = story.build_tiny_controlnets()
        spec = make_demo_spec(root / "inputs" / "story.yaml", "kstory style", size=SIZE)
        story.generate_story(spec, root / "run" / "story", model="tiny",
                             controlnets={"pose": tiny["pose"], "union": tiny["union"]})
        out = root / "run" / "story"
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).rectangle((SIZE // 4, SIZE // 8, SIZE * 3 // 4 - 1, SIZE // 2 - 1), fill=255)
        mask.save(root / "mask.png")
        before = Image.open(out / "frames/01.png").convert("RGB")
        nets = {"pose": tiny["pose"], "union": tiny["union"]}
        blended_dir = root / "blend" / "story"
        shutil.copytree(out, blended_dir)
        repair_frame(blended_dir, 1, kind="inpaint", strength=1.0, seed=7, mask=root / "mask.png", feather=6,
                     controlnets=nets)
        repair_frame(out, 1, kind="inpaint", strength=1.0, seed=7, mask=root / "mask.png", feather=6,
                     controlnets=nets, inpaint_model="tiny")
        panels = [before, _overlay(before, mask), Image.open(blended_dir / "frames/01.png").convert("RGB"),
                  Image.open(out / "frames/01.png").convert("RGB")]
    gap = 4
    sheet = Image.new("RGB", (len(panels) * SIZE + (len(panels) - 1) * gap, SIZE), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (SIZE + gap), 0))
    write_bytes(TARGET, png_bytes(sheet))
    print(f"wrote {TARGET.relative_to(TARGET.parent.parent.parent)} ({TARGET.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
