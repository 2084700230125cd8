"""`jedi-data import FORMAT SRC OUT_DIR`: released same-subject datasets and your own photo folders -> set shards.

One module per format (subjects200k, uno1m, syncd, folders); core.py shares the plan, resumable writing
and skip counting (jedi-synth's writer); cli.py is the subcommand. Nothing here imports jedi_train.
"""
FORMATS = ("subjects200k", "uno1m", "syncd", "folders")
