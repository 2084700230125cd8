"""Checkpoint -> pipeline directory (to_pipeline.py), its model card (model_card.py), the W&B model artifact
(artifacts.py). `from jedi_train.export import export_checkpoint` is the documented entry point (loaded lazily:
importing the model card alone stays light)."""

_PUBLIC = ("export_checkpoint", "export_module")


def __getattr__(name):
    if name in _PUBLIC:
        from jedi_train.export import to_pipeline

        return getattr(to_pipeline, name)
    raise AttributeError(f"module 'jedi_train.export' has no attribute {name!r}")
