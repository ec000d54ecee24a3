"""A small procedural "style" dataset, so prep can be tested and benchmarked offline.

Every clean picture is a flat-colour illustration (thick outlines, pastel sky,
one simple character next to a tree or a house) with a caption that describes
it; the look is consistent enough to stand in for a LoRA style set.  With
``defects=True`` the folder also holds one sample for every problem the recipe
and the pre-checks must catch; :data:`DEFECTS` says which file is which and
what should drop it, and :data:`KEPT_FAITHFULLY` lists the unusual inputs
that must be kept but read with care (16-bit pictures, invisible characters
in a caption).
"""

from __future__ import annotations

import csv
import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kstory.core.errors import KstoryError

OUTLINE = (40, 34, 48)
SKIES = {
    "morning": (170, 214, 238),
    "sunset": (246, 178, 142),
    "night": (58, 66, 120),
}
GROUNDS = [(134, 196, 120), (214, 196, 140), (120, 170, 150)]
CHARACTERS = {
    "cat": (250, 170, 80),
    "fox": (226, 110, 60),
    "robot": (170, 180, 196),
    "girl": (240, 140, 170),
    "frog": (110, 190, 90),
}
ACTIONS = ["waving", "standing", "smiling", "looking up"]
PROPS = ["tree", "house"]
SIZES = [(512, 512), (576, 512), (512, 576), (640, 512), (512, 640)]

# (scale, resampling, format, quality) tried in order for the near-duplicate.
NEAR_DUPLICATE_VARIANTS = [
    (1.25, Image.Resampling.LANCZOS, "JPEG", 90),
    (2.0, Image.Resampling.NEAREST, "JPEG", 95),
    (1.5, Image.Resampling.BICUBIC, "JPEG", 95),
    (1.25, Image.Resampling.LANCZOS, "WEBP", 90),
]
# file name -> what must drop it (a pre-check reason or a Data-Juicer op).
DEFECTS: dict[str, str] = {
    "small.png": "image_shape_filter",
    "wide.png": "image_aspect_ratio_filter",
    "tall.jpg": "image_aspect_ratio_filter",
    "blank.png": "image_size_filter",
    "spam_caption.png": "text_length_filter",
    "copy_of_0000.png": "image_deduplicator",
    "resized_0001.jpg": "image_deduplicator",
    "truncated.jpg": "corrupt_image",
    "notes.png": "not_an_image",
    "huge.png": "too_many_pixels",
    "no_caption.png": "missing_caption",
    "empty_caption.png": "empty_caption",
    "extra/sample_0002.png": "duplicate_name",
    "../outside.png": "path_outside_dataset",
    "/absolute/outside.png": "path_outside_dataset",
    "invisible_caption.png": "empty_caption",
}
# file name -> how prep must read it to keep it as it is meant.
KEPT_FAITHFULLY: dict[str, str] = {
    "deep_grey.png": "16-bit grey PNG (Pillow mode I;16): scaled to 8 bits as round(v * 255 / 65535)",
    "deep_rgb.png": "16-bit RGB PNG: Pillow reads it as 8-bit RGB, keeping the high byte (v >> 8)",
    "bidi_caption.png": "caption wrapped in a BOM and a right-to-left override: both removed, noted in caption_cleaned",
}
# Invisible characters around the caption of bidi_caption.png, and the whole caption of invisible_caption.png.
BIDI_WRAP = ("\ufeff\u202e", "\u202c")
INVISIBLE_CAPTION = "\u202e\ufeff\u200f"
# defect file name -> the clean sample it duplicates.
DUPLICATE_OF = {
    "copy_of_0000.png": "sample_0000.png",
    "resized_0001.jpg": "sample_0001.jpg",
    "extra/sample_0002.png": "sample_0002.png",
}
# How the first clean samples' captions are messed up (markup, links, odd whitespace); cleaning must undo it.
MESSY_CAPTIONS = 3


def clean_name(index: int) -> str:
    """File name of clean sample ``index`` (every third one is a JPEG, the rest PNG)."""
    return f"sample_{index:04d}.{'jpg' if index % 3 == 1 else 'png'}"


def make_style_dataset(folder: Path, n: int = 24, seed: int = 0, *, defects: bool = True, scale: float = 1.0) -> Path:
    """Write ``n`` clean captioned pictures (plus the :data:`DEFECTS` when asked) and a metadata.csv.

    Clean pictures are 512-640 px times ``scale`` (2.0 gives Kolors' ~1024 px
    training size, for benchmarks).  The same arguments always give
    byte-identical files.  ``folder`` must not exist or be empty, so a typo
    never mixes the set into real data.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise KstoryError("folder is not empty", path=folder, fix="pass a new or empty folder")
    if defects and n < 3:
        raise KstoryError("the defects need at least 3 clean samples to copy", fix="use n >= 3")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for index in range(n):
        width, height = rng.choice(SIZES)
        image, caption = _scene(rng, (round(width * scale), round(height * scale)))
        name = clean_name(index)
        _save(image, folder / name)
        rows.append((name, _messy(caption, index) if defects and index < MESSY_CAPTIONS else caption))
    if defects:
        rows += _write_defects(folder, rng)
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)
    return folder


def _scene(rng: random.Random, size: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """Draw one flat-colour scene (sky, sun, hill, 1-3 props, one character) and describe it."""
    width, height = size or rng.choice(SIZES)
    sky_name = rng.choice(list(SKIES))
    character = rng.choice(list(CHARACTERS))
    action = rng.choice(ACTIONS)
    prop = rng.choice(PROPS)
    sky = tuple(min(255, max(0, c + rng.randint(-24, 24))) for c in SKIES[sky_name])
    image = Image.new("RGB", (width, height), sky)
    draw = ImageDraw.Draw(image)
    line = max(3, width // 120)
    for band in range(6):  # flat sky bands: the style's only shading
        draw.rectangle(
            [0, band * height // 10, width, (band + 1) * height // 10], fill=tuple(max(0, c - band * 6) for c in sky)
        )
    for _ in range(rng.randint(0, 3)):
        cx, cy, cr = rng.randint(0, width), rng.randint(0, height // 3), rng.randint(width // 20, width // 8)
        draw.ellipse([cx - 2 * cr, cy - cr, cx + 2 * cr, cy + cr], fill=(246, 246, 250), outline=OUTLINE, width=line)
    sun = (255, 236, 150) if sky_name != "night" else (236, 236, 250)
    sx, sy, sr = rng.randint(0, width), rng.randint(height // 12, height // 3), rng.randint(width // 16, width // 8)
    draw.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=sun, outline=OUTLINE, width=line)
    horizon = int(height * rng.uniform(0.5, 0.8))
    hill_x = rng.randint(-width // 2, width // 2)
    draw.ellipse(
        [hill_x - width, horizon - height // 8, hill_x + 2 * width, height * 2],
        fill=rng.choice(GROUNDS),
        outline=OUTLINE,
        width=line,
    )
    for _ in range(rng.randint(1, 3)):
        _draw_prop(draw, prop, rng.randint(0, width), horizon, int(height * rng.uniform(0.12, 0.3)), line, rng)
    unit = int(height * rng.uniform(0.07, 0.16))
    _draw_character(
        draw,
        character,
        rng.randint(width // 8, width * 7 // 8),
        horizon + rng.randint(0, height // 8),
        unit,
        line,
        action,
    )
    caption = f"a flat-colour illustration of a {character} {action} next to a {prop}, {sky_name} sky"
    return image, caption


def _messy(caption: str, variant: int) -> str:
    """``caption`` wrapped in HTML, links and odd whitespace that the recipe's mappers remove again."""
    head, _, last = caption.rpartition(" ")
    if variant == 0:
        return "  " + head.replace(" ", " \t ", 1) + f" <b>{last}</b> \n"
    if variant == 1:
        return f"{head} <a href='https://example.com/x'>{last}</a> https://cdn.example.com/img.png"
    return caption.replace(" ", "&nbsp;", 1).replace(" ", "   ", 1) + "   "


def _draw_prop(
    draw: ImageDraw.ImageDraw, prop: str, x: int, ground: int, scale: int, line: int, rng: random.Random
) -> None:
    if prop == "tree":
        draw.rectangle(
            [x - scale // 8, ground - scale, x + scale // 8, ground + scale // 4],
            fill=(130, 90, 60),
            outline=OUTLINE,
            width=line,
        )
        crown = (70, 150, 90) if rng.random() < 0.5 else (90, 170, 70)
        draw.ellipse(
            [x - scale // 2, ground - 2 * scale, x + scale // 2, ground - scale // 2],
            fill=crown,
            outline=OUTLINE,
            width=line,
        )
    else:
        wall = rng.choice([(236, 220, 190), (220, 200, 230), (200, 226, 236)])
        draw.rectangle(
            [x - scale // 2, ground - scale, x + scale // 2, ground + scale // 4],
            fill=wall,
            outline=OUTLINE,
            width=line,
        )
        roof = [
            (x - scale * 2 // 3, ground - scale),
            (x, ground - scale * 7 // 4),
            (x + scale * 2 // 3, ground - scale),
        ]
        draw.polygon(roof, fill=(200, 90, 80), outline=OUTLINE, width=line)
        draw.rectangle(
            [x - scale // 8, ground - scale // 3, x + scale // 8, ground + scale // 4],
            fill=(120, 80, 60),
            outline=OUTLINE,
            width=line,
        )


def _draw_character(
    draw: ImageDraw.ImageDraw, character: str, x: int, ground: int, unit: int, line: int, action: str
) -> None:
    colour = CHARACTERS[character]
    body_top = ground - unit * 2
    draw.rounded_rectangle(
        [x - unit // 2, body_top, x + unit // 2, ground + unit // 3],
        radius=unit // 4,
        fill=colour,
        outline=OUTLINE,
        width=line,
    )
    head_y = body_top - unit // 2
    if character in ("cat", "fox"):
        for side in (-1, 1):
            ear_x = x + side * unit // 2
            draw.polygon(
                [
                    (ear_x - unit // 4, head_y - unit // 3),
                    (ear_x, head_y - unit),
                    (ear_x + unit // 4, head_y - unit // 3),
                ],
                fill=colour,
                outline=OUTLINE,
                width=line,
            )
    if character == "robot":
        draw.rectangle(
            [x - unit * 2 // 3, head_y - unit * 2 // 3, x + unit * 2 // 3, head_y + unit // 2],
            fill=colour,
            outline=OUTLINE,
            width=line,
        )
        draw.line([x, head_y - unit * 2 // 3, x, head_y - unit], fill=OUTLINE, width=line)
    else:
        draw.ellipse(
            [x - unit * 2 // 3, head_y - unit * 2 // 3, x + unit * 2 // 3, head_y + unit * 2 // 3],
            fill=colour,
            outline=OUTLINE,
            width=line,
        )
    eye = max(2, unit // 10)
    look = -unit // 6 if action == "looking up" else 0
    for side in (-1, 1):
        ex = x + side * unit // 4
        draw.ellipse([ex - eye, head_y + look - eye, ex + eye, head_y + look + eye], fill=OUTLINE)
    if action in ("smiling", "waving"):
        draw.arc([x - unit // 4, head_y, x + unit // 4, head_y + unit // 3], 20, 160, fill=OUTLINE, width=line)
    if action == "waving":
        draw.line([x + unit // 2, body_top + unit // 3, x + unit, body_top - unit // 2], fill=OUTLINE, width=line * 2)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        image.save(path, format="JPEG", quality=92)
    else:
        image.save(path, format="PNG")


def _write_defects(folder: Path, rng: random.Random) -> list[tuple[str, str]]:
    """Write one file per :data:`DEFECTS` entry; return the metadata rows they need."""

    def scene(size: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
        return _scene(rng, size)

    rows: list[tuple[str, str]] = []
    for name, size in (("small.png", (200, 150)), ("wide.png", (1536, 512)), ("tall.jpg", (512, 1280))):
        image, caption = scene(size)
        _save(image, folder / name)
        rows.append((name, caption))
    _save(Image.new("RGB", (512, 512), SKIES["morning"]), folder / "blank.png")
    rows.append(("blank.png", "a flat-colour illustration of an empty morning sky"))
    image, _ = scene()
    _save(image, folder / "spam_caption.png")
    rows.append(("spam_caption.png", "<p><a href='http://spam.example.com'>http://spam.example.com</a></p>"))

    (folder / "copy_of_0000.png").write_bytes((folder / clean_name(0)).read_bytes())
    rows.append(("copy_of_0000.png", "a copy of the first picture"))
    (folder / "resized_0001.jpg").write_bytes(_near_duplicate(Image.open(folder / clean_name(1)).convert("RGB")))
    rows.append(("resized_0001.jpg", "an enlarged, re-encoded copy of the second picture"))

    image, caption = scene()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    rows.append(("truncated.jpg", caption))
    (folder / "notes.png").write_text("remember to re-caption the night scenes\n", encoding="utf-8")
    rows.append(("notes.png", "not a picture at all"))
    (folder / "huge.png").write_bytes(_bomb_png(20_000, 20_000))
    rows.append(("huge.png", "a picture far too large to decode safely"))

    image, _ = scene()
    _save(image, folder / "no_caption.png")
    image, _ = scene()
    _save(image, folder / "empty_caption.png")
    rows.append(("empty_caption.png", "  \t "))
    image, caption = scene()
    _save(image, folder / "extra" / "sample_0002.png")
    rows.append(("extra/sample_0002.png", caption))
    rows += [
        ("../outside.png", "a picture outside the dataset folder, never to be read"),
        ("/absolute/outside.png", "a picture named by an absolute path, never to be read"),
    ]
    image, _ = scene()
    _save(image, folder / "invisible_caption.png")
    rows.append(("invisible_caption.png", INVISIBLE_CAPTION))
    return rows + _write_faithful(folder, rng)


def _write_faithful(folder: Path, rng: random.Random) -> list[tuple[str, str]]:
    """Write the :data:`KEPT_FAITHFULLY` files; return their metadata rows.

    The 16-bit pictures are 8-bit scenes times 257 plus noise of at most
    +-128, so every low byte is used and rounding back to 8 bits gives the
    scene again (for grey) while clamping would give white.
    """
    import cv2  # OpenCV writes 16-bit RGB PNGs, which Pillow cannot

    noise = np.random.default_rng(rng.randrange(2**32))
    rows = []
    image, caption = _scene(rng)
    grey = np.asarray(image.convert("L")).astype(np.int32) * 257
    deep = np.clip(grey + noise.integers(-128, 129, grey.shape), 0, 65535).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep_grey.png", format="PNG")  # Pillow writes uint16 as I;16
    rows.append(("deep_grey.png", f"{caption}, in grey"))
    image, caption = _scene(rng)
    rgb = np.asarray(image).astype(np.int32) * 257
    deep = np.clip(rgb + noise.integers(-128, 129, rgb.shape), 0, 65535).astype(np.uint16)
    if not cv2.imwrite(str(folder / "deep_rgb.png"), np.ascontiguousarray(deep[:, :, ::-1])):  # OpenCV wants BGR
        raise KstoryError("OpenCV could not write a 16-bit PNG", path=folder / "deep_rgb.png", fix="check the disk")
    rows.append(("deep_rgb.png", caption))
    image, caption = _scene(rng)
    _save(image, folder / "bidi_caption.png")
    rows.append(("bidi_caption.png", f"{BIDI_WRAP[0]}{caption}{BIDI_WRAP[1]}"))
    return rows


def _near_duplicate(original: Image.Image) -> bytes:
    """Enlarge and re-encode ``original`` so that its perceptual hash stays the same.

    Data-Juicer's image_deduplicator matches perceptual hashes exactly, and on
    flat-colour pictures a re-encode can flip one hash bit; so try a few
    enlargements/encodings in a fixed order and keep the first whose hash
    matches: the defect is then a near-duplicate that op is meant to catch.
    """
    from imagededup.methods import PHash  # torch-heavy; only the defect set needs it

    hasher = PHash()
    target = hasher.encode_image(image_array=np.asarray(original))
    for scale, resample, fmt, quality in NEAR_DUPLICATE_VARIANTS:
        copy = original.resize((int(original.width * scale), int(original.height * scale)), resample)
        buffer = io.BytesIO()
        copy.save(buffer, format=fmt, quality=quality)
        data = buffer.getvalue()
        if hasher.encode_image(image_array=np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))) == target:
            return data
    raise KstoryError("no re-encoded copy of sample 1 keeps its perceptual hash for this seed", fix="use another seed")


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: tiny on disk, huge once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
