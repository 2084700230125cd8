"""`JeDiPipeline`: personalized text-to-image from K reference photos, no finetuning (a diffusers pipeline).

The references join each set as known images, exactly as training showed them to the UNet
(objective.py): clean latent in the reference slot, mask 1, timestep 0 (reference_timestep 'zero')
or re-noised to the set's timestep ('target'); the targets start from noise and are sampled with
whatever diffusers scheduler is installed. Image guidance (docs/method.md) runs its three branches
(no text + references hidden, no text + references, text + references) in one batched UNet call
per step; image_guidance_scale = 0 is plain text-to-image (references hidden in every branch).
How targets are grouped into sets when K + M is large: see set_plan.py.

Reference key/value cache (use_reference_cache): for models trained with references at t = 0 that
attend only to references, the references' keys/values are recorded in one references-only pass
and replayed at every step; the sets then hold only targets. Same images, far less work per step.

Backbones: `JeDiPipeline` drives SD 1.x/2.x and SDXL UNets (SDXL's second text encoder and tokenizer are
optional components); `JeDiFluxPipeline` and `JeDiSD3Pipeline` (end of this file) are the same loop for the
MM-DiTs with their parts swapped in through small hooks (`denoiser`, `prepare_timesteps`, `noise_references`,
`guidance_distilled`).
"""
from __future__ import annotations

import copy
import inspect
import json
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from jedi_train.models.attention import ReferenceKVCache, SetLayout
from jedi_train.models.components import LatentCodec, model_resolution
from jedi_train.models.joint_flux import JointFluxTransformer2DModel, flow_mu
from jedi_train.models.joint_sd3 import JointSD3Transformer2DModel
from jedi_train.models.joint_unet import JointUNet2DConditionModel
from jedi_train.models.text import PromptEncoder, TextEmbeddings
from jedi_train.pipelines.references import load_references
from jedi_train.pipelines.set_plan import Branch, SetPlan, guidance_branches

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _export_unet_class():
    """Exports before bundle.py named the UNet ["jedi_train", "JointUNet2DConditionModel"]. diffusers resolves
    that library from sys.modules and finds the loader by looking up its base classes (ModelMixin, ...) on
    the same module, so `jedi_train` must expose both names; its lazy __init__ does not expose ModelMixin."""
    try:
        import jedi_train
    except ImportError:  # running from an export's bundle: such exports name a plain diffusers UNet
        return
    from diffusers import ModelMixin

    for name, obj in (("JointUNet2DConditionModel", JointUNet2DConditionModel), ("ModelMixin", ModelMixin)):
        if getattr(jedi_train, name, None) is None:
            setattr(jedi_train, name, obj)


def _saved_class_name(path: str) -> str | None:
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            name = json.load(f).get("_class_name")
    except (OSError, ValueError):
        return None
    return name[1] if isinstance(name, list) else name


@dataclass
class JeDiPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor  # prompt-major: prompt 0's images first
    reference_images: list[PIL.Image.Image]  # the references as the model saw them (resized, cropped)


@dataclass
class GuidedSets:
    """What every denoising step of one call reuses (JeDiPipeline.prepare_sets)."""
    plan: SetPlan
    branches: list[Branch]
    calls: list[tuple[list[int], SetLayout]]  # per model call: its branches (indices) and their layout
    text: list[TextEmbeddings]  # per branch: its sets' text, references' captions included
    is_ref: torch.Tensor  # per image of one branch's sets
    ref_latents: torch.Tensor | None  # the encoded references (in the sets' slots unless cached)
    clean: torch.Tensor | None  # the model's clean-image input: references in their slots, zeros elsewhere
    guidance: float | None  # guidance-distilled models: the text guidance scale, every image's input


class JeDiPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    # vae: None for pixel-space models; the second text encoder + tokenizer: SDXL only
    _optional_components: ClassVar[list[str]] = ["vae", "text_encoder_2", "tokenizer_2"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler, vae: AutoencoderKL | None = None,
                 text_encoder_2: CLIPTextModelWithProjection | None = None, tokenizer_2: CLIPTokenizer | None = None):
        super().__init__()
        unet = JointUNet2DConditionModel.adopt(unet)  # saved as a plain UNet2DConditionModel (see bundle.py)
        if not isinstance(unet, JointUNet2DConditionModel) or unet.jedi is None:
            raise ValueError(f"the pipeline's unet is a plain {type(unet).__name__} without JeDi settings (_jedi), "
                             "not a joint UNet; export the trained model with jedi-export (or convert it with "
                             "load_joint_unet)")
        if vae is None and unet.latent_channels != 3 * unet.jedi.pixel_fold ** 2:
            raise ValueError(f"no vae, but the unet has {unet.latent_channels} channels (not pixels folded by "
                             f"{unet.jedi.pixel_fold}); the pipeline directory is missing its vae/")
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("an SDXL pipeline needs both text_encoder_2 and tokenizer_2; one of them is missing")
        wants_pooled = unet.config.get("addition_embed_type") == "text_time"
        if wants_pooled != (text_encoder_2 is not None):
            raise ValueError("the unet takes SDXL's pooled text embeddings and time ids but the pipeline has no "
                             "text_encoder_2/tokenizer_2" if wants_pooled else
                             "text_encoder_2 is given but the unet is not an SDXL UNet (no text_time embedding)")
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              vae=vae, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.codec.downsample)

    # -- persistence -----------------------------------------------------------------------------
    def register_modules(self, **kwargs):
        super().register_modules(**kwargs)
        self._register_unet_library()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("unet", "transformer"):
            self._register_unet_library()

    def _register_unet_library(self):
        # the joint model is saved as what it loads as without jedi_train: a diffusers UNet2DConditionModel
        # (FluxTransformer2DModel, SD3Transformer2DModel) whose config keeps the JeDi settings (`adopt` restores
        # the joint class)
        for name, joint in (("unet", JointUNet2DConditionModel), ("transformer", JointFluxTransformer2DModel),
                            ("transformer", JointSD3Transformer2DModel)):
            if isinstance(getattr(self, name, None), joint):
                self.register_to_config(**{name: ("diffusers", joint.__bases__[-1].__name__)})

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save_pretrained plus the pipeline's code (bundle.py): the directory then loads with
        JeDiPipeline.from_pretrained and with DiffusionPipeline.from_pretrained(..., trust_remote_code=True)."""
        from jedi_train.pipelines.bundle import write_bundle  # imported here: bundle.py reads this file

        super().save_pretrained(save_directory, *args, **kwargs)
        write_bundle(os.fspath(save_directory), type(self).__name__)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' LoRA loading, plus the full weights a jedi-train LoRA export carries beside the adapter
        (the joint UNet's widened conv_in trains in full: `unet.<name>` keys without 'lora')."""
        state, alphas, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict,
                                                       return_lora_metadata=True, **kwargs)
        self._load_full_weights(state, "unet")
        self.load_lora_into_unet(state, network_alphas=alphas, unet=self.unet, adapter_name=adapter_name,
                                 metadata=metadata, _pipeline=self)

    def _load_full_weights(self, state: dict, prefix: str) -> None:
        """Pop the `<prefix>.<name>` keys without 'lora' (weights trained in full) and load them into the denoiser."""
        full = {k[len(prefix) + 1:]: state.pop(k) for k in list(state) if k.startswith(prefix + ".") and "lora" not in k}
        if full:
            own = self.denoiser.state_dict()
            bad = [k for k, v in full.items() if k not in own or own[k].shape != v.shape]
            if bad:
                raise ValueError(f"the LoRA file's full weight {bad[0]!r} does not fit this pipeline's {prefix}; load "
                                 "it into a pipeline of the base model it was trained on (same conditioning)")
            self.denoiser.load_state_dict(full, strict=False)

    @classmethod
    def load_config(cls, *args, **kwargs):
        # model_index.json names the bundled code (["jedi_pipeline", "JeDiPipeline"]) for generic loading;
        # JeDiPipeline.from_pretrained uses the installed class instead, so drop that pointer here
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), list) and issubclass(cls, JeDiPipeline):
            config["_class_name"] = config["_class_name"][1]
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path} has no model_index.json, so it is not a saved pipeline; export one "
                                    "with jedi-export (or JeDiPipeline.save_pretrained)")
        if not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise FileNotFoundError(f"pipeline directory {path} does not exist; give the folder jedi-export wrote")
        _export_unet_class()
        family_class = {"JeDiFluxPipeline": JeDiFluxPipeline, "JeDiSD3Pipeline": JeDiSD3Pipeline}.get(
            _saved_class_name(path))
        if cls is JeDiPipeline and family_class is not None:
            return family_class.from_pretrained(path, **kwargs)  # one entry point: the export names its family
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def from_components(cls, components, denoiser=None) -> JeDiPipeline:
        """The pipeline of a model being trained (validation grids, export), as diffusers' training scripts
        build theirs: the loaded components, with `denoiser` (e.g. an EMA or fused copy) in place of theirs.
        The family's pipeline class and scheduler: DDIM with "trailing" spacing for UNets (same betas and
        prediction type; sampling starts at t = 999, not 960 as "leading" does), the MM-DiTs' flow-matching one."""
        c = components
        if c.family in ("flux", "sd3"):
            text = {k: v for k, v in c.text_parts().items() if v is not None}
            pipeline = JeDiFluxPipeline if c.family == "flux" else JeDiSD3Pipeline
            return pipeline(transformer=denoiser or c.unet, scheduler=copy.deepcopy(c.noise_scheduler), vae=c.vae,
                            **text)
        scheduler = DDIMScheduler.from_config(c.noise_scheduler.config, timestep_spacing="trailing")
        return JeDiPipeline(unet=denoiser or c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                            scheduler=scheduler, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2)

    # -- geometry --------------------------------------------------------------------------------
    @property
    def codec(self) -> LatentCodec:
        return LatentCodec.of(self.vae, self.denoiser)

    @property
    def resolution(self) -> int:
        """Pixel size of references and outputs (a UNet's sample size x the codec's downsampling; for FLUX the
        resolution it was trained at)."""
        return model_resolution(self.denoiser, self.codec)

    @property
    def latent_size(self) -> int:
        """Side of the grid the denoiser works on."""
        return self.resolution // self.codec.downsample

    @property
    def denoiser(self):
        """The joint model every step calls: the UNet here, the transformer in JeDiFluxPipeline."""
        return self.unet

    def reference_cache_supported(self) -> bool:
        return self.denoiser.jedi.reference_timestep == "zero" and self.denoiser.jedi.reference_attention == "references"

    # -- pieces ----------------------------------------------------------------------------------
    @property
    def prompt_encoder(self) -> PromptEncoder:
        return PromptEncoder.of(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                                getattr(self, "tokenizer_3", None), getattr(self, "text_encoder_3", None))

    def encode_text(self, texts: list[str]) -> TextEmbeddings:
        """Prompts -> per-prompt text conditioning (with SDXL's pooled embeddings and time ids)."""
        text = self.prompt_encoder
        return text.embed(text.token_ids(texts).to(self._execution_device), self.resolution).to(self.denoiser.dtype)

    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self._execution_device)
        return self.codec.encode(pixels, sample=False).to(self.denoiser.dtype)  # deterministic: the posterior mean

    def _use_cache(self, use_reference_cache: bool | None, use_refs: bool) -> bool:
        ok = self.reference_cache_supported()
        if use_reference_cache and not ok:
            raise ValueError(
                "use_reference_cache=True needs a model trained with references at timestep 0 that attend only "
                f"to references (reference_timestep='zero', reference_attention='references'); this model has "
                f"reference_timestep={self.denoiser.jedi.reference_timestep!r}, reference_attention="
                f"{self.denoiser.jedi.reference_attention!r}, so cached keys/values would differ. Use use_reference_cache=False")
        return use_refs and ok and use_reference_cache is not False

    @property
    def guidance_distilled(self) -> bool:
        """Guidance-distilled models (FLUX.1-dev) take the text guidance scale as an input."""
        return False

    def prepare_timesteps(self, num_inference_steps: int, device, latent_size: int) -> None:
        self.scheduler.set_timesteps(num_inference_steps, device=device)

    def noise_references(self, ref_latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """References re-noised to the step's t (models trained with reference_timestep 'target')."""
        ddpm = DDPMScheduler.from_config(self.scheduler.config)
        return ddpm.add_noise(ref_latents, noise, t.float().round().long().expand(ref_latents.shape[0]))

    def _step_kwargs(self, generator) -> dict:
        return {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

    @staticmethod
    def _as_list(value, n: int, name: str, default: str = "") -> list[str]:
        if value is None:
            return [default] * n
        if isinstance(value, str):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but {n} are needed")
        return value

    # -- sampling --------------------------------------------------------------------------------
    @staticmethod
    def check_inputs(prompts: list[str], output_type: str, num_images_per_prompt: int,
                     num_inference_steps: int) -> None:
        if not prompts:
            raise ValueError("prompt is empty; give at least one prompt (a string or a list of strings)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is unknown; use one of {OUTPUT_TYPES}")
        if num_images_per_prompt < 1 or num_inference_steps < 1:
            raise ValueError("num_images_per_prompt and num_inference_steps must be >= 1")

    def prepare_references(self, reference_images, image_guidance_scale: float):
        """(latents or None when no reference is used, the references as PIL images the model sees)."""
        ref_pixels, ref_pils = load_references(reference_images if reference_images is not None else [],
                                               self.resolution)
        k = len(ref_pils)
        if k == 0 and image_guidance_scale != 0:
            raise ValueError(f"image_guidance_scale={image_guidance_scale} needs at least one reference image; "
                             "pass reference_images, or image_guidance_scale=0 for plain text-to-image")
        use_refs = k > 0 and image_guidance_scale != 0
        return (self.encode_references(ref_pixels) if use_refs else None), ref_pils

    def encode_prompt(self, prompts: list[str], negatives: list[str], ref_caps: list[str],
                      num_images_per_prompt: int) -> tuple[TextEmbeddings, TextEmbeddings, TextEmbeddings]:
        """(cond, uncond) per target, prompt-major, and the references' text: one text-encoder call."""
        n = len(prompts)
        emb = self.encode_text(prompts + negatives + ref_caps)
        per_target = torch.arange(n * num_images_per_prompt, device=self._execution_device) // num_images_per_prompt
        return emb[:n][per_target], emb[n:2 * n][per_target], emb[2 * n:]

    def prepare_sets(self, cond: TextEmbeddings, uncond: TextEmbeddings, ref_text: TextEmbeddings,
                     ref_latents: torch.Tensor | None, *, guidance_scale: float, image_guidance_scale: float,
                     max_set_size: int, use_cache: bool, batch_guidance_branches: bool) -> GuidedSets:
        """Sets and guidance branches (see set_plan.py); cached references leave the sets' batch slots,
        their keys/values are recorded here, once."""
        device, m = self._execution_device, len(cond)  # m targets
        use_refs = ref_latents is not None
        k = ref_latents.shape[0] if use_refs else 0
        distilled = self.guidance_distilled  # text guidance is an input of the model, not a branch
        branches = guidance_branches(1.0 if distilled else guidance_scale, image_guidance_scale, use_refs)
        plan = SetPlan.build(m, 0 if use_cache else k, k, max_set_size)
        guidance = guidance_scale if distilled else None  # every image's model input, references' too
        cache = self._record_references(ref_latents, ref_text, guidance) if use_cache else None
        calls = self._calls(plan, branches, batch_guidance_branches, cache, device)
        text = {"cond": cond, "uncond": uncond}
        branch_text = [plan.stack(ref_text, text[b.text]) for b in branches]
        ref_flag = torch.zeros(plan.set_size, dtype=torch.bool, device=device)
        ref_flag[:plan.num_refs] = True
        clean = plan.stack(ref_latents, ref_latents.new_zeros(m, *ref_latents.shape[1:])) if plan.num_refs else None
        return GuidedSets(plan, branches, calls, branch_text, ref_flag.repeat(plan.num_sets), ref_latents, clean,
                          guidance)

    def prepare_latents(self, m: int, generator, device, dtype) -> torch.Tensor:
        """The targets' starting noise, scaled for the scheduler (after prepare_timesteps: the scale may
        depend on them)."""
        size = self.latent_size
        latents = randn_tensor((m, self.denoiser.latent_channels, size, size), generator=generator, device=device,
                               dtype=dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def prepare_reference_noise(self, sets: GuidedSets, generator, device, dtype) -> torch.Tensor | None:
        """Models trained with reference_timestep 'target': the noise that re-noises the references to each
        step's t (drawn after the targets' noise). None: references stay clean at t = 0."""
        if not sets.plan.num_refs or self.denoiser.jedi.reference_timestep != "target":
            return None
        g = generator[0] if isinstance(generator, list) else generator
        return randn_tensor(sets.ref_latents.shape, generator=g, device=device, dtype=dtype)

    def predict(self, sets: GuidedSets, x_in: torch.Tensor, t, ref_noise: torch.Tensor | None) -> torch.Tensor:
        """One timestep's guided prediction for the targets: every branch's sets through its model call,
        the branches' predictions summed with their weights."""
        plan, model = sets.plan, self.denoiser
        refs_in = None
        if plan.num_refs:  # what training fed: clean at t = 0, or noised to the set's t
            refs_in = sets.ref_latents if ref_noise is None else self.noise_references(sets.ref_latents, ref_noise, t)
        noisy = plan.stack(refs_in, x_in)
        t_img = torch.full((noisy.shape[0],), t, device=sets.is_ref.device, dtype=self.scheduler.timesteps.dtype)
        if ref_noise is None:
            t_img = torch.where(sets.is_ref, torch.zeros_like(t_img), t_img)
        clean = sets.clean if sets.clean is not None else noisy
        preds = []
        for sel, layout in sets.calls:
            n_b = len(sel)
            visible = torch.cat([sets.is_ref & sets.branches[b].refs for b in sel])
            model_in = model.assemble_input(noisy.repeat(n_b, 1, 1, 1), clean.repeat(n_b, 1, 1, 1), visible)
            out = model.denoise(model_in, t_img.repeat(n_b), TextEmbeddings.cat([sets.text[b] for b in sel]),
                                layout, guidance=sets.guidance)
            preds += [plan.unstack(o) for o in out.chunk(n_b)]
        return sum(b.weight * p for b, p in zip(sets.branches, preds))

    @torch.no_grad()
    def __call__(self, reference_images=None, prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, image_guidance_scale: float = 1.5,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 reference_captions: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 max_set_size: int = 8, use_reference_cache: bool | None = None,
                 batch_guidance_branches: bool = True, return_dict: bool = True):
        """Generate num_images_per_prompt images per prompt of the subject in reference_images.

        reference_images: paths (files or a subject folder), PIL images, arrays or tensors; any size/mode.
        reference_captions: optional caption(s) of the references (training showed references with
            their captions); default "".
        guidance_scale: text CFG scale s_txt; image_guidance_scale: s_img (0 = plain text-to-image,
            > 1 strengthens identity).
        max_set_size: targets per set are max(1, max_set_size - K); every set holds all K references.
        use_reference_cache: None = use it when the model supports it (same images, faster); True =
            require it (error if unsupported); False = never.
        batch_guidance_branches: False runs the guidance branches as separate UNet calls (less memory).
        Returns JeDiPipelineOutput(images, reference_images) or (images, reference_images).
        """
        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        self.check_inputs(prompts, output_type, num_images_per_prompt, num_inference_steps)
        device, dtype = self._execution_device, self.denoiser.dtype
        m = len(prompts) * num_images_per_prompt

        # 2. Load and encode the references (none used: plain text-to-image)
        ref_latents, ref_pils = self.prepare_references(reference_images, image_guidance_scale)
        use_refs = ref_latents is not None
        use_cache = self._use_cache(use_reference_cache, use_refs)

        # 3. Encode prompt: the targets' cond / uncond text, the references' captions
        negatives = self._as_list(negative_prompt, len(prompts), "negative_prompt")
        ref_caps = self._as_list(reference_captions, len(ref_pils), "reference_captions") if use_refs else []
        cond, uncond, ref_text = self.encode_prompt(prompts, negatives, ref_caps, num_images_per_prompt)

        # 4. Prepare sets and guidance branches (and record the reference cache)
        sets = self.prepare_sets(cond, uncond, ref_text, ref_latents, guidance_scale=guidance_scale,
                                 image_guidance_scale=image_guidance_scale, max_set_size=max_set_size,
                                 use_cache=use_cache, batch_guidance_branches=batch_guidance_branches)

        # 5. Prepare timesteps
        self.prepare_timesteps(num_inference_steps, device, self.latent_size)

        # 6. Prepare latents: the targets' noise is drawn before the references' (a seed's images depend on it)
        latents = self.prepare_latents(m, generator, device, dtype)
        ref_noise = self.prepare_reference_noise(sets, generator, device, dtype)

        # 7. Denoising loop
        step_kwargs = self._step_kwargs(generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(latents, t) if hasattr(self.scheduler, "scale_model_input") \
                else latents
            pred = self.predict(sets, x_in, t, ref_noise)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample

        # 8. Decode
        images = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, ref_pils
        return JeDiPipelineOutput(images=images, reference_images=ref_pils)

    def _record_references(self, ref_latents: torch.Tensor, ref_text, guidance=None) -> ReferenceKVCache:
        """One forward pass of the references alone, as every coupled branch would show them."""
        cache = ReferenceKVCache()
        k = ref_latents.shape[0]
        visible = torch.ones(k, dtype=torch.bool, device=ref_latents.device)
        layout = SetLayout.references_only(k, ref_latents.device).with_reference_cache(cache)
        t0 = torch.zeros(k, dtype=torch.long, device=ref_latents.device)
        model = self.denoiser
        model.denoise(model.assemble_input(ref_latents, ref_latents, visible), t0, ref_text, layout, guidance=guidance)
        cache.recording = False
        return cache

    @staticmethod
    def _calls(plan: SetPlan, branches: list[Branch], batched: bool, cache, device):
        """[(branch indices, layout)]: one UNet call for all branches, or one per branch."""
        groups = [list(range(len(branches)))] if batched else [[i] for i in range(len(branches))]
        calls = []
        for sel in groups:
            layout = plan.layout([branches[i] for i in sel], device)
            calls.append((sel, layout.with_reference_cache(cache) if cache is not None else layout))
        return calls

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = self.codec.decode(latents).float().clamp(-1, 1)
        return self.image_processor.postprocess(images, output_type=output_type,
                                                do_denormalize=[True] * images.shape[0])


class JeDiFluxPipeline(JeDiPipeline):
    """JeDi on FLUX.1: the same sampling loop (`JeDiPipeline.__call__`), with the family's parts: the joint
    MM-DiT (`transformer`), CLIP + T5 text, the flow-matching scheduler with FLUX's resolution-dependent
    shift, and for guidance-distilled checkpoints (FLUX.1-dev) the text guidance scale fed to the model
    (image guidance still runs its branches). JeDiPipeline.from_pretrained returns this class for FLUX exports."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components: ClassVar[list[str]] = []
    joint_class = JointFluxTransformer2DModel
    lora_loader = FluxLoraLoaderMixin  # the family's diffusers LoRA format (`transformer.*` keys)
    lora_load_kwargs: ClassVar[dict] = {"network_alphas": None}  # FLUX's loader requires them; SD3's has none

    def __init__(self, transformer, text_encoder: CLIPTextModel, tokenizer, text_encoder_2, tokenizer_2, scheduler,
                 vae: AutoencoderKL):
        self._register_mmdit(transformer, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                             tokenizer_2=tokenizer_2, scheduler=scheduler, vae=vae)

    def _register_mmdit(self, transformer, **components) -> None:
        """The family's joint transformer (a saved one adopted back into its joint class) + its components."""
        DiffusionPipeline.__init__(self)
        transformer = self.joint_class.adopt(transformer)
        if not isinstance(transformer, self.joint_class) or transformer.jedi is None:
            raise ValueError(f"the pipeline's transformer is a plain {type(transformer).__name__} without JeDi "
                             "settings (_jedi); export the trained model with jedi-export")
        self.register_modules(transformer=transformer, **components)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.codec.downsample)

    @property
    def denoiser(self):
        return self.transformer

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def prepare_timesteps(self, num_inference_steps: int, device, latent_size: int) -> None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)  # as FluxPipeline
        mu = flow_mu(self.scheduler.config, (latent_size // 2) ** 2)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, **({"mu": mu} if mu is not None else {}))

    def noise_references(self, ref_latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        sigma = float(t) / 1000
        return (1 - sigma) * ref_latents + sigma * noise

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' LoRA loading of the family, plus the full weights trained beside the adapter (the widened
        input embedding: FLUX's x_embedder, SD3's patch embedding)."""
        state, metadata = self.lora_loader.lora_state_dict(pretrained_model_name_or_path_or_dict,
                                                           return_lora_metadata=True, **kwargs)
        self._load_full_weights(state, "transformer")
        self.lora_loader.load_lora_into_transformer(state, transformer=self.transformer, adapter_name=adapter_name,
                                                    metadata=metadata, _pipeline=self, **self.lora_load_kwargs)

    @classmethod
    def save_lora_weights(cls, save_directory, unet_lora_layers=None, unet_lora_adapter_metadata=None, **kwargs):
        """The adapter in the family's diffusers format (`transformer.*` keys)."""
        cls.lora_loader.save_lora_weights(save_directory, transformer_lora_layers=unet_lora_layers,
                                          transformer_lora_adapter_metadata=unet_lora_adapter_metadata, **kwargs)


class JeDiSD3Pipeline(JeDiFluxPipeline):
    """JeDi on Stable Diffusion 3 / 3.5: FLUX's loop parts (an MM-DiT `transformer`, flow matching, references
    re-noised along the straight path) with SD3's: three text encoders (CLIP-L, CLIP-G, T5), real text
    guidance (SD3 is not guidance-distilled: the unconditional branch runs), the scheduler's own shift
    (StableDiffusion3Pipeline's timesteps). JeDiPipeline.from_pretrained returns this class for SD3 exports."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    joint_class = JointSD3Transformer2DModel
    lora_loader = SD3LoraLoaderMixin
    lora_load_kwargs: ClassVar[dict] = {}

    def __init__(self, transformer, text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer_2: CLIPTokenizer, text_encoder_3, tokenizer_3,
                 scheduler, vae: AutoencoderKL):
        self._register_mmdit(transformer, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                             tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
                             scheduler=scheduler, vae=vae)

    @property
    def guidance_distilled(self) -> bool:
        return False

    def prepare_timesteps(self, num_inference_steps: int, device, latent_size: int) -> None:
        JeDiPipeline.prepare_timesteps(self, num_inference_steps, device, latent_size)
