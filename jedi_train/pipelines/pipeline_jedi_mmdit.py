"""The MM-DiT families' shared pipeline parts (FLUX.1, SD3): a `transformer` denoiser, flow matching (references
re-noised along the straight path), the family's diffusers LoRA format (the family table's lora_loader).
Siblings subclass it (pipeline_jedi_flux.py, pipeline_jedi_sd3.py); the loop is pipeline_jedi.py's."""
from __future__ import annotations

from typing import ClassVar

import torch

from jedi_train.models import families
from jedi_train.pipelines.pipeline_jedi import JeDiBasePipeline


class JeDiMMDiTPipeline(JeDiBasePipeline):
    denoiser_name = "transformer"
    _optional_components: ClassVar[list[str]] = []
    joint_class: ClassVar[type]  # the family's joint transformer
    lora_load_kwargs: ClassVar[dict] = {}  # the family loader's extra arguments

    def _register_mmdit(self, transformer, **components) -> None:
        """The family's joint transformer (a saved one adopted back into its joint class) + its components."""
        JeDiBasePipeline.__init__(self)
        transformer = self.joint_class.adopt(transformer)
        if not isinstance(transformer, self.joint_class) or transformer.jedi is None:
            raise ValueError(f"the pipeline's transformer is a plain {type(transformer).__name__} without JeDi "
                             "settings (_jedi); export the trained model with jedi-export")
        self.register_modules(transformer=transformer, **components)
        self._finish_init()

    @classmethod
    def lora_loader(cls):
        """The family's diffusers LoRA loader, as the family table names it."""
        for family in families.FAMILIES.values():
            if family.joint() is cls.joint_class:
                return family.lora()
        raise ValueError(f"{cls.joint_class.__name__} is in no row of the family table")

    def noise_references(self, ref_latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        sigma = float(t) / 1000
        return (1 - sigma) * ref_latents + sigma * noise

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' LoRA loading of the family, plus the full weights trained beside the adapter (the widened
        input embedding: FLUX's x_embedder, SD3's patch embedding)."""
        loader = self.lora_loader()
        state, metadata = loader.lora_state_dict(pretrained_model_name_or_path_or_dict, return_lora_metadata=True,
                                                 **kwargs)
        self._load_full_weights(state, "transformer")
        loader.load_lora_into_transformer(state, transformer=self.transformer, adapter_name=adapter_name,
                                          metadata=metadata, _pipeline=self, **self.lora_load_kwargs)

    @classmethod
    def save_lora_weights(cls, save_directory, unet_lora_layers=None, unet_lora_adapter_metadata=None, **kwargs):
        """The adapter in the family's diffusers format (`transformer.*` keys)."""
        cls.lora_loader().save_lora_weights(save_directory, transformer_lora_layers=unet_lora_layers,
                                            transformer_lora_adapter_metadata=unet_lora_adapter_metadata, **kwargs)
