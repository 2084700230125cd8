"""The Lightning side: the module, datamodule, EMA, strategies, checkpoints, config checks, dry run,
callbacks, and `jedi-data encode` (the latent/text cache training reads)."""
