"""jedi-train: Joint-Image Diffusion (JeDi) training and sampling.

Heavy imports are lazy (`import jedi_train` stays light): `jedi_train.JeDiPipeline` and
`jedi_train.JointUNet2DConditionModel` load on first use. The latter is also how saved pipelines
name their UNet class in model_index.json (["jedi_train", "JointUNet2DConditionModel"]).
"""
from importlib import import_module

import jedi_common.quiet  # noqa: F401  (optional packages' import-time noise off stderr)

_LAZY = {
    "JeDiPipeline": "jedi_train.pipelines.pipeline_jedi",
    "JeDiPipelineOutput": "jedi_train.pipelines.pipeline_jedi",
    "JointUNet2DConditionModel": "jedi_train.models.joint_unet",
    "make_grid": "jedi_train.viz",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jedi_train' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
