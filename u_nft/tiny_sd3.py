"""A tiny random-weight ``StableDiffusion3Pipeline`` built offline, and the pipeline loader.

The tiny pipeline has the real SD3.5 structure (docs/upstream_facts.md §G) at toy sizes, so every
code path the trainer uses (``from_pretrained``, ``encode_prompt``, PEFT LoRA, VAE decode) is the
real diffusers one:

- two ``CLIPTextModelWithProjection`` (hidden 32, projection 32) with the real CLIP BPE tokenizer;
- a ``T5EncoderModel`` (d_model 64 = joint_attention_dim, 2 blocks, gated-GELU as T5 v1.1) with a
  small Unigram ``T5TokenizerFast`` trained offline (:func:`u_nft.tiny_models.write_t5_tokenizer`).
  ``text_encoder_3=False`` builds the two-encoder variant (``text_encoder_3=None``; the pipeline then
  feeds zeros for the T5 tokens);
- ``SD3Transformer2DModel``: 2 layers (layer 0 with dual attention, as SD3.5-Medium), 4 heads of
  dim 8, patch 2, 16 latent channels, ``qk_norm="rms_norm"``; joint_attention_dim 64 (= the two
  CLIP hidden sizes summed, which the pipeline zero-pads up to it), pooled_projection_dim 64 (= the
  two projection dims summed);
- ``AutoencoderKL``: 16 latent channels, x8 downsampling (4 blocks), no quant convs,
  scaling_factor 1.5305 / shift_factor 0.0609 as SD3.5;
- ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

Random weights alone make a poor stand-in for a pretrained model: a random VAE decoder's GroupNorms
leave local image statistics almost unpredictable from the local latent (R² ≈ 0.01), and a random
transformer has no distribution worth reweighting, so no reward can rise. Two principled fixes make
the tiny model behave like a (very) small pretrained one, through the same code paths:

- a *transparent decoder*: identity convolutions and zeroed residual branches, so latent channels
  0-2 decode to RGB (nearest upsampling, then the decoder's final GroupNorm + SiLU);
- a short flow-matching *pretraining* of the transformer (``pretrain_steps``) on synthetic latents
  whose four quadrants carry random colours, so it samples a diverse distribution with spatial
  structure that RL can reweight.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from u_nft.shape_log import attach_shape_log_from_env
from u_nft.tiny_models import tiny_clip_text_config, write_clip_tokenizer, write_t5_tokenizer

# Written last into a finished build: its presence means the directory holds a complete pipeline.
MARKER_NAME = ".u_nft_tiny_sd3_complete"
_BUILD_FORMAT = 4  # bump when the built weights change: older builds are rebuilt

# SD3.5 VAE latent normalisation (docs/upstream_facts.md §G): decode x = z / 1.5305 + 0.0609.
VAE_SCALING_FACTOR = 1.5305
VAE_SHIFT_FACTOR = 0.0609

HUB_ID = re.compile(  # "owner/name" on a model hub
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def tiny_autoencoder_kl(scaling_factor: float, shift_factor: float):
    """A tiny 16-channel ``AutoencoderKL`` (x8 downsampling: 4 blocks of widths 8-16, no quant convs), the
    SD3 / FLUX latent layout, with the family's latent normalisation ``z = (x - shift) * scaling``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_size=256,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def t5_encoder_config(vocab_size: int, d_model: int, d_ff: int, num_heads: int, d_kv: int, num_layers: int):
    """A ``T5Config`` for ``T5EncoderModel`` in T5 v1.1's form (gated GELU, untied embeddings, relative
    position buckets 32 / distance 128, pad 0, eos 1), as SD3's T5-XXL; sizes as given."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
        num_layers=num_layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
        dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
    )


def offline_tokenizers(t5: bool) -> dict:
    """``tokenizer`` / ``tokenizer_2`` (real CLIP BPE) and ``tokenizer_3`` (offline Unigram T5, or None)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer(Path(tok_dir) / "clip")
        tokenizers = dict(tokenizer=CLIPTokenizer.from_pretrained(Path(tok_dir) / "clip"),
                          tokenizer_2=CLIPTokenizer.from_pretrained(Path(tok_dir) / "clip"), tokenizer_3=None)
        if t5:
            write_t5_tokenizer(Path(tok_dir) / "t5")
            tokenizers["tokenizer_3"] = T5TokenizerFast.from_pretrained(Path(tok_dir) / "t5")
    return tokenizers


def _tiny_components(seed: int, text_encoder_3: bool = True) -> dict:
    """Instantiate every pipeline component with weights drawn from ``seed`` (global RNG untouched)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tokenizers = offline_tokenizers(text_encoder_3)
    tokenizer, tokenizer_2, tokenizer_3 = tokenizers["tokenizer"], tokenizers["tokenizer_2"], tokenizers["tokenizer_3"]

    clip_hidden, clip_proj = 32, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(
            tiny_clip_text_config(len(tokenizer), tokenizer.eos_token_id, clip_hidden, clip_proj)
        ).eval()
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_clip_text_config(len(tokenizer_2), tokenizer_2.eos_token_id, clip_hidden, clip_proj)
        ).eval()
        transformer = SD3Transformer2DModel(
            sample_size=32,  # latent side: the pipeline's default image is 32 * 8 = 256 px
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=2 * clip_hidden,
            caption_projection_dim=4 * 8,  # = inner dim (heads x head dim), as in SD3.5
            pooled_projection_dim=2 * clip_proj,
            pos_embed_max_size=32,  # patches per side: up to 32 * 2 * 8 = 512 px
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ).eval()
        vae = tiny_autoencoder_kl(VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)
        # T5 last, so the other components' weights do not depend on whether it is built.
        text_encoder_3 = None
        if tokenizer_3 is not None:
            text_encoder_3 = T5EncoderModel(t5_encoder_config(
                len(tokenizer_3), d_model=2 * clip_hidden, d_ff=4 * clip_hidden, num_heads=4, d_kv=16, num_layers=2,
            )).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return dict(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def _identity_conv_(conv: torch.nn.Conv2d) -> None:
    """Set a conv to pass channel c to channel c (centre tap 1) for c < min(in, out); zero elsewhere."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    centre = conv.weight.shape[-1] // 2
    for c in range(min(conv.weight.shape[0], conv.weight.shape[1])):
        conv.weight[c, c, centre, centre] = 1.0


@torch.no_grad()
def make_decoder_transparent(vae) -> None:
    """Turn the VAE decoder into nearest upsampling of latent channels 0-2 to RGB (in place).

    Identity ``conv_in`` / upsampler convs / shortcut convs / ``conv_out``; zeroed second conv of every
    residual block and zeroed attention output, so those blocks are identities. Only the final
    GroupNorm + SiLU remain: colour differences between channels and places survive decoding.
    """
    decoder = vae.decoder
    _identity_conv_(decoder.conv_in)
    _identity_conv_(decoder.conv_out)
    for module in decoder.modules():
        kind = type(module).__name__
        if kind == "ResnetBlock2D":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:
                _identity_conv_(module.conv_shortcut)
        elif kind == "Attention":
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
        elif kind == "Upsample2D":
            _identity_conv_(module.conv)


def quadrant_latents(batch: int, vae_config, generator: torch.Generator, side: int = 8,
                     channels: int = 16, spread: float = 1.0) -> torch.Tensor:
    """Synthetic latents (batch, channels, side, side): each quadrant of channels 0-2 a random value
    in [-1.5, 1.5] (+ 0.05 noise), other channels ~0, all times ``spread``, expressed in the pipeline's
    latent normalisation (the decoder sees z / scaling_factor + shift_factor). ``spread`` 1 for SD3; a VAE
    with another scaling_factor passes 1.5305 / scaling_factor, so its latents z have SD3's magnitudes (the
    transparent decoder's final GroupNorm makes the decoded colours independent of the spread)."""
    values = torch.rand(batch, 3, 2, 2, generator=generator) * 3 - 1.5
    decoder_input = torch.zeros(batch, channels, side, side)
    decoder_input[:, :3] = values.repeat_interleave(side // 2, dim=2).repeat_interleave(side // 2, dim=3)
    decoder_input += 0.05 * torch.randn(decoder_input.shape, generator=generator)
    if spread != 1.0:
        decoder_input = decoder_input * spread
    return (decoder_input - vae_config.shift_factor) * vae_config.scaling_factor


PRETRAIN_PROMPTS = tuple(f"a picture of {thing}" for thing in (
    "a cat", "a house", "a tree", "a car", "the sea", "a flower", "a city", "a road", "a lake", "a dog", "a boat",
    "a hill", "a lamp", "a chair", "a cup", "a bird"))


def _sd3_pretrain_encode(pipeline, prompts):
    """SD3 conditioning for :func:`pretrain_on_quadrants`: (prompt_embeds, pooled), 32 T5 tokens."""
    from u_nft.rollout import encode_prompts

    return encode_prompts(pipeline, prompts, max_sequence_length=32)


def _sd3_pretrain_velocity(transformer, x_t, sigma, conditioning):
    """SD3 velocity for :func:`pretrain_on_quadrants`: timestep sigma * 1000 (float), as diffusers."""
    embeds, pooled = conditioning
    return transformer(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                       timestep=sigma * 1000, return_dict=False)[0]


def pretrain_on_quadrants(pipeline, steps: int, seed: int, batch: int = 16, lr: float = 1e-3,
                          encode=None, velocity=None, spread: float = 1.0, latents=None) -> float:
    """Flow matching (x_t = (1 - t) x0 + t eps, target eps - x0, t ~ logit-normal as SD3) of the whole
    transformer on :func:`quadrant_latents`, prompts from :data:`PRETRAIN_PROMPTS`. Returns the last loss.

    The family's two calls are parameters, so every tiny pipeline pretrains through its own code path:
    ``encode(pipeline, prompts) -> conditioning`` (no grad) and ``velocity(transformer, x_t, sigma,
    conditioning) -> v`` with x_t (B, 16, 8, 8) spatial latents and sigma (B,) in [0, 1]. The defaults are
    SD3's (the pipeline's ``encode_prompt`` with 32 T5 tokens; ``timestep = sigma * 1000``); FLUX's tiny
    build passes :mod:`u_nft.models.flux`'s ``encode_prompts`` / ``predict_velocity`` (2x2 packing inside).
    ``spread``: :func:`quadrant_latents`'s (1.5305 / the VAE's scaling_factor for a non-SD3 VAE).
    ``latents(batch, generator) -> x0`` replaces :func:`quadrant_latents` for a VAE with another latent
    normalisation (Qwen-Image's per-channel mean / std: :func:`u_nft.tiny_qwen_image.quadrant_latents`).
    """
    encode = encode or _sd3_pretrain_encode
    velocity = velocity or _sd3_pretrain_velocity
    if latents is None:
        def latents(n, generator):
            return quadrant_latents(n, pipeline.vae.config, generator, spread=spread)
    transformer = pipeline.transformer
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conditioning = encode(pipeline, list(PRETRAIN_PROMPTS[:batch]))
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    transformer.train()
    loss = torch.zeros(())
    for _ in range(steps):
        x0 = latents(batch, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(batch, generator=generator))
        t4 = t.view(-1, 1, 1, 1)
        v = velocity(transformer, (1 - t4) * x0 + t4 * noise, t, conditioning)
        loss = (v - (noise - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    transformer.eval().requires_grad_(False)
    return float(loss.detach())


def _is_complete(directory: Path, kind: str = "tiny") -> bool:
    """A finished build of ``kind`` in the current format (older formats count as incomplete and are rebuilt)."""
    marker = directory / MARKER_NAME
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text(encoding="utf-8"))
    return recorded.get("format") == _BUILD_FORMAT and recorded.get("kind", "tiny") == kind


def _check_build(directory: Path, wanted: dict) -> None:
    recorded = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    got = {key: recorded.get(key) for key in wanted}
    if got != wanted:
        raise ValueError(
            f"pipeline at {directory} was built with {got}, not {wanted}; "
            "pass overwrite=True to rebuild it or choose another directory"
        )


def matches_build(directory: str | os.PathLike, kind: str = "tiny", **wanted) -> bool:
    """Whether ``directory`` holds a complete current-format build of ``kind`` with the marker values
    ``wanted`` (e.g. ``seed=0, text_encoder_3=True``): such a directory is reused as it is."""
    directory = Path(directory).expanduser()
    if not _is_complete(directory, kind):
        return False
    recorded = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    return all(recorded.get(key) == value for key, value in wanted.items())


def build_pipeline_directory(directory: str | os.PathLike, make_pipeline, marker: dict,
                             overwrite: bool = False) -> Path:
    """``make_pipeline().save_pretrained`` into ``directory`` once; return its resolved path.

    ``marker`` (JSON-able, with a ``"kind"``) describes the build and is written last. Idempotent: a
    directory holding a complete build with the same marker is reused; one with another marker is
    refused (``ValueError``) unless ``overwrite``; our own build of an older format is rebuilt; a foreign
    non-empty directory is refused (``FileExistsError``). The build goes to a sibling temporary
    directory renamed into place, so concurrent and interrupted builds never leave a half-written
    pipeline behind a marker.
    """
    directory = Path(directory).expanduser().resolve()
    kind = marker["kind"]
    marker = {**marker, "format": _BUILD_FORMAT}
    wanted = {key: value for key, value in marker.items() if key != "format"}
    if directory.exists() and not overwrite:
        if _is_complete(directory, kind):
            _check_build(directory, wanted)
            return directory
        if (directory / MARKER_NAME).is_file():
            recorded = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
            if recorded.get("kind", "tiny") != kind:
                _check_build(directory, wanted)  # raises: another kind of build
            overwrite = True  # our own build of an older format: rebuild it
        elif any(directory.iterdir()):
            raise FileExistsError(
                f"{directory} exists, is not empty and holds no complete {kind} pipeline build "
                f"(no {MARKER_NAME}); pass overwrite=True or choose another directory"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        make_pipeline().save_pretrained(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(marker), encoding="utf-8")
        if directory.exists() and (overwrite or not any(directory.iterdir())):
            shutil.rmtree(directory)
        try:
            os.rename(tmp, directory)
        except OSError:
            # Another process finished first: its build is as good as ours.
            if not _is_complete(directory, kind):
                raise
            _check_build(directory, wanted)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def build_tiny_sd3_pipeline(directory: str | os.PathLike, seed: int = 0, overwrite: bool = False,
                            pretrain_steps: int = 400, text_encoder_3: bool = True) -> Path:
    """Build the tiny SD3 pipeline (random weights, transparent decoder, ``pretrain_steps`` of
    flow-matching pretraining; see the module doc) and ``save_pretrained`` it; return the path.

    ``text_encoder_3=True`` (default) gives the three-encoder pipeline (CLIP-L, CLIP-bigG and T5 roles,
    as SD3.5); ``False`` the two-encoder one without T5. Idempotent and atomic, see
    :func:`build_pipeline_directory`. Load it with :func:`load_sd3_pipeline` (or
    ``StableDiffusion3Pipeline.from_pretrained(directory)``; add ``text_encoder_3=None,
    tokenizer_3=None`` for the two-encoder build).
    """
    from diffusers import StableDiffusion3Pipeline

    def make():
        pipeline = StableDiffusion3Pipeline(**_tiny_components(seed, text_encoder_3))
        make_decoder_transparent(pipeline.vae)
        with torch.random.fork_rng(devices=[]):
            pretrain_on_quadrants(pipeline, pretrain_steps, seed)
        return pipeline

    marker = {"kind": "tiny", "seed": seed, "pretrain_steps": pretrain_steps, "text_encoder_3": bool(text_encoder_3)}
    return build_pipeline_directory(directory, make, marker, overwrite)


def _has_text_encoder_3(directory: Path) -> bool:
    """Whether a local pipeline directory declares and holds a T5 encoder."""
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        return (directory / "text_encoder_3").is_dir()
    entry = json.loads(index_path.read_text(encoding="utf-8")).get("text_encoder_3")
    declared = isinstance(entry, (list, tuple)) and entry and entry[0] is not None
    return bool(declared) and (directory / "text_encoder_3").is_dir()


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` in recent diffusers (``torch_dtype`` deprecated)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def load_sd3_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``StableDiffusion3Pipeline.from_pretrained(model)`` for a hub id or a local directory.

    ``model`` is ``config.pretrained.model``: e.g. ``"stabilityai/stable-diffusion-3.5-medium"``
    or the directory written by :func:`build_tiny_sd3_pipeline`. A local pipeline without a T5
    encoder is loaded with ``text_encoder_3=None, tokenizer_3=None`` (diffusers needs them
    explicit); a pipeline with T5 (the real SD3.5, hub or local) keeps it. With ``U_NFT_SHAPE_LOG``
    set, the transformer's input shapes are logged there (:mod:`u_nft.shape_log`).
    """
    from diffusers import StableDiffusion3Pipeline

    text = os.fspath(model)
    path = Path(text).expanduser()
    kwargs = {}
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"config.pretrained.model={text!r} is a local path but not a diffusers pipeline "
                "directory (no model_index.json); give a hub id such as "
                "'stabilityai/stable-diffusion-3.5-medium' or a directory written by save_pretrained "
                "(scripts/make_tiny_sd3.py builds a tiny one)"
            )
        if not _has_text_encoder_3(path):
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        source = str(path)
    elif HUB_ID.match(text):
        source = text
    else:
        raise FileNotFoundError(
            f"config.pretrained.model={text!r} looks like a local path but does not exist; give an "
            "existing pipeline directory or a hub id of the form 'owner/name' "
            "(e.g. 'stabilityai/stable-diffusion-3.5-medium')"
        )
    pipeline = StableDiffusion3Pipeline.from_pretrained(source, **{_dtype_keyword(): dtype}, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    attach_shape_log_from_env(pipeline.transformer)  # only with U_NFT_SHAPE_LOG set (u_nft/shape_log.py)
    return pipeline.to(device)
