"""The code an exported pipeline carries, so that plain diffusers loads it without jedi_train:

    DiffusionPipeline.from_pretrained(EXPORT_DIR, trust_remote_code=True)

diffusers' convention for a pipeline with its own code: model_index.json names it
``"_class_name": ["jedi_pipeline", "JeDiPipeline"]`` and ``jedi_pipeline.py`` sits in the directory;
diffusers copies that file and the modules it imports relatively (one level: the entry file must
import each of them itself) into its module cache and imports them. The UNet is saved as a plain
``UNet2DConditionModel`` whose config keeps the JeDi settings (``_jedi``); the pipeline turns it back
into the joint UNet (`JointUNet2DConditionModel.adopt`), so no component needs custom code.

The bundle is this project's own source, flattened into one folder (imports rewritten), written by
every JeDiPipeline.save_pretrained: one implementation, never a second copy to keep in sync.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re

ENTRY = "jedi_pipeline"
# file in the export (prefixed: diffusers imports every local custom pipeline's files into one shared
# package, diffusers_modules.local, so a plain "attention.py" could meet another pipeline's) -> the module
# of this project it is copied from (the pipeline's import closure)
MODULES = {
    ENTRY: "jedi_train.pipelines.pipeline_jedi",
    "jedi_attention": "jedi_train.models.attention",
    "jedi_components": "jedi_train.models.components",
    "jedi_joint": "jedi_train.models.joint",
    "jedi_joint_unet": "jedi_train.models.joint_unet",
    "jedi_joint_flux": "jedi_train.models.joint_flux",
    "jedi_joint_sd3": "jedi_train.models.joint_sd3",
    "jedi_text": "jedi_train.models.text",
    "jedi_references": "jedi_train.pipelines.references",
    "jedi_set_plan": "jedi_train.pipelines.set_plan",
    "jedi_images": "data_pipelines.images",
    "jedi_bundle": "jedi_train.pipelines.bundle",  # so that a pipeline loaded from an export saves a loadable export too
}
_FILE_OF = {module.rsplit(".", 1)[1]: name for name, module in MODULES.items()}  # "attention" -> "jedi_attention"
_PROJECT_IMPORT = re.compile(r"^[ \t]*(from|import)[ \t]+(\.|jedi_train\b|data_pipelines\b)", re.MULTILINE)
_RELATIVE = re.compile(r"^([ \t]*)from \.(?:model\.)?(\w+) import", re.MULTILINE)


def _flatten(source: str) -> str:
    source = _RELATIVE.sub(lambda m: f"{m.group(1)}from .{_FILE_OF.get(m.group(2), m.group(2))} import", source)
    return re.sub(r"^([ \t]*)from data_pipelines\.images import", r"\1from .jedi_images import", source,
                  flags=re.MULTILINE)


def bundle_sources() -> dict[str, str]:
    """{file name: flattened source} for every bundled module; raises if one imports project code that
    the bundle does not carry (a new import in pipeline.py must be added to MODULES)."""
    out = {}
    for name, module in MODULES.items():
        if __name__.startswith("jedi_train."):
            path = importlib.util.find_spec(module).origin
        else:  # running from an export's bundle: the flattened files sit next to this one
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
        with open(path, encoding="utf-8") as f:
            source = _flatten(f.read())
        for m in _PROJECT_IMPORT.finditer(source):
            line = source[m.start():source.index("\n", m.start())].strip()
            target = re.match(r"from \.(\w+) import", line)
            if not (target and target.group(1) in MODULES) and "import jedi_train" not in line:
                raise RuntimeError(f"{module} imports project code the export bundle lacks ({line!r}); "
                                   "add the module to jedi_train/pipelines/bundle.py MODULES")
        out[f"{name}.py"] = source
    entry = out[f"{ENTRY}.py"]
    missing = [n for n in MODULES if n != ENTRY and not re.search(rf"^from \.{n} import", entry, re.MULTILINE)]
    if missing and "# carried with the export" not in entry:  # diffusers copies only what the entry imports
        out[f"{ENTRY}.py"] = entry + (
            "\n\n# carried with the export: diffusers copies only the modules this file imports itself\n"
            + "".join(f"from .{n} import __name__ as _bundled_{n}  # noqa: E402,F401\n" for n in missing))
    return out


def write_bundle(out_dir: str, class_name: str = "JeDiPipeline") -> None:
    """Write the bundle into a saved pipeline directory and point model_index.json at it."""
    for name, source in bundle_sources().items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(source)
    index_path = os.path.join(out_dir, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["_class_name"] = [ENTRY, class_name]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
