"""U-DiffusionNFT training of SD3 / SD3.5 + LoRA with dense reward maps.

    torchrun --nproc_per_node=8 scripts/train_u_nft_sd3.py --config config/u_nft.py:sd3_ocr_map
    python scripts/train_u_nft_sd3.py --config config/u_nft.py:tiny            # CPU, offline tiny model
    ... --config.train.beta=0.1 --config.resume_from=runs/sd3_ocr_map           # overrides, resume

The trainer of scripts/train_u_nft.py (which serves every model family, read from the pipeline's
model_index.json) under its SD3 name: same flags, default config and outputs. Each epoch: sample (old
policy) -> score (reward maps) -> normalize (per prompt group, all ranks) -> train (dense U-NFT loss)
-> update the old policy -> save -> evaluate. Failure behaviour: docs/reliability.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_u_nft import run  # noqa: E402  (defines --config and --stop_after_epochs)

if __name__ == "__main__":
    run()
