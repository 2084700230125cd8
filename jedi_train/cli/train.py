"""jedi-train: the Hydra app. Everything is in conf/ and jedi_train/train.py."""
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from jedi_train.train import CONF_DIR


def user_error(e: BaseException) -> BaseException | None:
    """The FileNotFoundError/ValueError behind `e` (Hydra wraps errors of instantiated targets)."""
    while e is not None:
        if isinstance(e, (FileNotFoundError, ValueError)):
            return e
        e = e.__cause__
    return None


def config_error(argv: list[str]) -> str | None:
    """Compose the config the command line asks for (first value of each sweep) and return what is
    wrong with it as one line, or None. Hydra itself reports a bad key or group over many lines."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for overrides in jobs:  # every value of every sweep is composed once
                compose("train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        lines = str(e).splitlines()
        options = [ln.strip() for ln in lines if ln.startswith("\t") and "=" not in ln]  # a group's choices
        text = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("\t", "Config search"))]
        if options:
            return f"{text[0]} (available: {', '.join(options)})"
        return " ".join(text[:2])
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from jedi_train.train import train

    try:
        result = train(cfg)
    except Exception as e:  # user errors (also when raised inside hydra.utils.instantiate): one line
        cause = user_error(e)
        if cause is None:
            raise
        print(f"jedi-train: error: {cause}", file=sys.stderr)
        sys.exit(2)
    print(f"run dir: {result['output_dir']} (step {result['global_step']})")
    if "pipeline_dir" in result:
        print(f"exported pipeline: {result['pipeline_dir']}")
    return result["metrics"].get(cfg.get("optimized_metric"))  # what an Optuna sweep minimises


def main() -> None:
    info_flags = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"}
    error = None if info_flags & set(sys.argv[1:]) else config_error(sys.argv[1:])
    if error:
        print(f"jedi-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
