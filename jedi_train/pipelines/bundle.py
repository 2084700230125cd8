"""The code an exported pipeline carries, so that plain diffusers loads it without jedi_train:

    DiffusionPipeline.from_pretrained(EXPORT_DIR, trust_remote_code=True)

diffusers' convention for a pipeline with its own code: model_index.json names it
``"_class_name": ["pipeline_jedi_flux", "JeDiFluxPipeline"]`` and ``pipeline_jedi_flux.py`` sits in the
directory; diffusers copies that file and the modules it imports relatively (one level: the entry file must
import each of them itself) into its module cache and imports them. The denoiser is saved as its plain
diffusers class (``UNet2DConditionModel``, ``FluxTransformer2DModel``, ...) whose config keeps the JeDi
settings (``_jedi``); the pipeline turns it back into the joint class (`adopt`), so no component needs
custom code.

The bundle is this project's own source, flattened into one folder, written by every save_pretrained: one
implementation, never a second copy to keep in sync. Which modules it carries is not listed by hand: it
follows the entry module's project imports (at any depth, function-level ones included) and refuses any
outside the rooms an export may carry (pipelines/, models/, data_pipelines.images).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re

PROJECT = ("jedi_train", "data_pipelines", "jedi_common")
# what an export may carry: the pipelines and plain models, and the image helpers the references use
CARRIED = ("jedi_train.pipelines.", "jedi_train.models.", "data_pipelines.images")


def flat_name(module: str) -> str:
    """jedi_train.models.attention -> jedi_attention; jedi_train.pipelines.pipeline_jedi_flux -> itself.
    Prefixed: diffusers imports every local custom pipeline's files into one shared package
    (diffusers_modules.local), so a plain "attention.py" could meet another pipeline's."""
    base = module.rsplit(".", 1)[-1]
    return base if base.startswith(("jedi", "pipeline_jedi")) else f"jedi_{base}"


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _project_imports(source: str) -> list[tuple[str, str | None]]:
    """(module, submodule name or None) per `from X import ...` of this project in `source` (any depth):
    `from jedi_train.models import families` imports the submodule jedi_train.models.families."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in PROJECT:
            if _is_package(node.module):
                if len(node.names) != 1:
                    raise RuntimeError(f"the export bundle cannot flatten `from {node.module} import "
                                       f"{', '.join(a.name for a in node.names)}`: import one submodule per line")
                found.append((node.module, node.names[0].name))
            else:
                found.append((node.module, None))
    return found


def _flat_imports(source: str) -> list[tuple[str, str | None]]:
    """In a bundle: the sibling files `source` imports (`from .X import ...`, `from . import X as Y`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found += [(node.module, None)] if node.module else [(a.name, None) for a in node.names]
    return found


def _closure(entry: str) -> dict[str, str]:
    """{flat file name: source} for `entry` and every project module it reaches, imports rewritten."""
    in_bundle = not __name__.startswith("jedi_train.")  # running from an export: flat files beside this one
    here = os.path.dirname(os.path.abspath(__file__))
    todo, sources = [entry], {}
    while todo:
        module = todo.pop()
        name = flat_name(module)
        if name in sources:
            continue
        if in_bundle:
            path = os.path.join(here, f"{name}.py")
        else:
            if not module.startswith(CARRIED):
                raise RuntimeError(f"the export bundle would carry {module}: pipeline code may import only "
                                   "jedi_train.pipelines, jedi_train.models and data_pipelines.images")
            path = importlib.util.find_spec(module).origin
        with open(path, encoding="utf-8") as f:
            source = f.read()
        deps = []
        for dep, sub in (_flat_imports(source) if in_bundle else _project_imports(source)):
            if sub is None:
                source = re.sub(rf"^([ \t]*)from {re.escape(dep)} import", rf"\1from .{flat_name(dep)} import",
                                source, flags=re.MULTILINE)
                deps.append(dep)
            else:  # from package import submodule -> from . import flat as submodule
                full = f"{dep}.{sub}"
                source = re.sub(rf"^([ \t]*)from {re.escape(dep)} import {sub}\b",
                                rf"\1from . import {flat_name(full)} as {sub}", source, flags=re.MULTILINE)
                deps.append(full)
        sources[name] = source
        todo += deps
    return sources


def bundle_sources(entry: str) -> dict[str, str]:
    """{file name: flattened source} of the bundle whose entry is `entry` (a module, e.g.
    jedi_train.pipelines.pipeline_jedi_flux). The entry file imports every other file itself: diffusers
    copies only those."""
    sources = _closure(entry)
    head = flat_name(entry)
    body = sources[head]
    missing = [n for n in sources if n != head and not re.search(rf"^from \.{n} import", body, re.MULTILINE)]
    if missing and "# carried with the export" not in body:
        sources[head] = body + (
            "\n\n# carried with the export: diffusers copies only the modules this file imports itself\n"
            + "".join(f"from .{n} import __name__ as _bundled_{n}  # noqa: E402,F401\n" for n in sorted(missing)))
    return {f"{name}.py": source for name, source in sources.items()}


def is_bundle_file(name: str) -> bool:
    """A file an export's bundle may have written (now or in an older layout: jedi_pipeline.py, jedi_*.py)."""
    return re.fullmatch(r"(jedi_\w+|pipeline_jedi\w*)\.py", name) is not None


def write_bundle(out_dir: str, pipeline_class: type) -> None:
    """Write the bundle of `pipeline_class`'s module into a saved pipeline directory and point
    model_index.json at it."""
    entry = pipeline_class.__module__
    for name, source in bundle_sources(entry).items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(source)
    index_path = os.path.join(out_dir, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["_class_name"] = [flat_name(entry), pipeline_class.__name__]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
