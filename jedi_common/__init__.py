"""What jedi_train and data_pipelines both use and neither owns: atomic writes (atomic.py), one-line CLI errors
(errors.py), Hydra overrides checked up front and the config dir (hydra_args.py), quiet optional imports
(quiet.py). Imports neither package, so dependencies stay one-way: jedi_train -> data_pipelines -> jedi_common."""
