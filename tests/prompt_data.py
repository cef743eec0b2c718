"""Where the tests read the benchmark prompt sets (OCR, PickScore, DrawBench, GenEval metadata).

By default: the small fixtures shipped in ``tests/fixtures/prompts/`` (written for these tests in the public
sets' formats, so a clone runs the whole suite). ``U_NFT_DATA=/path/to/dataset`` runs the same tests on
the full public sets instead (Flow-GRPO's ``dataset/`` folder layout: ``ocr/test.txt``,
``pickscore/test.txt``, ``drawbench/test.txt``, ``geneval/test_metadata.jsonl``), and the tests that
check the public sets' exact sizes then run too.
"""
import os
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "prompts"
ENV_VAR = "U_NFT_DATA"


def data_root() -> Path:
    """$U_NFT_DATA if set (it must exist), else the shipped fixtures."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return FIXTURES
    root = Path(value).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{ENV_VAR}={value}: no such directory (unset it to use {FIXTURES})")
    return root


def full_public_sets() -> bool:
    """True when the tests read the full public sets ($U_NFT_DATA), not the fixtures."""
    return bool(os.environ.get(ENV_VAR))
