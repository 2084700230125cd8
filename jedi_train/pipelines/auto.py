"""`JeDiAutoPipeline.from_pretrained(DIR)`: the saved pipeline class, looked up in the family table (as
diffusers' auto_pipeline.py picks a class from the saved config). The one loader jedi-sample, jedi-eval,
jedi-app and the model card use; exports of every age load through it (their model_index.json names
JeDiPipeline, JeDiFluxPipeline, JeDiSD3Pipeline, ...)."""
from __future__ import annotations

import os

from jedi_train.models import families
from jedi_train.pipelines.pipeline_jedi import saved_class_name


def pipeline_classes() -> dict[str, type]:
    """{class name: class} of every family's pipeline."""
    return {c.__name__: c for c in (f.pipeline() for f in families.FAMILIES.values())}


class JeDiAutoPipeline:
    """Not instantiated: `from_pretrained` returns the family's pipeline."""

    @classmethod
    def pipeline_class(cls, pipeline_dir: str) -> type:
        path = os.fspath(pipeline_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"pipeline directory {path} does not exist; give the folder jedi-export wrote")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path} has no model_index.json, so it is not a saved pipeline; export one "
                                    "with jedi-export CHECKPOINT OUT_DIR")
        name = saved_class_name(path)
        classes = pipeline_classes()
        if name not in classes:
            raise ValueError(f"{path} holds a {name}, not a JeDi pipeline ({', '.join(classes)}); give a directory "
                             "jedi-export wrote")
        return classes[name]

    @classmethod
    def from_pretrained(cls, pipeline_dir, **kwargs):
        return cls.pipeline_class(pipeline_dir).from_pretrained(pipeline_dir, **kwargs)
