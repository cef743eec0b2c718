"""Convert HPS v2.1 (open_clip ViT-H-14) to a transformers CLIP folder for ``hps_map``.

    # HPS_v2.1_compressed.pt from the Hugging Face repo xswu/HPSv2 (tgxs002/HPSv2)
    python scripts/convert_hps_to_transformers.py --checkpoint HPS_v2.1_compressed.pt --out models/hps_v2.1

Then ``config.reward_options = {"hps_map": {"model": "models/hps_v2.1"}}``. Needs open-clip-torch installed
(``--no-deps`` is enough: only its model config JSON and BPE vocabulary are read).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_maps.base import RewardMapError  # noqa: E402
from reward_maps.open_clip_convert import convert_open_clip_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="open_clip checkpoint (.pt) with open_clip key names")
    parser.add_argument("--out", required=True, help="directory to save the transformers CLIPModel + tokenizer to")
    parser.add_argument("--model", default="ViT-H-14", help="open_clip model config name (HPS v2.1: ViT-H-14)")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        out = convert_open_clip_checkpoint(args.checkpoint, args.out, args.model)
    except RewardMapError as err:
        sys.exit(f"convert_hps_to_transformers: {err}")
    print(f"converted {args.checkpoint} -> {out} in {time.perf_counter() - start:.1f} s; use it as hps_map option model={str(out)!r}")


if __name__ == "__main__":
    main()
