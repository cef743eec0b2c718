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


# T5 ---------------------------------------------------------------------------------------------
# The real T5 tokenizer is a SentencePiece Unigram model (32,000 pieces + 100 sentinel ids); none can
# be downloaded here, so a small Unigram model is trained offline on the text below. Only the vocab
# size differs from T5's: the special ids (pad 0, eos 1, unk 2), the "▁" word boundary, the trailing
# eos and the <extra_id_*> sentinels follow T5's conventions, so the pipeline code path is the real one.
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_EXTRA_IDS = 100
_T5_TRAINING_TEXT = (
    "a photo of a cat sitting on a red chair next to a wooden table",
    "a painting of a blue house under a starry night sky, oil on canvas",
    "two dogs and three birds in a green park with tall trees",
    "a sign that says \"hello world\" written in bold black letters",
    "an astronaut riding a horse on the moon, digital art, highly detailed",
    "a bowl of fruit: apples, bananas, oranges and grapes on a white plate",
    "a city street at night with cars, lights, people and umbrellas in the rain",
    "a small yellow boat on a calm lake surrounded by mountains and snow",
    "a close-up portrait of an old man with a grey beard, studio lighting",
    "a purple flower in a glass vase on the left of a brown book",
    "a watercolor of a pink bicycle below a clock and above a bench",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
)


def write_t5_tokenizer(directory: str | os.PathLike, vocab_size: int = 400) -> Path:
    """Train a small SentencePiece-style Unigram model offline and save it as a ``T5TokenizerFast``.

    Writes ``tokenizer.json`` (the ``tokenizers`` model: NFKC normalisation, "▁" Metaspace
    pre-tokenisation, ``$A </s>`` post-processing) and ``tokenizer_config.json``; returns the directory.
    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then up to ``vocab_size - 3`` learnt pieces, then the
    :data:`T5_EXTRA_IDS` sentinels ``<extra_id_0>`` ... Deterministic: the same files on every call.
    Loads with ``T5TokenizerFast.from_pretrained(directory)`` (transformers 4.x and 5.x).
    """
    from tokenizers import AddedToken, models, processors
    from tokenizers.implementations import SentencePieceUnigramTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(list(_T5_TRAINING_TEXT), vocab_size=vocab_size, show_progress=False,
                                special_tokens=[T5_PAD, T5_EOS, T5_UNK], unk_token=T5_UNK)
    backend = unigram._tokenizer
    # The trainer's parallel reductions leave the last bits of the piece scores (and the order of tied
    # pieces) run-dependent: rounded scores, and learnt pieces sorted by (score desc, piece) after the
    # three specials, make the file (ids and tokenisation) identical on every build.
    trained = json.loads(backend.to_str())["model"]
    specials, learnt = trained["vocab"][:3], trained["vocab"][3:]
    learnt = sorted(((piece, round(score, 6)) for piece, score in learnt), key=lambda ps: (-ps[1], ps[0]))
    backend.model = models.Unigram([tuple(ps) for ps in specials] + learnt, trained["unk_id"], False)
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    eos_id = backend.token_to_id(T5_EOS)
    if (backend.token_to_id(T5_PAD), eos_id, backend.token_to_id(T5_UNK)) != (0, 1, 2):
        raise RuntimeError("write_t5_tokenizer: special tokens did not get T5's ids pad 0, eos 1, unk 2")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, eos_id)])
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 512,
        "eos_token": T5_EOS,
        "unk_token": T5_UNK,
        "pad_token": T5_PAD,
        "extra_ids": T5_EXTRA_IDS,
        "additional_special_tokens": extra,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": T5_EOS, "unk_token": T5_UNK, "pad_token": T5_PAD,
                    "additional_special_tokens": extra}), encoding="utf-8")
    return directory
