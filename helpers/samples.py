"""Generate the bundled sample images: small WebDataset shards shaped like BLIP3o's.

The offline preset reads these with the same `read_webdataset` call the full run uses on the
Hugging Face shards. The pictures are drawn here from a fixed seed (simple scenes: sky, sun,
houses, trees, boats), so they carry no licence terms. Each sample holds `<key>.jpg` and
`<key>.txt` (a reference caption that says what was drawn).

    python -m helpers.samples [OUT_DIR]    # rewrites data/sample_shards/
"""

from __future__ import annotations

import io
import random
import sys
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from helpers.data import SAMPLE_SHARDS

NUM_SHARDS = 2
IMAGES_PER_SHARD = 12
SIZE = (320, 240)

SKIES = {"day": (135, 195, 235), "dusk": (240, 150, 110), "night": (25, 30, 70)}
GROUNDS = {"grass": (80, 160, 70), "sand": (225, 200, 140), "snow": (240, 245, 250), "sea": (40, 90, 170)}
COLOURS = {
    "red": (200, 40, 40),
    "blue": (40, 70, 200),
    "yellow": (235, 200, 40),
    "white": (250, 250, 250),
    "orange": (240, 130, 30),
    "purple": (120, 60, 160),
}


def draw_scene(rng: random.Random) -> tuple[Image.Image, str]:
    sky_name, sky = rng.choice(list(SKIES.items()))
    ground_name, ground = rng.choice(list(GROUNDS.items()))
    w, h = SIZE
    horizon = rng.randint(h // 2, 3 * h // 4)
    image = Image.new("RGB", SIZE, sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, horizon, w, h], fill=ground)
    things = []
    cx, cy, r = rng.randint(30, w - 30), rng.randint(15, horizon // 2), rng.randint(12, 24)
    draw.ellipse(
        [cx - r, cy - r, cx + r, cy + r], fill=(245, 245, 210) if sky_name == "night" else (250, 215, 60)
    )
    things.append("a moon" if sky_name == "night" else "the sun")
    kind = "boat" if ground_name == "sea" else rng.choice(["house", "tree", "house and a tree"])
    colour_name, colour = rng.choice(list(COLOURS.items()))
    x = rng.randint(40, w - 120)
    if kind == "boat":
        draw.polygon(
            [(x, horizon + 20), (x + 90, horizon + 20), (x + 70, horizon + 40), (x + 20, horizon + 40)],
            fill=colour,
        )
        draw.polygon(
            [(x + 45, horizon - 40), (x + 45, horizon + 18), (x + 85, horizon + 18)], fill=(250, 250, 250)
        )
        things.append(f"a {colour_name} sailing boat")
    if "house" in kind:
        draw.rectangle([x, horizon - 50, x + 70, horizon + 5], fill=colour)
        draw.polygon(
            [(x - 8, horizon - 50), (x + 35, horizon - 85), (x + 78, horizon - 50)], fill=(120, 50, 40)
        )
        draw.rectangle([x + 28, horizon - 25, x + 44, horizon + 5], fill=(70, 45, 30))
        things.append(f"a {colour_name} house")
    if "tree" in kind:
        tx = min(w - 30, x + 100)
        draw.rectangle([tx - 5, horizon - 40, tx + 5, horizon + 5], fill=(100, 70, 40))
        draw.ellipse([tx - 28, horizon - 95, tx + 28, horizon - 30], fill=(40, 120, 50))
        things.append("a tree")
    caption = f"A drawing of {', '.join(things)} under a {sky_name} sky, with {ground_name} below."
    return image, caption


def write_sample_shards(out_dir: str = SAMPLE_SHARDS, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(NUM_SHARDS):
        path = out / f"samples-{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(IMAGES_PER_SHARD):
                key = f"{shard:05d}{i:04d}"
                image, caption = draw_scene(rng)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=85)
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


if __name__ == "__main__":
    for p in write_sample_shards(*sys.argv[1:2]):
        print(p)
