"""Build the tiny SD3 pipeline (no downloads) into a directory.

    python scripts/make_tiny_sd3.py --out runs/tiny_sd3

Then point ``config.pretrained.model`` at that directory.
"""
import argparse
import time

from u_nft.tiny_sd3 import build_tiny_sd3_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if --out holds a complete build")
    parser.add_argument("--pretrain_steps", type=int, default=400, help="flow-matching pretraining steps")
    parser.add_argument("--no_t5", action="store_true", help="the two-encoder build (no T5 text encoder)")
    args = parser.parse_args()
    start = time.perf_counter()
    path = build_tiny_sd3_pipeline(args.out, seed=args.seed, overwrite=args.overwrite,
                                   pretrain_steps=args.pretrain_steps, text_encoder_3=not args.no_t5)
    print(f"tiny SD3 pipeline at {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
