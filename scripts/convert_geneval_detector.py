"""Convert GenEval's mmdet Mask2Former checkpoint into a transformers folder for ``geneval_map`` (no mmcv needed).

    wget https://download.openmmlab.com/mmdetection/v2.0/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth
    python scripts/convert_geneval_detector.py \
        --mmdet_ckpt mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth --out models/geneval_mask2former

Then ``config.reward_options = {"geneval_map": {"detector": "models/geneval_mask2former"}}``. The mapping
is documented in ``reward_maps/mmdet_convert.py``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_maps.mmdet_convert import MmdetConversionError, convert_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mmdet_ckpt", required=True, help="mmdet 2.x Mask2Former .pth (GenEval's detector)")
    parser.add_argument("--out", required=True, help="directory to save the transformers model to")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="load the .pth with full unpickling (only for a file you trust)")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        report = convert_checkpoint(args.mmdet_ckpt, args.out, trust_pickle=args.trust_pickle)
    except MmdetConversionError as err:
        sys.exit(f"convert_geneval_detector: {err}")
    print(json.dumps({"out": report["out_dir"], "architecture": report["arch"],
                      "mmdet keys not converted": len(report["not_converted"]),
                      "transformers keys kept at initialisation": report["kept_initialisation"]}, indent=1))
    print(f"converted in {time.perf_counter() - start:.1f} s; use it as geneval_map option detector={report['out_dir']!r}")


if __name__ == "__main__":
    main()
