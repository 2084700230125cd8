"""The feature extractors of the DreamBench metrics, loaded from LOCAL files only (no hub access).

--dino DIR   a transformers ViTModel or Dinov2Model directory (what save_pretrained writes, e.g. one
             saved from facebook/dino-vits16, the model DreamBooth's DINO score uses). The embedding
             is the CLS token of the last layer (after the final layernorm), not the pooler.
--clip SPEC  either a transformers CLIPModel directory (model + tokenizer files, e.g. one saved from
             openai/clip-vit-large-patch14), or an open_clip model as ARCH:CHECKPOINT_FILE
             (e.g. ViT-L-14:/models/clip_l14.bin), or open_clip's own local-dir:/path/to/folder.

Preprocessing: the directory's preprocessor_config.json when present (AutoImageProcessor); without
one, the default of both models' evaluations: shorter side resized to the model's image_size
(bicubic), center crop, normalized with ImageNet (DINO) or CLIP mean/std. Every embedding comes
back L2-normalized as a float64 numpy array, so cosines are dot products.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from jedi_train.eval.common import EvalError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DINO_TYPES = ("vit", "dinov2", "dinov2_with_registers")
BATCH = 32

DINO_HELP = ("give a local transformers ViT/DINOv2 directory, e.g. one saved from facebook/dino-vits16 "
             "with save_pretrained")
CLIP_HELP = ("give a local transformers CLIPModel directory (e.g. one saved from openai/clip-vit-large-patch14 "
             "with save_pretrained, tokenizer included) or an open_clip ARCH:CHECKPOINT_FILE")


def _normalize(x: torch.Tensor) -> np.ndarray:
    x = x.detach().float().cpu().numpy().astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def default_transform(size: int, mean, std):
    """PIL -> (3, size, size): shorter side to `size` (bicubic), center crop, normalize."""
    def transform(img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)
    return transform


def _hf_transform(path: str, size: int, mean, std):
    """The directory's own image processor when it has one, else default_transform."""
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return lambda images: proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return _stacked(default_transform(size, mean, std))


def _stacked(transform):
    """A one-image transform -> a list-of-images one."""
    return lambda images: torch.stack([transform(im.convert("RGB")) for im in images])


def _model_type(path: str, flag: str, what: str, help_text: str) -> str:
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise EvalError(f"{flag} {path} does not exist; {help_text}")
    if not os.path.isfile(config):
        raise EvalError(f"{flag} {path} has no config.json, so it is not a saved {what}; {help_text}")
    with open(config) as f:
        return json.load(f).get("model_type", "")


class _Embedder:
    def __init__(self, device):
        self.device = torch.device(device)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        out = [self._images(self.to_pixels(images[i:i + BATCH]).to(self.device))
               for i in range(0, len(images), BATCH)]
        return _normalize(torch.cat(out))


class DinoExtractor(_Embedder):
    def __init__(self, path: str, device="cpu"):
        from transformers import AutoModel

        super().__init__(device)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.to_pixels = _hf_transform(path, self.model.config.image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.name = f"{type(self.model).__name__} ({path})"

    def _images(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS after the final layernorm


def _features(out) -> torch.Tensor:
    # transformers < 5 returns the projected tensor, 5.x a ModelOutput with it as pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClipExtractor(_Embedder):
    def __init__(self, path: str, device="cpu"):
        from transformers import AutoTokenizer, CLIPModel

        super().__init__(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise EvalError(f"--clip {path} has no usable tokenizer ({type(e).__name__}); save the CLIP tokenizer "
                            "or processor into it too (processor.save_pretrained(DIR))") from None
        self.to_pixels = _hf_transform(path, self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.name = f"CLIPModel ({path})"

    def _images(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return _normalize(_features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                 attention_mask=tok["attention_mask"])))


class OpenClipExtractor(_Embedder):
    def __init__(self, arch: str, checkpoint: str | None, device="cpu"):
        import open_clip

        super().__init__(device)
        self.model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
        self.to_pixels = _stacked(preprocess)
        self.model = self.model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.name = f"open_clip {arch} ({checkpoint or 'local-dir'})"

    def _images(self, pixels):
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return _normalize(self.model.encode_text(self.tokenizer(list(texts)).to(self.device)))


def check_dino(path: str | None) -> None:
    """Cheap checks (no weights read): EvalError naming the problem and how to supply the model."""
    if not path:
        raise EvalError(f"--dino is required for DINO: {DINO_HELP}")
    kind = _model_type(path, "--dino", "transformers model", DINO_HELP)
    if kind not in DINO_TYPES:
        raise EvalError(f"--dino {path} holds a {kind or 'unknown'} model, not a ViT/DINOv2 ({', '.join(DINO_TYPES)}); "
                        f"{DINO_HELP}")


def _split_clip(spec: str) -> tuple[str, str | None] | None:
    """'ARCH:FILE' or 'local-dir:DIR' -> open_clip (model name, checkpoint); a directory -> None."""
    if spec.startswith("local-dir:"):
        return spec, None
    if os.path.isdir(spec) or ":" not in spec:
        return None
    arch, checkpoint = spec.split(":", 1)
    return arch, checkpoint


def check_clip(spec: str | None) -> None:
    if not spec:
        raise EvalError(f"--clip is required for CLIP-I and CLIP-T: {CLIP_HELP}")
    oc = _split_clip(spec)
    if oc is None:
        kind = _model_type(spec, "--clip", "transformers CLIPModel", CLIP_HELP)
        if kind != "clip":
            raise EvalError(f"--clip {spec} holds a {kind or 'unknown'} model, not a CLIPModel; {CLIP_HELP}")
        return
    arch, checkpoint = oc
    if checkpoint is None:
        if not os.path.isdir(spec[len("local-dir:"):]):
            raise EvalError(f"--clip {spec}: that folder does not exist; {CLIP_HELP}")
        return
    import open_clip

    if arch not in open_clip.list_models():
        raise EvalError(f"--clip {spec}: {arch!r} is not an open_clip architecture (e.g. ViT-L-14); {CLIP_HELP}")
    if not os.path.isfile(checkpoint):
        raise EvalError(f"--clip {spec}: checkpoint file {checkpoint} does not exist (pretrained tags such as "
                        "'openai' would need a download); give the local weights file")


def _load(flag: str, spec: str, build):
    try:
        return build()
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # unreadable weights, wrong layout
        raise EvalError(f"{flag} {spec} could not be loaded ({type(e).__name__}: {str(e)[:200]})") from None


def load_dino(path: str, device="cpu") -> DinoExtractor:
    check_dino(path)
    return _load("--dino", path, lambda: DinoExtractor(path, device))


def load_clip(spec: str, device="cpu") -> HFClipExtractor | OpenClipExtractor:
    check_clip(spec)
    oc = _split_clip(spec)
    return _load("--clip", spec, lambda: HFClipExtractor(spec, device) if oc is None
                 else OpenClipExtractor(*oc, device=device))
