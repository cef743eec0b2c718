"""Tiny random-weight models built offline, so every real loading path can run without a hub.

The CLIP tokenizer is the real CLIP BPE (49,408 tokens): its merges ship inside the
``open-clip-torch`` wheel as ``bpe_simple_vocab_16e6.txt.gz`` (install it with ``--no-deps``).
A byte-level fallback (256 byte tokens, no merges) is written when that file is absent, so
tests still run; prompts then tokenize to more, shorter tokens.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
_CLIP_MERGES = 49152 - 256 - 2  # merges used by CLIP's tokenizer (the file has more)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _open_clip_bpe_path() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.exists() else None


def write_clip_tokenizer(directory: str | os.PathLike) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and tokenizer configs loadable by ``CLIPTokenizer``.

    Returns the directory. Uses the real CLIP BPE when open-clip-torch is installed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    bpe_path = _open_clip_bpe_path()
    if bpe_path is not None:
        lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _CLIP_MERGES + 1]]
    else:
        merges = []
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}), encoding="utf-8"
    )
    return directory


def tiny_clip_text_config(vocab_size: int, eos_token_id: int, hidden_size: int = 32, projection_dim: int = 32,
                          num_layers: int = 2, num_heads: int = 2):
    """A small ``CLIPTextConfig`` whose eos token id matches the tokenizer's."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, projection_dim=projection_dim,
        max_position_embeddings=77, eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1,
        pad_token_id=eos_token_id,
    )


def build_tiny_clip(directory: str | os.PathLike, image_size: int = 224, patch_size: int = 32,
                    hidden_size: int = 32, projection_dim: int = 32, seed: int = 0) -> Path:
    """Save a random-weight ``CLIPModel`` + ``CLIPProcessor`` (224 px, OpenAI normalisation).

    Loads with ``CLIPModel.from_pretrained(directory)`` and ``CLIPProcessor.from_pretrained(directory)``,
    the same calls the PickScore / CLIP scorers make for hub ids.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPVisionConfig

    directory = Path(directory)
    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    text_config = tiny_clip_text_config(len(tokenizer), tokenizer.eos_token_id, hidden_size, projection_dim)
    vision_config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=projection_dim,
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        resample=3, do_center_crop=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory
