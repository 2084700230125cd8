"""Tiny models that need no download: randomly initialised directories in the real layouts, one recipe per
family (the family table names it: families.py `tiny_recipe`).

`create_tiny_model_dir` writes what `model=tiny_pixel | tiny_sdxl | tiny_flux | tiny_sd3` create on first use
(model.create_tiny_if_missing); they load through `components.load_components` exactly like a user's
downloaded model, so tests and the CPU demo exercise the real path.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil

import torch
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from jedi_train.models import families


def build_tiny_tokenizer(out_dir: str, model_max_length: int = 32) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer written from the vocabulary open_clip ships (no hub access)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
                        model_max_length=model_max_length, pad_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    return tok


def tiny_unet_config(resolution: int = 32, pixel_fold: int = 2, latent_channels: int | None = None,
                     block_out_channels=(32, 64, 128), cross_attention_dim: int = 64, heads: int = 2,
                     attention_levels: int | None = None) -> dict:
    """Pixel-space UNet for CPU: a few M parameters, (coupled) attention at the `attention_levels`
    coarsest levels (default: all but the finest)."""
    c = latent_channels or 3 * pixel_fold ** 2
    n = len(block_out_channels)
    a = n - 1 if attention_levels is None else attention_levels
    if not 0 < a <= n:
        raise ValueError(f"attention_levels={attention_levels} must be within 1..{n} (the UNet has {n} levels)")
    return {"sample_size": resolution // pixel_fold, "in_channels": c, "out_channels": c,
                "block_out_channels": tuple(block_out_channels), "layers_per_block": 1,
                "down_block_types": ("DownBlock2D",) * (n - a) + ("CrossAttnDownBlock2D",) * a,
                "up_block_types": ("CrossAttnUpBlock2D",) * a + ("UpBlock2D",) * (n - a),
                "cross_attention_dim": cross_attention_dim, "attention_head_dim": heads, "norm_num_groups": 8}


def create_tiny_model_dir(out_dir: str, resolution: int = 32, pixel_fold: int = 2, with_vae: bool = False,
                          prediction_type: str = "v_prediction", seed: int = 0,
                          unet_kwargs: dict | None = None, family: str = "sd",
                          transformer_kwargs: dict | None = None) -> str:
    """Write a randomly initialised model directory in the real layout (a BASE model, not yet joint), with the
    family's recipe. UNet families take resolution / pixel_fold / with_vae / prediction_type / unet_kwargs;
    the MM-DiTs take transformer_kwargs (see their recipes)."""
    row = families.get(family)
    torch.manual_seed(seed)
    return row.create_tiny(out_dir, family=row, resolution=resolution, pixel_fold=pixel_fold, with_vae=with_vae,
                           prediction_type=prediction_type, unet_kwargs=unet_kwargs,
                           transformer_kwargs=transformer_kwargs)


def create_tiny_unet_dir(out_dir: str, family: families.Family, resolution: int = 32, pixel_fold: int = 2,
                         with_vae: bool = False, prediction_type: str = "v_prediction",
                         unet_kwargs: dict | None = None, **_) -> str:
    """SD 1.x/2.x: one CLIP; the SDXL text layout: two text encoders (the second with a projection) and a UNet
    taking pooled text + time ids."""
    unet_kwargs = dict(unet_kwargs or {})
    hidden = unet_kwargs.pop("cross_attention_dim", 64)
    tokenizer = build_tiny_tokenizer(os.path.join(out_dir, "tokenizer"))
    if family.text_layout == "sdxl":  # cross-attention over both encoders' features side by side
        widths = (hidden // 2, hidden - hidden // 2)
        _tiny_clip(tokenizer, widths[0]).save_pretrained(os.path.join(out_dir, "text_encoder"))
        _tiny_clip(tokenizer, widths[1], projection=True).save_pretrained(os.path.join(out_dir, "text_encoder_2"))
        build_tiny_tokenizer(os.path.join(out_dir, "tokenizer_2"))
        time_dim = 8
        unet_kwargs |= {"addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
                        "projection_class_embeddings_input_dim": 6 * time_dim + widths[1]}
    else:
        _tiny_clip(tokenizer, hidden).save_pretrained(os.path.join(out_dir, "text_encoder"))
    extra = {k: unet_kwargs.pop(k) for k in list(unet_kwargs) if k not in _TINY_UNET_ARGS}
    if with_vae:
        AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                      sample_size=resolution).save_pretrained(os.path.join(out_dir, "vae"))
        cfg = tiny_unet_config(resolution, pixel_fold=2, latent_channels=4, cross_attention_dim=hidden, **unet_kwargs)
    else:
        cfg = tiny_unet_config(resolution, pixel_fold, cross_attention_dim=hidden, **unet_kwargs)
    UNet2DConditionModel(**cfg, **extra).save_pretrained(os.path.join(out_dir, "unet"))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type=prediction_type, clip_sample=False).save_pretrained(os.path.join(out_dir, "scheduler"))
    return out_dir


_TINY_UNET_ARGS = ("block_out_channels", "heads", "attention_levels")  # tiny_unet_config's own; the rest: UNet config


def _tiny_clip(tokenizer, width: int, projection: bool = False):
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=tokenizer.model_max_length, projection_dim=width))


def _tiny_t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=width, d_kv=width // 4, d_ff=2 * width,
                                   num_layers=2, num_heads=4))


def _tiny_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """16 latent channels at 1/2 the resolution (FLUX and SD3 VAEs: 16 channels at 1/8)."""
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=8,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def create_tiny_sd3_dir(out_dir: str, transformer_kwargs: dict | None = None, **_) -> str:
    return _tiny_sd3(out_dir, **(transformer_kwargs or {}))


def _tiny_sd3(out_dir: str, width: int = 32, heads: int = 2, layers: int = 2, dual_attention_layers: tuple = (0,),
              qk_norm: str | None = "rms_norm") -> str:
    """An SD3-layout directory: CLIP-L and CLIP-G (both with projections) + T5, a 16-channel VAE (SD3's shift and
    scale), an MM-DiT whose first block has SD3.5's dual attention and qk RMS norm, SD3's flow-matching
    scheduler (shift 3). The T5 tokenizer is the CLIP BPE one (no SentencePiece model offline)."""
    from diffusers import SD3Transformer2DModel

    tokenizer = build_tiny_tokenizer(os.path.join(out_dir, "tokenizer"))
    clip_width = width // 2  # two CLIPs side by side fill at most T5's width (the rest is zero-padded)
    _tiny_clip(tokenizer, clip_width, projection=True).save_pretrained(os.path.join(out_dir, "text_encoder"))
    _tiny_clip(tokenizer, clip_width, projection=True).save_pretrained(os.path.join(out_dir, "text_encoder_2"))
    _tiny_t5(tokenizer, width).save_pretrained(os.path.join(out_dir, "text_encoder_3"))
    for sub in ("tokenizer_2", "tokenizer_3"):
        build_tiny_tokenizer(os.path.join(out_dir, sub))
    _tiny_vae(1.5305, 0.0609).save_pretrained(os.path.join(out_dir, "vae"))
    head_dim = 16
    SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                          attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=width,
                          caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * clip_width,
                          pos_embed_max_size=16, dual_attention_layers=tuple(dual_attention_layers),
                          qk_norm=qk_norm).save_pretrained(os.path.join(out_dir, "transformer"))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(out_dir, "scheduler"))
    return out_dir


def create_tiny_flux_dir(out_dir: str, transformer_kwargs: dict | None = None, **_) -> str:
    return _tiny_flux(out_dir, **(transformer_kwargs or {}))


def _tiny_flux(out_dir: str, width: int = 32, heads: int = 2, layers: int = 1, single_layers: int = 1,
               guidance_embeds: bool = True) -> str:
    """A FLUX.1-layout directory: CLIP + T5 text encoders, a 16-channel VAE (shift + scale), an MM-DiT with
    double- and single-stream blocks, FLUX.1-dev's flow-matching scheduler settings. The T5 tokenizer is the
    CLIP BPE one (no SentencePiece model offline); a real FLUX directory brings its own."""
    tokenizer = build_tiny_tokenizer(os.path.join(out_dir, "tokenizer"))
    build_tiny_tokenizer(os.path.join(out_dir, "tokenizer_2"))
    _tiny_clip(tokenizer, width).save_pretrained(os.path.join(out_dir, "text_encoder"))
    _tiny_t5(tokenizer, width).save_pretrained(os.path.join(out_dir, "text_encoder_2"))
    _tiny_vae(0.3611, 0.1159).save_pretrained(os.path.join(out_dir, "vae"))
    head_dim = 16
    from diffusers import FluxTransformer2DModel

    FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                           attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=width,
                           pooled_projection_dim=width, guidance_embeds=guidance_embeds,
                           axes_dims_rope=(4, 6, 6)).save_pretrained(os.path.join(out_dir, "transformer"))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(out_dir, "scheduler"))
    return out_dir


def create_tiny_model_dir_if_missing(model_dir: str, spec: dict) -> bool:
    """`create_tiny_model_dir(model_dir, **spec)` unless a model (any family's denoiser folder) is there already.
    Written beside and renamed into place: ranks racing to create it are fine (the first one wins).
    Returns whether this call created it."""
    folders = {f.denoiser_folder for f in families.FAMILIES.values()}
    if any(os.path.isfile(os.path.join(model_dir, sub, "config.json")) for sub in folders):
        return False
    os.makedirs(os.path.dirname(os.path.abspath(model_dir)), exist_ok=True)
    tmp = f"{model_dir}.tmp-{os.getpid()}"
    create_tiny_model_dir(tmp, **dict(spec))
    try:
        os.replace(tmp, model_dir)
    except OSError:  # another rank won the race
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


# Qwen3's chat template, reduced to what Flux2KleinPipeline asks of it (one user turn, the generation prompt,
# enable_thinking=False): the same text the real template renders for that call.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


_CAPTION_WORDS = ["a", "photo", "of", "the", "same", "red", "blue", "green", "yellow", "toy", "dog", "cat", "can",
                  "backpack", "on", "beach", "in", "snow", "forest", "city", "street", "table", "grass", "room",
                  "with", "under", "next", "to"]


def _byte_level_bpe(words: list[str], special: list[str], vocab_size: int, extra_text=()):
    """A byte-level BPE (GPT-2 byte alphabet) trained offline on `words` with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))] + list(extra_text), trainer)
    return tok


def build_tiny_qwen_tokenizer(out_dir: str, model_max_length: int = 48, vocab_size: int = 512,
                              extra_text: tuple[str, ...] = ()):
    """A byte-level BPE (Qwen2's kind: GPT-2 byte alphabet, Qwen's special tokens and pad token) trained offline
    on a few caption words (+ `extra_text`) with the `tokenizers` library, saved as transformers'
    Qwen2TokenizerFast with the chat template Flux2KleinPipeline uses. A real FLUX.2 Klein or Qwen-Image directory
    brings Qwen's 151k-token vocabulary."""
    from transformers import Qwen2TokenizerFast

    tok = _byte_level_bpe(_CAPTION_WORDS + ["user", "assistant", "think"], _QWEN_SPECIAL, vocab_size, extra_text)
    qwen = Qwen2TokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                              unk_token=None, bos_token=None, model_max_length=model_max_length)
    qwen.chat_template = QWEN3_CHAT_TEMPLATE
    qwen.save_pretrained(out_dir)
    return qwen


def create_tiny_flux2_klein_dir(out_dir: str, transformer_kwargs: dict | None = None, **_) -> str:
    return _tiny_flux2_klein(out_dir, **(transformer_kwargs or {}))


def _tiny_flux2_klein(out_dir: str, heads: int = 2, layers: int = 1, single_layers: int = 1, text_width: int = 16,
                      latent_channels: int = 4) -> str:
    """A FLUX.2 Klein-layout directory: a tiny Qwen3 causal LM (27 layers, as Klein reads layers 9/18/27, 16 wide)
    + its byte-level BPE tokenizer, an AutoencoderKLFlux2 (batch-norm latent statistics set away from 0/1 so the
    normalisation is exercised), a Flux2Transformer2DModel without guidance embedding (Klein) and Klein's
    flow-matching scheduler settings (dynamic, exponential time shift)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_qwen_tokenizer(os.path.join(out_dir, "tokenizer"))
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                                 num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                 max_position_embeddings=128, tie_word_embeddings=True,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(os.path.join(out_dir, "text_encoder"))
    return _tiny_flux2_rest(out_dir, heads, layers, single_layers, 3 * text_width, latent_channels, False)


def _tiny_flux2_rest(out_dir: str, heads: int, layers: int, single_layers: int, text_features: int,
                     latent_channels: int, guidance_embeds: bool) -> str:
    """The FLUX.2 parts beside the text encoder: VAE, transformer, scheduler."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                             latent_channels=latent_channels, norm_num_groups=8, sample_size=32)
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    vae.save_pretrained(os.path.join(out_dir, "vae"))
    head_dim = 16
    Flux2Transformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=layers,
                            num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
                            joint_attention_dim=text_features, timestep_guidance_channels=32,
                            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
                            ).save_pretrained(os.path.join(out_dir, "transformer"))
    FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER).save_pretrained(os.path.join(out_dir, "scheduler"))
    return out_dir


# black-forest-labs/FLUX.2-klein-4B scheduler/scheduler_config.json
FLUX2_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                   "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                   "time_shift_type": "exponential"}


# FLUX.2-dev's Mistral-3 chat template, reduced to what Flux2Pipeline asks of it (format_input: one system turn, one
# user turn, text blocks only, no generation prompt): the text the real template renders for that call.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['content'] is string %}"
    "{%- set text = message['content'] %}{%- else %}{%- set text = message['content'][0]['text'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}{%- endif %}{%- endfor %}")
_MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                    "[IMG_BREAK]", "[IMG_END]", "<pad>"]


def build_tiny_mistral3_processor(out_dir: str, model_max_length: int = 64, vocab_size: int = 512):
    """transformers' PixtralProcessor (what FLUX.2-dev's tokenizer/ folder loads as) around a byte-level BPE trained
    offline on FLUX.2's system message and a few caption words (so the system turn takes ~30 tokens, not
    hundreds of bytes), Mistral's special tokens, <pad> as the pad token and the chat template Flux2Pipeline uses.
    A real FLUX.2-dev directory brings Mistral's 131k-token vocabulary."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    tok = _byte_level_bpe(SYSTEM_MESSAGE.split() + _CAPTION_WORDS, _MISTRAL_SPECIAL, vocab_size)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=model_max_length)
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=fast, patch_size=16,
                                 spatial_merge_size=2, chat_template=MISTRAL3_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    return processor


def create_tiny_flux2_dir(out_dir: str, transformer_kwargs: dict | None = None, **_) -> str:
    return _tiny_flux2_dev(out_dir, **(transformer_kwargs or {}))


def _tiny_flux2_dev(out_dir: str, heads: int = 2, layers: int = 1, single_layers: int = 1, text_width: int = 16,
                    latent_channels: int = 4) -> str:
    """A FLUX.2-dev-layout directory: a tiny Mistral3ForConditionalGeneration (a 30-layer, 16-wide Mistral text
    tower, as FLUX.2-dev reads layers 10/20/30, and a one-layer Pixtral vision tower) + its PixtralProcessor, and
    the FLUX.2 VAE / transformer (with guidance embedding: FLUX.2-dev is guidance-distilled) / scheduler."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    processor = build_tiny_mistral3_processor(os.path.join(out_dir, "tokenizer"))
    tok = processor.tokenizer
    text = {"model_type": "mistral", "vocab_size": len(tok), "hidden_size": text_width,
            "intermediate_size": 2 * text_width, "num_hidden_layers": 30, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 128, "pad_token_id": tok.pad_token_id}
    vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 16}
    Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, spatial_merge_size=2,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"))).save_pretrained(os.path.join(out_dir, "text_encoder"))
    return _tiny_flux2_rest(out_dir, heads, layers, single_layers, 3 * text_width, latent_channels, True)


def create_tiny_qwenimage_dir(out_dir: str, transformer_kwargs: dict | None = None, **_) -> str:
    return _tiny_qwenimage(out_dir, **(transformer_kwargs or {}))


def _tiny_qwenimage(out_dir: str, heads: int = 2, layers: int = 1, text_width: int = 16, latent_channels: int = 4,
                    text_tokens: int = 16) -> str:
    """A Qwen-Image-layout directory: a tiny Qwen2_5_VLForConditionalGeneration (the class QwenImagePipeline loads:
    2 text layers 16 wide, a 1-block vision tower it never runs) + a byte-level BPE tokenizer trained with the
    prompt template too, so that the template's system prompt and user header are 34 tokens as with Qwen's own
    vocabulary (the pipeline drops exactly 34); an AutoencoderKLQwenImage (a one-level video VAE, /2, its
    latents_mean / latents_std set away from 0 / 1 so the normalisation is exercised); a QwenImageTransformer2DModel;
    Qwen-Image's flow-matching scheduler settings. `text_tokens`: the caption tokens kept after the 34 dropped ones
    (the tokenizer's model_max_length is 34 + text_tokens; a real one keeps 512)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from jedi_train.models.text import QWEN_IMAGE_TEMPLATE

    tokenizer = build_tiny_qwen_tokenizer(os.path.join(out_dir, "tokenizer"), model_max_length=34 + text_tokens,
                                          vocab_size=1024, extra_text=(QWEN_IMAGE_TEMPLATE.format("a photo"),))
    half = text_width // 4  # rotary pairs per head (2 heads); Qwen2.5-VL splits them over (time, height, width)
    ids = {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    text = {"vocab_size": len(tokenizer), "hidden_size": text_width, "intermediate_size": 2 * text_width,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "default", "mrope_section": [half - 2 * (half // 4), half // 4, half // 4],
                                "rope_theta": 1000000.0}, **ids}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": text_width,
              "fullatt_block_indexes": [0]}
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)).save_pretrained(
        os.path.join(out_dir, "text_encoder"))
    g = torch.Generator().manual_seed(0)
    AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2], num_res_blocks=1,
                           temperal_downsample=[False],
                           latents_mean=(torch.rand(latent_channels, generator=g) * 0.4 - 0.2).tolist(),
                           latents_std=(torch.rand(latent_channels, generator=g) * 1.5 + 0.5).tolist(),
                           ).save_pretrained(os.path.join(out_dir, "vae"))
    QwenImageTransformer2DModel(patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels,
                                num_layers=layers, attention_head_dim=16, num_attention_heads=heads,
                                joint_attention_dim=text_width, axes_dims_rope=(4, 6, 6),
                                ).save_pretrained(os.path.join(out_dir, "transformer"))
    FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER).save_pretrained(os.path.join(out_dir, "scheduler"))
    return out_dir


# Qwen/Qwen-Image scheduler/scheduler_config.json
QWENIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                       "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192,
                       "shift_terminal": 0.02, "time_shift_type": "exponential"}


def create_tiny_extractor_dirs(root: str) -> tuple[str, str]:
    """Tiny random identity / prompt extractors in the layouts jedi-eval and jedi-generate load (--dino, --clip):
    a ViTModel + ViTImageProcessor and a CLIPModel + tokenizer + CLIPImageProcessor, 32 px. -> (dino, clip)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    dino, clip = os.path.join(root, "dino"), os.path.join(root, "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(dino)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino)
    tok = build_tiny_tokenizer(clip)
    text = {"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": tok.model_max_length,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    return dino, clip
