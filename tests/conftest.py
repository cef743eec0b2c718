"""Shared pytest setup: the `slow` marker, CPU threads, and the tiny SD3 pipeline built once per session."""
import os
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower tests (deselect with -m 'not slow')")
    # Tiny models are dominated by per-op threading overhead; on a shared CPU one thread is several
    # times faster. U_NFT_TEST_THREADS overrides it (e.g. on a machine of your own).
    import torch

    torch.set_num_threads(int(os.environ.get("U_NFT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """Directory of a random-weight SD3 pipeline (u_nft.tiny_sd3); U_NFT_TINY_SD3_DIR keeps one across runs."""
    from u_nft.tiny_sd3 import build_tiny_sd3_pipeline

    target = os.environ.get("U_NFT_TINY_SD3_DIR") or tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    return build_tiny_sd3_pipeline(target, seed=0)
