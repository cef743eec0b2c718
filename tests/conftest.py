"""Shared pytest setup: the `slow` marker, CPU threads, xdist workers, and the tiny pipelines built once per session
(per xdist worker)."""
import os
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower tests (deselect with -m 'not slow')")
    # Tiny models are dominated by per-op threading overhead; on a shared CPU one thread is several
    # times faster. U_NFT_TEST_THREADS overrides it (e.g. on a machine of your own).
    import torch

    torch.set_num_threads(int(os.environ.get("U_NFT_TEST_THREADS", "1")))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pytest.ini): one worker per usable CPU, at most 4 (each builds its own tiny pipelines
    and the 2-rank tests start two more processes); U_NFT_TEST_WORKERS overrides it (1 = in-process order)."""
    if "U_NFT_TEST_WORKERS" in os.environ:
        return int(os.environ["U_NFT_TEST_WORKERS"])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, 4))


def _tiny_build(tmp_path_factory, env_var: str, text_encoder_3: bool) -> Path:
    """The tiny SD3 build (seed 0, default pretraining) with or without T5. The directory named by
    ``env_var`` caches it across runs; one holding another build is left alone (a fresh one is made)."""
    from u_nft.tiny_sd3 import build_tiny_sd3_pipeline, matches_build

    cached = os.environ.get(env_var)
    if cached and (matches_build(cached, seed=0, pretrain_steps=400, text_encoder_3=text_encoder_3)
                   or not Path(cached).exists()):
        return build_tiny_sd3_pipeline(cached, seed=0, text_encoder_3=text_encoder_3)
    target = tmp_path_factory.mktemp("tiny_sd3_t5" if text_encoder_3 else "tiny_sd3_clip_only") / "pipeline"
    return build_tiny_sd3_pipeline(target, seed=0, text_encoder_3=text_encoder_3)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """The default tiny SD3 pipeline, three text encoders (u_nft.tiny_sd3); U_NFT_TINY_SD3_DIR keeps one across runs."""
    return _tiny_build(tmp_path_factory, "U_NFT_TINY_SD3_DIR", text_encoder_3=True)


@pytest.fixture(scope="session")
def tiny_sd3_clip_only_dir(tmp_path_factory) -> Path:
    """The two-encoder tiny SD3 pipeline (no T5); U_NFT_TINY_SD3_CLIP_ONLY_DIR keeps one across runs."""
    return _tiny_build(tmp_path_factory, "U_NFT_TINY_SD3_CLIP_ONLY_DIR", text_encoder_3=False)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """The tiny FLUX.1-dev-shaped pipeline (u_nft.tiny_flux, seed 0, default pretraining), built once per
    session; U_NFT_TINY_FLUX_DIR keeps one across runs (a folder holding another build is left alone)."""
    from u_nft.tiny_flux import build_tiny_flux_pipeline, matches_tiny_flux_build

    cached = os.environ.get("U_NFT_TINY_FLUX_DIR")
    if cached and (matches_tiny_flux_build(cached) or not Path(cached).exists()):
        return build_tiny_flux_pipeline(cached, seed=0)
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_image_dir(tmp_path_factory) -> Path:
    """The tiny Qwen-Image pipeline (u_nft.tiny_qwen_image, seed 0, default pretraining), built once per
    session; U_NFT_TINY_QWEN_IMAGE_DIR keeps one across runs (a folder holding another build is left alone).
    Skips where diffusers has no Qwen-Image (< 0.35, e.g. the lowest-versions CI step)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    if not hasattr(diffusers, "QwenImagePipeline") or not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"Qwen-Image needs diffusers >= 0.35 (have {diffusers.__version__})")
    from u_nft.tiny_qwen_image import build_tiny_qwen_image_pipeline, matches_tiny_qwen_image_build

    cached = os.environ.get("U_NFT_TINY_QWEN_IMAGE_DIR")
    if cached and (matches_tiny_qwen_image_build(cached) or not Path(cached).exists()):
        return build_tiny_qwen_image_pipeline(cached, seed=0)
    return build_tiny_qwen_image_pipeline(tmp_path_factory.mktemp("tiny_qwen_image") / "pipeline", seed=0)
