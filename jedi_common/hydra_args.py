"""Command-line overrides checked before a Hydra app starts, reported in one line.

Hydra itself reports an unknown key, an unknown group option or a sweep given without -m over many
lines (with a hint about HYDRA_FULL_ERROR); both console scripts (jedi-synth, jedi-train) ask this
module first and print its one line instead.
"""
from __future__ import annotations

from pathlib import Path


def _conf_dir() -> Path:
    """The Hydra config dir (train.yaml, synth.yaml and their groups), the one place both CLIs find it.

    The configs live in the repository's top-level conf/. A wheel ships them as package data of this
    package (pyproject.toml maps conf/ to `data_pipelines.conf`), so an installed copy finds them next to
    this file; a source checkout or an editable install (this file still in the checkout) finds the
    top-level conf/ beside the package. Nothing in a checkout creates data_pipelines/conf, so the two
    cannot be confused. Neither found: the shipped path, which Hydra reports as missing."""
    here = Path(__file__).resolve().parent
    shipped = here / "conf"
    if shipped.is_dir():
        return shipped
    checkout = here.parent / "conf"
    if (here.parent / "pyproject.toml").is_file() and (checkout / "train.yaml").is_file():
        return checkout
    return shipped


CONF_DIR = _conf_dir()

# flags that print information instead of running: nothing to check
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"}
# flags that pick another config (and take the next argument): that config is Hydra's to check
CONFIG_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--package", "-p",
                "--experimental-rerun"}


def config_error(conf_dir: str, config_name: str, argv: list[str]) -> str | None:
    """Compose `config_name` with the overrides in `argv` (every value of each -m sweep) and return
    what is wrong with them as one line, or None."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.split("=", 1)[0] in INFO_FLAGS | CONFIG_FLAGS for a in argv):
        return None
    multirun = "-m" in argv or "--multirun" in argv
    try:
        fixed, sweeps = [], []
        for o in OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")]):
            if not o.is_sweep_override():
                fixed.append(o.input_line)
            elif not multirun:
                return f"'{o.input_line}' is a sweep: add -m to run one job per value (or quote the value)"
            elif o.is_discrete_sweep():  # a,b,c or choice(...); ranges and intervals are left to the sweeper
                sweeps.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        firsts = [values[0] for values in sweeps]
        jobs = [fixed + firsts] + [fixed + firsts[:i] + [v] + firsts[i + 1:]
                                   for i, values in enumerate(sweeps) for v in values[1:]]
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            for overrides in jobs:  # every value of every sweep is composed once
                compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        lines = str(e).splitlines()
        options = [ln.strip() for ln in lines if ln.startswith("\t") and "=" not in ln]  # a group's choices
        text = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("\t", "Config search"))]
        if options:
            return f"{text[0]} (available: {', '.join(options)})"
        return " ".join(text[:2])
    return None


def writable_error(conf_dir: str, config_name: str, argv: list[str], key: str) -> str | None:
    """One line when the directory at config `key` (resolved with `argv`) cannot be written (read-only,
    full, forbidden), else None. Checked before Hydra starts: Hydra creates its run dir first and would
    report a failure there as a traceback. Multirun and info flags are left to Hydra."""
    import os
    import tempfile

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from jedi_common.errors import disk_error

    if "-m" in argv or "--multirun" in argv or any(a.split("=", 1)[0] in INFO_FLAGS | CONFIG_FLAGS for a in argv):
        return None
    from hydra.core.hydra_config import HydraConfig

    try:  # resolving `key` may need ${hydra:...} (the run's cwd): compose with Hydra's own config set
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=[a for a in argv if not a.startswith("-")], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            path = OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - whatever cannot be resolved here is Hydra's to report
        return None
    if not path:
        return None
    probe = os.path.abspath(str(path))
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:  # create nothing: probe the
        probe = os.path.dirname(probe)                                   # deepest existing ancestor
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-probe-"):
            pass
    except OSError as e:
        return disk_error(e, where=key) or f"cannot use {key}={path}: {e.strerror or e}"
    return None
