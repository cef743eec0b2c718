"""CPU cost per 512 px image of the offline reward-map scorers (median of repeats, after a warm-up).

    python bench/scorer_costs.py [--repeats 3] [--batch 4] [--out docs/benchmarks.md]

Images are rendered text on noise (so OCR has work to do). Model-based scorers (GenEval, PickScore /
CLIP family) need weights users supply; they are timed on the GPU benchmark, not here.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import reward_maps

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
REGIONS = [{"box": [0.0, 0.0, 0.5, 1.0], "color": [1.0, 0.0, 0.0]}, {"box": [0.5, 0.0, 1.0, 1.0], "color": [0.0, 0.0, 1.0]}]
TEXTURE = [{"box": [0.0, 0.0, 0.5, 1.0], "texture": 1.0}, {"box": [0.5, 0.0, 1.0, 1.0], "texture": 0.0}]


def test_images(batch: int, size: int = 512) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for i in range(batch):
        canvas = Image.fromarray((rng.random((size, size, 3)) * 80 + 150).astype(np.uint8))
        font = ImageFont.truetype(FONT, 64) if os.path.exists(FONT) else ImageFont.load_default()
        ImageDraw.Draw(canvas).text((40, 200), f"Open {i}", fill=(20, 20, 20), font=font)
        images.append(torch.from_numpy(np.asarray(canvas)).permute(2, 0, 1).float() / 255)
        prompts.append(f'a sign that says "Open {i}"')
    return torch.stack(images), prompts


SCORERS = {
    "ocr_map": {},
    "ocr_map_tesseract": {},
    "jpeg_map": {},
    "region_color_map": {"regions": REGIONS},
    "region_texture_map": {"regions": TEXTURE},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default="", help="append a markdown table to this file")
    args = parser.parse_args()
    images, prompts = test_images(args.batch)
    rows = []
    for name, options in SCORERS.items():
        try:
            scorer = reward_maps.build_scorer(name, **options)
            scorer(images[:1], prompts[:1], [{}])  # warm-up (engine start, caches)
        except Exception as err:  # e.g. tesseract binary missing
            rows.append((name, f"unavailable: {err}".splitlines()[0][:80]))
            continue
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            scorer(images, prompts, [{}] * len(prompts))
            times.append((time.perf_counter() - start) / len(prompts))
        rows.append((name, f"{1000 * statistics.median(times):.0f} ms"))
    header = (f"\n### Reward scorers, CPU cost per 512 px image\n\n`python bench/scorer_costs.py --repeats {args.repeats} "
              f"--batch {args.batch}` on {platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{datetime.date.today().isoformat()} (batch of {args.batch}, median of {args.repeats}).\n\n"
              "| scorer | time per image |\n|---|---|\n")
    table = header + "".join(f"| `{name}` | {value} |\n" for name, value in rows)
    print(table)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(table)


if __name__ == "__main__":
    sys.exit(main())
