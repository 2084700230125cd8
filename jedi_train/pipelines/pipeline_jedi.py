"""The shared JeDi sampling loop: personalized text-to-image from K reference photos, no finetuning.

`JeDiBasePipeline` (a diffusers DiffusionPipeline) is what every family's pipeline runs; each family's file
(pipeline_jedi_sd.py: SD 1.x/2.x + SDXL; pipeline_jedi_flux.py, pipeline_jedi_sd3.py over the MM-DiT base in
pipeline_jedi_mmdit.py) adds only its components and hooks: `denoiser_name`, `sampling_scheduler`,
`prepare_timesteps`, `noise_references`, `guidance_distilled`, `combine_guidance`, LoRA loading.
jedi_train.pipelines.auto picks the class of a saved pipeline (JeDiAutoPipeline.from_pretrained).

The references join each set as known images, exactly as training showed them to the denoiser
(objective.py): clean latent in the reference slot, mask 1, timestep 0 (reference_timestep 'zero')
or re-noised to the set's timestep ('target'); the targets start from noise and are sampled with
whatever diffusers scheduler is installed. Image guidance (docs/method.md) runs its three branches
(no text + references hidden, no text + references, text + references) in one batched denoiser call
per step; image_guidance_scale = 0 is plain text-to-image (references hidden in every branch).
How targets are grouped into sets when K + M is large: see set_plan.py. Several subjects in one call
(prompt = one list per subject) share every denoiser call; each subject's sets hold its own references.

Reference key/value cache (use_reference_cache): for models trained with references at t = 0 that
attend only to references, the references' keys/values are recorded in one references-only pass
and replayed at every step; the sets then hold only targets. Same images, far less work per step.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from jedi_train.models import families
from jedi_train.models.attention import ReferenceKVCache, SetLayout
from jedi_train.models.components import LatentCodec, model_resolution
from jedi_train.models.families import Family
from jedi_train.models.joint import JointDenoiserMixin, mismatched_weights
from jedi_train.models.text import PromptEncoder, TextEmbeddings
from jedi_train.pipelines.attention_maps import AttentionMap, AttentionRecorder, recorded_steps
from jedi_train.pipelines.references import load_references
from jedi_train.pipelines.set_plan import Branch, SetPlan, guidance_branches

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def saved_class_name(path: str) -> str | None:
    """The pipeline class a saved directory names (model_index.json; a bundled ["module", "Class"] pair too)."""
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
    # several subjects in one call (prompt = one list per subject): both are one list per subject
    # return_attention_maps=True: per image (same order), its attention shares and heatmaps (attention_maps.py)
    attention_maps: list[AttentionMap] | None = None


@dataclass
class Subject:
    """One subject of a sampling call: its references, prompts, reference captions, negative prompt."""
    references: object
    prompts: list[str]
    captions: object = None
    negatives: object = None


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


class JeDiBasePipeline(DiffusionPipeline):
    denoiser_name = "unet"  # the component every step calls: "unet" | "transformer"

    def _finish_init(self) -> None:
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.codec.downsample)

    # -- persistence -----------------------------------------------------------------------------
    def register_modules(self, **kwargs):
        super().register_modules(**kwargs)
        self._register_denoiser_library()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == self.denoiser_name:
            self._register_denoiser_library()

    def _register_denoiser_library(self):
        # the joint model is saved as what it loads as without jedi_train: its plain diffusers class
        # (UNet2DConditionModel, FluxTransformer2DModel, ...) whose config keeps the JeDi settings (`adopt`
        # restores the joint class)
        model = getattr(self, self.denoiser_name, None)
        if isinstance(model, JointDenoiserMixin):
            self.register_to_config(**{self.denoiser_name: ("diffusers", type(model).__bases__[-1].__name__)})

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save_pretrained plus the pipeline's code (bundle.py): the directory then loads with
        JeDiPipeline.from_pretrained and with DiffusionPipeline.from_pretrained(..., trust_remote_code=True)."""
        from jedi_train.pipelines.bundle import write_bundle  # imported here: bundle.py reads this file

        super().save_pretrained(save_directory, *args, **kwargs)
        write_bundle(os.fspath(save_directory), type(self))

    def _load_full_weights(self, state: dict, prefix: str) -> None:
        """Pop the `<prefix>.<name>` keys without 'lora' (weights trained in full) and load them into the denoiser."""
        full = {k[len(prefix) + 1:]: state.pop(k) for k in list(state) if k.startswith(prefix + ".") and "lora" not in k}
        if full:
            bad, _ = mismatched_weights(self.denoiser, full)
            if bad:
                raise ValueError(f"the LoRA file's full weight {bad[0]!r} does not fit this pipeline's {prefix}; load "
                                 "it into a pipeline of the base model it was trained on (same conditioning)")
            self.denoiser.load_state_dict(full, strict=False)

    @classmethod
    def load_config(cls, *args, **kwargs):
        # model_index.json names the bundled code (["pipeline_jedi_sd", "JeDiPipeline"]) for generic loading;
        # from_pretrained uses the installed class instead, so drop that pointer here
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), list) and issubclass(cls, JeDiBasePipeline):
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
        saved = saved_class_name(path)
        if saved is not None and saved != cls.__name__:
            raise ValueError(f"{path} holds a {saved}, not a {cls.__name__}; load it with "
                             "JeDiAutoPipeline.from_pretrained (jedi_train.pipelines.auto), which picks the class")
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def from_components(cls, components, denoiser=None) -> JeDiBasePipeline:
        """The pipeline of a model being trained (validation grids, export), as diffusers' training scripts
        build theirs: the loaded components, with `denoiser` (e.g. an EMA or fused copy) in place of theirs.
        The family table names the pipeline class; its `sampling_scheduler` hook picks the scheduler."""
        pipeline = components.family_row.pipeline()
        text = {k: v for k, v in components.text_parts().items() if v is not None}
        return pipeline(**{pipeline.denoiser_name: denoiser or components.denoiser},
                        scheduler=pipeline.sampling_scheduler(components.noise_scheduler), vae=components.vae, **text)

    @staticmethod
    def sampling_scheduler(noise_scheduler):
        """Family hook: the scheduler an export samples with, from the one the model trains with."""
        return copy.deepcopy(noise_scheduler)

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
        """The joint model every step calls (the family's `unet` or `transformer` component)."""
        return getattr(self, self.denoiser_name)

    @property
    def family(self) -> Family:
        return families.family_of(self.denoiser)

    def describe(self) -> str:
        """One line for model cards and jedi-app: family, denoiser class and size, codec, resolution."""
        model = self.denoiser
        u, jedi = model.config, model.jedi
        params = sum(p.numel() for p in model.parameters())
        space = (f"pixel space (pixels folded {jedi.pixel_fold}x{jedi.pixel_fold})" if self.vae is None
                 else f"latent space ({type(self.vae).__name__}, /{self.codec.downsample})")
        shape = (f"blocks {list(u.block_out_channels)}" if "block_out_channels" in u else
                 f"{u.num_layers} double + {u.num_single_layers} single-stream blocks" if "num_single_layers" in u
                 else f"{u.num_layers} joint blocks")
        return (f"{self.family.title}: {type(model).__name__} ({params / 1e6:.1f} M parameters, {shape}), {space}, "
                f"{self.resolution} px")

    def reference_cache_supported(self) -> bool:
        return self.denoiser.jedi.reference_timestep == "zero" and self.denoiser.jedi.reference_attention == "references"

    # -- pieces ----------------------------------------------------------------------------------
    @property
    def prompt_encoder(self) -> PromptEncoder:
        return PromptEncoder.of(self.family.text_layout, self.tokenizer, self.text_encoder,
                                getattr(self, "tokenizer_2", None), getattr(self, "text_encoder_2", None),
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
        """Family hook: the scheduler's own spacing unless the family has its own (FLUX's shifted sigmas)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)

    def noise_references(self, ref_latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Family hook: references re-noised to the step's t (models trained with reference_timestep 'target')."""
        raise NotImplementedError

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

    @staticmethod
    def split_subjects(reference_images, prompt, reference_captions, negative_prompt) -> tuple[list[Subject], bool]:
        """The call's subjects, and whether it named several (prompt = one list of prompts per subject)."""
        if not (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt)):
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            return [Subject(reference_images, prompts, reference_captions, negative_prompt)], False
        j = len(prompt)

        def per_subject(value, name):
            if value is None or isinstance(value, str):
                return [value] * j
            value = list(value)
            if len(value) != j:
                raise ValueError(f"{name} has {len(value)} entries for {j} subjects (prompt is one list per "
                                 f"subject); give one entry per subject")
            return value

        refs = per_subject(reference_images, "reference_images") if reference_images is not None else [None] * j
        return [Subject(r, list(p), c, n) for r, p, c, n in zip(
            refs, prompt, per_subject(reference_captions, "reference_captions"),
            per_subject(negative_prompt, "negative_prompt"))], True

    def prepare_subject_references(self, subjects: list[Subject], image_guidance_scale: float):
        """(every subject's reference latents, subject-major, or None; each subject's PIL references)."""
        prepared, seen = [], {}
        for s in subjects:  # subjects given the same reference files (jedi-generate: a job's images) load once
            refs = s.references
            files = [refs] if isinstance(refs, (str, os.PathLike)) else refs
            key = tuple(map(os.fspath, files)) if isinstance(files, (list, tuple)) and all(
                isinstance(f, (str, os.PathLike)) for f in files) else id(refs)
            if key not in seen:
                seen[key] = self.prepare_references(refs, image_guidance_scale)
            prepared.append(seen[key])
        counts = sorted({len(pils) for _, pils in prepared})
        if len(counts) > 1:
            raise ValueError(f"subjects sampled in one call need the same number of references, got {counts}; "
                             "group subjects by their reference count")
        latents = [lat for lat, _ in prepared]
        return (torch.cat(latents) if latents[0] is not None else None), [pils for _, pils in prepared]

    def encode_prompt(self, prompts: list[str], negatives: list[str], ref_caps: list[str],
                      num_images_per_prompt: int) -> tuple[TextEmbeddings, TextEmbeddings, TextEmbeddings]:
        """(cond, uncond) per target, prompt-major, and the references' text: one text-encoder call."""
        n = len(prompts)
        emb = self.encode_text(prompts + negatives + ref_caps)
        per_target = torch.arange(n * num_images_per_prompt, device=self._execution_device) // num_images_per_prompt
        return emb[:n][per_target], emb[n:2 * n][per_target], emb[2 * n:]

    def prepare_sets(self, cond: TextEmbeddings, uncond: TextEmbeddings, ref_text: TextEmbeddings,
                     ref_latents: torch.Tensor | None, *, guidance_scale: float, image_guidance_scale: float,
                     max_set_size: int, use_cache: bool, batch_guidance_branches: bool,
                     targets_per_subject: list[int] | None = None) -> GuidedSets:
        """Sets and guidance branches (see set_plan.py); cached references leave the sets' batch slots,
        their keys/values are recorded here, once. targets_per_subject: several subjects in one call (their
        references and targets subject-major), each subject's sets holding its own references."""
        device, m = self._execution_device, len(cond)  # m targets
        use_refs = ref_latents is not None
        subjects = len(targets_per_subject) if targets_per_subject else 1
        k = ref_latents.shape[0] // subjects if use_refs else 0
        distilled = self.guidance_distilled  # text guidance is an input of the model, not a branch
        branches = guidance_branches(1.0 if distilled else guidance_scale, image_guidance_scale, use_refs)
        plan = SetPlan.build(targets_per_subject or m, 0 if use_cache else k, k, max_set_size)
        guidance = guidance_scale if distilled else None  # every image's model input, references' too
        cache = self._record_references(ref_latents, ref_text, guidance, subjects) if use_cache else None
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

    def prepare_noise(self, sets: GuidedSets, targets_per_subject: list[int], generator, subject_generators: bool,
                      device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the targets' starting noise, the references' re-noising noise or None). With one generator per
        subject, each subject draws its own as a call of its own would: a batched call gives its images."""
        if not subject_generators:
            return (self.prepare_latents(sum(targets_per_subject), generator, device, dtype),
                    self.prepare_reference_noise(sets, generator, device, dtype))
        k = sets.ref_latents.shape[0] // len(targets_per_subject) if sets.ref_latents is not None else 0
        latents, ref_noise = [], []
        for m, g in zip(targets_per_subject, generator):
            latents.append(self.prepare_latents(m, g, device, dtype))
            if sets.plan.num_refs and self.denoiser.jedi.reference_timestep == "target":
                first = g[0] if isinstance(g, list) else g  # as a call of its own draws it
                ref_noise.append(randn_tensor((k, *sets.ref_latents.shape[1:]), generator=first, device=device,
                                              dtype=dtype))
        return torch.cat(latents), (torch.cat(ref_noise) if ref_noise else None)

    def predict(self, sets: GuidedSets, x_in: torch.Tensor, t, ref_noise: torch.Tensor | None,
                calls: list | None = None) -> torch.Tensor:
        """One timestep's guided prediction for the targets: every branch's sets through its model call,
        the branches' predictions summed with their weights. calls: sets.calls unless given (a recording step's,
        see `attention_recording`)."""
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
        for sel, layout in calls or sets.calls:
            n_b = len(sel)
            visible = torch.cat([sets.is_ref & sets.branches[b].refs for b in sel])
            model_in = model.assemble_input(noisy.repeat(n_b, 1, 1, 1), clean.repeat(n_b, 1, 1, 1), visible)
            out = model.denoise(model_in, t_img.repeat(n_b), TextEmbeddings.cat([sets.text[b] for b in sel]),
                                layout, guidance=sets.guidance)
            preds += [plan.unstack(o) for o in out.chunk(n_b)]
        return self.combine_guidance(sets.branches, preds)

    def combine_guidance(self, branches: list[Branch], preds: list[torch.Tensor]) -> torch.Tensor:
        """Family hook: the guided prediction from the branches' (set_plan.guidance_branches: a weighted sum)."""
        return sum(b.weight * p for b, p in zip(branches, preds))

    @torch.no_grad()
    def __call__(self, reference_images=None, prompt: str | list[str] | list[list[str]] | None = None,
                 num_images_per_prompt: int = 1,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, image_guidance_scale: float = 1.5,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 reference_captions: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 max_set_size: int = 8, use_reference_cache: bool | None = None,
                 batch_guidance_branches: bool = True, return_attention_maps: bool = False,
                 return_dict: bool = True):
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
        Several subjects in one call (faster: one denoiser call per step for all): prompt = one list of
        prompts per subject, reference_images = one reference list per subject (each subject the same
        number), reference_captions / negative_prompt = a string or one list per subject, generator = one
        per subject, each a generator or a list of one per image of that subject (then each subject's images
        are those of a call of its own, for deterministic samplers);
        images and reference_images then come back as one list per subject.
        return_attention_maps: also return, per image, the share of its attention on each reference, on itself
            and on the other targets of its set (summing to 1), and a heatmap per reference over its token grid;
            averaged over heads, coupled layers and the last third of the steps, from the conditional branch
            with references visible, text tokens left out (attention_maps.py). Off: no extra work at all.
        Returns JeDiPipelineOutput(images, reference_images, attention_maps or None), or (images,
        reference_images) (+ attention_maps when asked for).
        """
        # 1. Check inputs (a plain call is one subject)
        subjects, several = self.split_subjects(reference_images, prompt, reference_captions, negative_prompt)
        for s in subjects:
            self.check_inputs(s.prompts, output_type, num_images_per_prompt, num_inference_steps)
        device, dtype = self._execution_device, self.denoiser.dtype
        per_subject = [len(s.prompts) * num_images_per_prompt for s in subjects]
        subject_generators = several and isinstance(generator, list)
        if subject_generators and len(generator) != len(subjects):
            raise ValueError(f"generator has {len(generator)} entries for {len(subjects)} subjects; give one per subject")
        if several and return_attention_maps:
            raise ValueError("return_attention_maps takes one subject per call; sample the subjects one by one")

        # 2. Load and encode the references (none used: plain text-to-image)
        ref_latents, ref_pils = self.prepare_subject_references(subjects, image_guidance_scale)
        use_refs = ref_latents is not None
        use_cache = self._use_cache(use_reference_cache, use_refs)

        # 3. Encode prompt: the targets' cond / uncond text, the references' captions (subject-major)
        prompts = [p for s in subjects for p in s.prompts]
        negatives = [n for s in subjects for n in self._as_list(s.negatives, len(s.prompts), "negative_prompt")]
        ref_caps = [c for s, pils in zip(subjects, ref_pils)
                    for c in self._as_list(s.captions, len(pils), "reference_captions")] if use_refs else []
        cond, uncond, ref_text = self.encode_prompt(prompts, negatives, ref_caps, num_images_per_prompt)

        # 4. Prepare sets and guidance branches (and record the reference cache)
        sets = self.prepare_sets(cond, uncond, ref_text, ref_latents, guidance_scale=guidance_scale,
                                 image_guidance_scale=image_guidance_scale, max_set_size=max_set_size,
                                 use_cache=use_cache, batch_guidance_branches=batch_guidance_branches,
                                 targets_per_subject=per_subject if several else None)

        # 5. Prepare timesteps
        self.prepare_timesteps(num_inference_steps, device, self.latent_size)

        # 6. Prepare latents: the targets' noise is drawn before the references' (a seed's images depend on it)
        latents, ref_noise = self.prepare_noise(sets, per_subject, generator, subject_generators, device, dtype)

        # 7. Denoising loop (with attention maps: the last third of the steps through recording layouts)
        step_kwargs = self._step_kwargs([x for g, m in zip(generator, per_subject) for x in (
            g if isinstance(g, list) else [g] * m)] if subject_generators else generator)
        recorder = self.attention_recording(sets, ref_latents) if return_attention_maps else None
        record_from = recorded_steps(len(self.scheduler.timesteps)).start
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x_in = self.scheduler.scale_model_input(latents, t) if hasattr(self.scheduler, "scale_model_input") \
                else latents
            calls = recorder.calls if recorder is not None and i >= record_from else None
            pred = self.predict(sets, x_in, t, ref_noise, calls)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample

        # 8. Decode
        images = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        maps = recorder.maps() if recorder is not None else None
        if several:
            starts = np.cumsum([0] + per_subject)
            images = [images[a:b] for a, b in itertools.pairwise(starts.tolist())]
        else:
            ref_pils = ref_pils[0]
        if not return_dict:
            return (images, ref_pils) if maps is None else (images, ref_pils, maps)
        return JeDiPipelineOutput(images=images, reference_images=ref_pils, attention_maps=maps)

    @staticmethod
    def attention_recording(sets: GuidedSets, ref_latents: torch.Tensor | None) -> AttentionRecorder:
        """A recorder for the branch the maps come from (the conditional one with references visible, else the
        references-visible one), and `recorder.calls`: sets.calls with that branch's call carrying it."""
        use_refs = ref_latents is not None
        pick = [i for i, b in enumerate(sets.branches) if b.refs == use_refs]
        branch = next((i for i in pick if sets.branches[i].text == "cond"), pick[0])
        calls = list(sets.calls)
        for c, (sel, layout) in enumerate(calls):
            if branch in sel:
                s = sets.plan.num_sets
                rows = slice(sel.index(branch) * s, (sel.index(branch) + 1) * s)
                recorder = AttentionRecorder(sets.plan, ref_latents.shape[0] if use_refs else 0, rows)
                calls[c] = (sel, layout.with_attention_recorder(recorder))
                recorder.calls = calls
                return recorder
        raise RuntimeError(f"guidance branch {branch} is in no model call")

    def _record_references(self, ref_latents: torch.Tensor, ref_text, guidance=None,
                           subjects: int = 1) -> ReferenceKVCache:
        """One forward pass of the references alone (one set per subject), as every coupled branch would
        show them."""
        cache = ReferenceKVCache()
        n = ref_latents.shape[0]
        visible = torch.ones(n, dtype=torch.bool, device=ref_latents.device)
        layout = SetLayout.references_only(n // subjects, ref_latents.device, subjects).with_reference_cache(cache)
        t0 = torch.zeros(n, dtype=torch.long, device=ref_latents.device)
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
            rows = plan.set_owner.repeat(len(sel)) if plan.set_owner is not None else None  # branch-major
            calls.append((sel, layout.with_reference_cache(cache, rows) if cache is not None else layout))
        return calls

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = self.codec.decode(latents).float().clamp(-1, 1)
        return self.image_processor.postprocess(images, output_type=output_type,
                                                do_denormalize=[True] * images.shape[0])
