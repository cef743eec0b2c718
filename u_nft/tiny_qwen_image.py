"""A tiny random-weight ``QwenImagePipeline`` built offline (diffusers >= 0.35).

The tiny pipeline has Qwen-Image's structure at toy sizes, so every code path the trainer uses
(``from_pretrained``, the pipeline's templated ``encode_prompt``, PEFT LoRA, ``load_lora_weights``, the
video-VAE decode) is the real diffusers / transformers one:

- **tokenizer**: a byte-level BPE (``tokenizers``, trained offline on :data:`TOKENIZER_TEXT`) in the
  Qwen2 form (NFC, Qwen2's split regex, byte-level alphabet and decoder), saved as a ``Qwen2Tokenizer``
  with Qwen2.5-VL's special tokens (:data:`QWEN_SPECIAL_TOKENS`: ``<|endoftext|>`` pad, ``<|im_start|>``,
  ``<|im_end|>`` eos, the vision tokens ...). The training text holds the pipeline's prompt template, so
  its system part is exactly ``prompt_template_encode_start_idx`` (34) tokens, as with the real tokenizer
  (checked at build time), and the pipeline drops exactly the template;
- **text encoder**: ``Qwen2_5_VLForConditionalGeneration``, language model hidden 32 (2 layers, 2 heads of
  dim 16, 1 KV head, M-RoPE sections (2, 3, 3)) — the pipeline uses its last hidden states — and a
  one-block vision tower (hidden 16, patch 14, merge 2) so the model is complete and valid;
- **transformer**: ``QwenImageTransformer2DModel``, 2 blocks, 4 heads of dim 32, joint_attention_dim 32,
  RoPE axes (8, 12, 12), 64 packed input channels (16 latent channels x 2x2);
- **VAE**: ``AutoencoderKLQwenImage``, base dim 8, z_dim 16, x8 (three 2x upsamplings), with Qwen-Image's
  own per-channel ``latents_mean`` / ``latents_std`` (the diffusers defaults);
- **scheduler**: ``FlowMatchEulerDiscreteScheduler`` with Qwen/Qwen-Image's config (dynamic exponential
  shift, 256 -> 0.5 to 8192 -> 0.9, shift_terminal 0.02).

As for the tiny SD3 pipeline (u_nft/tiny_sd3.py), random weights alone are a poor stand-in for a
pretrained model, so the build makes two principled changes through the same code paths:

- a *transparent decoder*: identity convolutions, zeroed residual and attention branches, so the
  pipeline's latent channels 0-2 decode to RGB by nearest upsampling; its input conv undoes the per-channel
  de-normalisation (so a decode without it shows other colours). The video VAE's last RMS norm normalises
  each pixel's channel vector; a constant channel (:data:`DECODER_CONSTANT`) keeps it close to linear, and an
  offset puts SiLU in its near-linear range (:func:`make_decoder_transparent`);
- a short flow-matching *pretraining* of the transformer on synthetic latents whose quadrants carry random
  colours (:func:`pretrain_on_quadrants`, through the family adapter's own velocity call), so it samples a
  diverse distribution with spatial structure that RL can reweight.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from u_nft.tiny_sd3 import build_pipeline_directory, matches_build
from u_nft.tiny_sd3 import pretrain_on_quadrants as shared_pretrain_on_quadrants

KIND = "tiny_qwen_image"  # the build marker's kind (u_nft.tiny_sd3.build_pipeline_directory)
BUILD_VERSION = 1  # bump when the built weights change: the conftest fixture then builds a fresh one

# Qwen2.5-VL's special tokens in its id order (151643 ...), appended after the learnt BPE vocabulary.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# transformers' Qwen2Tokenizer pre-tokenisation (tokenization_qwen2.PRETOKENIZE_REGEX)
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# QwenImagePipeline.prompt_template_encode's system message (diffusers 0.35-0.42), repeated in the training text
# so the tokenizer learns its words whole, as Qwen2.5-VL's does (34 tokens up to the user turn).
TEMPLATE_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                   "relationships of the objects and background:")
TOKENIZER_TEXT = (
    TEMPLATE_SYSTEM, "system", "user", "assistant",
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
    "a red square in the centre of a picture, a picture of a cat, a house, a tree, a car, the sea",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
)
TOKENIZER_VOCAB_SIZE = 768  # learnt BPE entries (256 bytes + merges), before the special tokens

# Qwen/Qwen-Image scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                        time_shift_type="exponential")

TEXT_HIDDEN = 32  # = the transformer's joint_attention_dim
# Transformer width 4 x 32 = 128: wider than a 2x2 token's 64 channels, so noise passes through (at 2 x 16 the
# model could not even learn the noise channels' velocity). RoPE axes (frame, row, col) sum to the head dim.
TRANSFORMER_HEADS, TRANSFORMER_HEAD_DIM, TRANSFORMER_ROPE_AXES = 4, 32, (8, 12, 12)
LATENT_RANGE = 1.5  # pipeline latents z in [-1.5, 1.5] (channels 0-2) span the decoder's colour range
DECODER_CONSTANT = 16.0  # the transparent decoder's constant channel (keeps its last RMS norm near-linear)
DECODER_OFFSET = 2.0  # added to colour channels 0-2: inputs [-1, 1] become [1, 3], where SiLU is near-linear


def _silu(z: float) -> float:
    return z / (1.0 + math.exp(-z))


def _head_input(value: float) -> float:
    """What the head's SiLU sees for a grey decoder input ``value`` (all three colour channels equal)."""
    shifted = value + DECODER_OFFSET
    return shifted * DECODER_CONSTANT / math.sqrt(DECODER_CONSTANT ** 2 + 3 * shifted ** 2)


# The decoder's conv_out maps the SiLU outputs of grey inputs -1 and 1 to -1 and 1 (pixels 0 and 1).
OUTPUT_GAIN = 2.0 / (_silu(_head_input(1.0)) - _silu(_head_input(-1.0)))
OUTPUT_BIAS = -1.0 - OUTPUT_GAIN * _silu(_head_input(-1.0))


# ---- tokenizer ---------------------------------------------------------------------------------------

def write_qwen_tokenizer(directory: str | os.PathLike, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """Train a byte-level BPE offline and save it as a ``Qwen2Tokenizer`` folder; return the folder.

    Qwen2's normaliser (NFC), pre-tokeniser (its split regex, then byte-level without a prefix space) and
    byte-level decoder; ``vocab_size`` learnt entries (the 256 byte symbols first), then
    :data:`QWEN_SPECIAL_TOKENS`. Writes ``tokenizer.json``, ``vocab.json`` / ``merges.txt`` and
    ``tokenizer_config.json`` (pad ``<|endoftext|>``, eos ``<|im_end|>``, no bos, right padding).
    Deterministic: the same files on every call.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [TEMPLATE_SYSTEM] * 8 + list(TOKENIZER_TEXT)  # the template's words first and whole
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer.model.save(str(directory))  # vocab.json + merges.txt (the slow Qwen2Tokenizer of transformers 4.x)
    first_special = tokenizer.token_to_id(QWEN_SPECIAL_TOKENS[0])
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "padding_side": "right",
        "add_prefix_space": False,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "added_tokens_decoder": {
            str(first_special + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True}
            for i, token in enumerate(QWEN_SPECIAL_TOKENS)
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return directory


def offline_qwen_tokenizer():
    """The tiny ``Qwen2Tokenizer`` (:func:`write_qwen_tokenizer` into a temporary folder, then loaded)."""
    from transformers import Qwen2Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        return Qwen2Tokenizer.from_pretrained(write_qwen_tokenizer(folder))


# ---- components --------------------------------------------------------------------------------------

def tiny_qwen2_5_vl_config(tokenizer):
    """A ``Qwen2_5_VLConfig``: language model hidden :data:`TEXT_HIDDEN` (2 layers, 2 heads of dim 16, 1 KV
    head, M-RoPE sections (2, 3, 3) = head_dim / 2), a one-block vision tower, token ids from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1000000.0,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def _tiny_components(seed: int) -> dict:
    """Every pipeline component, weights drawn from ``seed`` (the global RNG is left untouched)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = offline_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(tokenizer)).eval()
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=TRANSFORMER_HEAD_DIM,
            num_attention_heads=TRANSFORMER_HEADS, joint_attention_dim=TEXT_HIDDEN,
            axes_dims_rope=TRANSFORMER_ROPE_AXES,
        ).eval()
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                     attn_scales=[], temperal_downsample=[False, True, True]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return dict(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


# ---- transparent decoder -----------------------------------------------------------------------------

def _pass_channels_(conv: torch.nn.Module, channels: int, gain: float = 1.0) -> None:
    """Zero ``conv`` (2-D or causal 3-D) and pass input channel c to output channel c (times ``gain``) for
    c < ``channels``, through the spatial centre tap and the *current* frame (a causal conv's last time tap)."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    index = tuple(size - 1 if dim == 0 and conv.weight.dim() == 5 else size // 2
                  for dim, size in enumerate(conv.weight.shape[2:]))
    for c in range(min(channels, conv.weight.shape[0], conv.weight.shape[1])):
        conv.weight[(c, c) + index] = gain


@torch.no_grad()
def make_decoder_transparent(vae) -> None:
    """Turn the Qwen-Image VAE decoder into nearest upsampling of its input channels 0-2 to RGB (in place).

    ``post_quant_conv`` passes channels 0-2; the decoder's ``conv_in`` undoes the pipeline's per-channel
    de-normalisation on them (x = z * latents_std + latents_mean back to z), scales latents in
    [-:data:`LATENT_RANGE`, :data:`LATENT_RANGE`] to [-1, 1], adds :data:`DECODER_OFFSET` and writes
    K = :data:`DECODER_CONSTANT` into channel 3; residual blocks
    (second conv zeroed, shortcut identity), the mid-block attention (output projection zeroed) and the
    upsamplers' convs pass them on. The head's RMS norm then gives y_c * K / sqrt(K^2 + |y|^2)
    (gamma = K / sqrt(C), y = input + offset), SiLU follows (near-linear there), and ``conv_out``
    (:data:`OUTPUT_GAIN`, :data:`OUTPUT_BIAS`) maps grey -1 .. 1 to -1 .. 1. So pipeline latents z_0..2 in
    [-1.5, 1.5] decode monotonically to pixels in about [0, 1], each pixel from its own latent cell; decoding
    without the per-channel mean / std would give other colours.
    """
    decoder = vae.decoder
    _pass_channels_(vae.post_quant_conv, vae.config.z_dim)
    _pass_channels_(decoder.conv_in, 3)
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    centre = decoder.conv_in.weight.shape[-1] // 2
    for c in range(3):  # undo the pipeline's de-normalisation: channel c sees z_c / LATENT_RANGE + offset
        decoder.conv_in.weight[c, c, -1, centre, centre] = 1.0 / (std[c] * LATENT_RANGE)
        decoder.conv_in.bias[c] = DECODER_OFFSET - mean[c] / (std[c] * LATENT_RANGE)
    decoder.conv_in.bias[3] = DECODER_CONSTANT
    for module in decoder.modules():
        kind = type(module).__name__
        if kind == "QwenImageResidualBlock":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if isinstance(module.conv_shortcut, torch.nn.Conv3d):
                _pass_channels_(module.conv_shortcut, 4)
        elif kind == "QwenImageAttentionBlock":
            module.proj.weight.zero_()
            module.proj.bias.zero_()
        elif kind == "QwenImageResample":
            _pass_channels_(module.resample[1], 4)
    norm = decoder.norm_out
    norm.gamma.fill_(0.0)
    norm.gamma[:3] = DECODER_CONSTANT / norm.scale
    _pass_channels_(decoder.conv_out, 3, gain=OUTPUT_GAIN)
    decoder.conv_out.bias.fill_(OUTPUT_BIAS)


# ---- pretraining -------------------------------------------------------------------------------------

def quadrant_latents(batch: int, generator: torch.Generator, side: int = 8, channels: int = 16) -> torch.Tensor:
    """Synthetic Qwen-Image latents (batch, channels, side, side) in the pipeline's normalisation (what the
    transformer generates): each quadrant of channels 0-2 a random value in [-1.5, 1.5], other channels 0,
    plus 0.05 noise. The transparent decoder shows channels 0-2 as RGB."""
    values = (torch.rand(batch, 3, 2, 2, generator=generator) * 2 - 1) * LATENT_RANGE
    latents = torch.zeros(batch, channels, side, side)
    latents[:, :3] = values.repeat_interleave(side // 2, dim=2).repeat_interleave(side // 2, dim=3)
    return latents + 0.05 * torch.randn(latents.shape, generator=generator)


def pretrain_on_quadrants(pipeline, steps: int, seed: int, batch: int = 16, lr: float = 1e-3) -> float:
    """:func:`u_nft.tiny_sd3.pretrain_on_quadrants` (flow matching of the whole transformer, logit-normal t)
    on this module's :func:`quadrant_latents`, through the Qwen-Image adapter's prompt encoding (32 tokens)
    and velocity call. Returns the last loss."""
    from u_nft.models.qwen_image import encode_prompts, predict_velocity

    channels = pipeline.vae.config.z_dim
    return shared_pretrain_on_quadrants(
        pipeline, steps, seed, batch, lr,
        encode=lambda pipe, prompts: encode_prompts(pipe, prompts, max_sequence_length=32),
        velocity=predict_velocity,
        latents=lambda n, generator: quadrant_latents(n, generator, channels=channels))


# ---- build -------------------------------------------------------------------------------------------

def tiny_qwen_image_pipeline(seed: int = 0, pretrain_steps: int = 400):
    """The tiny ``QwenImagePipeline`` in memory (random weights from ``seed``, transparent decoder,
    ``pretrain_steps`` of pretraining); the prompt template's dropped prefix is checked."""
    from u_nft.models.qwen_image import check_prompt_template, require_qwen_image

    require_qwen_image()
    from diffusers import QwenImagePipeline

    pipeline = QwenImagePipeline(**_tiny_components(seed))
    pipeline.set_progress_bar_config(disable=True)
    check_prompt_template(pipeline)
    make_decoder_transparent(pipeline.vae)
    pipeline.text_encoder.requires_grad_(False)
    pipeline.vae.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        pretrain_on_quadrants(pipeline, pretrain_steps, seed)
    return pipeline


def build_tiny_qwen_image_pipeline(directory: str | os.PathLike, seed: int = 0, overwrite: bool = False,
                                   pretrain_steps: int = 400) -> Path:
    """Build the tiny Qwen-Image pipeline (see the module doc) and ``save_pretrained`` it; return the path.

    Idempotent and atomic (:func:`u_nft.tiny_sd3.build_pipeline_directory`: a complete build with the same
    marker is reused, another one refused unless ``overwrite``). Load it with
    ``QwenImagePipeline.from_pretrained(directory)`` or :func:`u_nft.models.qwen_image.load_qwen_image_pipeline`.
    """
    marker = {"kind": KIND, "version": BUILD_VERSION, "seed": seed, "pretrain_steps": pretrain_steps}
    return build_pipeline_directory(directory, lambda: tiny_qwen_image_pipeline(seed, pretrain_steps), marker,
                                    overwrite)


def matches_tiny_qwen_image_build(directory: str | os.PathLike, seed: int = 0, pretrain_steps: int = 400) -> bool:
    """Whether ``directory`` holds a complete current build of :func:`build_tiny_qwen_image_pipeline` with
    these arguments (such a folder is reused as it is)."""
    return matches_build(directory, KIND, version=BUILD_VERSION, seed=seed, pretrain_steps=pretrain_steps)
