"""U-DiffusionNFT: online RL of text-to-image flow models with dense reward maps."""
from setuptools import find_packages, setup

setup(
    name="u-diffusionnft",
    version="0.1.0",
    description="DiffusionNFT with dense reward maps (a location variable U) for SD3.5 + LoRA",
    packages=find_packages(include=["u_nft", "u_nft.*", "reward_maps", "reward_maps.*"]),
    python_requires=">=3.10",
    # torch is not pinned here: GPU machines bring their CUDA build; scripts/setup.sh installs
    # the CPU build 2.13.0 on machines without a GPU. torchvision is deliberately absent.
    # The lower bounds of transformers / diffusers / peft / accelerate / numpy are tested in CI
    # (scripts/ci_lowest_versions.sh); README "Supported versions".
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.33",
        "transformers>=4.46",
        "peft>=0.15",
        "accelerate>=1.0",
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "wandb>=0.17",
        "numpy>=1.26",
        "pillow>=10.0",
        # heatmap colour maps / colour bars written by every run, and the study figures (u_nft/plotting.py)
        "matplotlib>=3.7",
        "safetensors>=0.4",
        "tqdm>=4.66",
    ],
    extras_require={
        # Levenshtein: python-Levenshtein's distance, the edit distance of the upstream OCR reward.
        "ocr": ["rapidocr-onnxruntime>=1.4", "pytesseract>=0.3.10", "Levenshtein>=0.21"],
        # transformers 4.x's Mask2Former (the GenEval detector) needs scipy at construction
        "geneval": ["scipy>=1.10"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6", "rapidocr-onnxruntime>=1.4", "pytesseract>=0.3.10", "Levenshtein>=0.21",
                 "scipy>=1.10"],
    },
)
