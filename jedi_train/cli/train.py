"""jedi-train: the Hydra app. Everything is in conf/ and jedi_train/train.py."""
import sys

import hydra
from omegaconf import DictConfig

from jedi_common.errors import cli_errors
from jedi_common.hydra_args import config_error, writable_error
from jedi_train.train import CONF_DIR
from jedi_train.training.config_checks import check_config


def user_error(e: BaseException) -> BaseException | None:
    """The FileNotFoundError/ValueError behind `e` (Hydra wraps errors of instantiated targets)."""
    while e is not None:
        if isinstance(e, (FileNotFoundError, ValueError)):
            return e
        e = e.__cause__
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from jedi_train.train import train

    # user errors (also when raised inside hydra.utils.instantiate) and disk trouble: one line, exit 2
    with cli_errors("jedi-train", "paths.output_dir", explain=user_error):
        check_config(cfg)  # wrong types/ranges: one line now, not a traceback after the model is built
        if cfg.get("dry_run"):  # size the job: meta-device model, bytes per rank; nothing trains
            from jedi_train.training.dry_run import report

            print(report(cfg))
            return None
        result = train(cfg)
    print(f"run dir: {result['output_dir']} (step {result['global_step']})")
    if "pipeline_dir" in result:
        print(f"exported pipeline: {result['pipeline_dir']}")
    return result["metrics"].get(cfg.get("optimized_metric"))  # what an Optuna sweep minimises


def sources_error(argv: list[str]) -> str | None:
    """Data sources that match nothing (and are not the demo's, synthesized on first use): one line before
    Hydra creates the run dir or the model is built (issue 35). Multirun and info flags are Hydra's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from jedi_common.hydra_args import CONFIG_FLAGS, INFO_FLAGS
    from jedi_train.training.datamodule import check_sources

    if "-m" in argv or "--multirun" in argv or any(a.split("=", 1)[0] in INFO_FLAGS | CONFIG_FLAGS for a in argv):
        return None
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[a for a in argv if not a.startswith("-")], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            if cfg.get("dry_run"):  # sizing a job reads no data: the shards may live on the cluster only
                return None
            data = OmegaConf.to_container(cfg.data, resolve=True)
    except Exception:  # noqa: BLE001 - what cannot be resolved here is Hydra's to report
        return None
    try:
        check_sources(data)
    except (FileNotFoundError, ValueError) as e:
        return " ".join(str(e).split())
    return None


def main() -> None:
    error = (config_error(CONF_DIR, "train", sys.argv[1:])  # bad keys/groups/sweeps: one line, exit 2
             or writable_error(CONF_DIR, "train", sys.argv[1:], "paths.output_dir")  # Hydra writes there first
             or sources_error(sys.argv[1:]))  # nothing to train on: before the run dir and the model
    if error:
        print(f"jedi-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
