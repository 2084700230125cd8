"""Training callbacks, one per concern (configs: conf/callbacks/, one file each)."""
from jedi_train.training.callbacks.checkpoint import Checkpoint
from jedi_train.training.callbacks.identity_gain import IdentityGainCallback
from jedi_train.training.callbacks.loss_curve import LossCurveCallback
from jedi_train.training.callbacks.sample_grid import SampleGridCallback

__all__ = ["Checkpoint", "IdentityGainCallback", "LossCurveCallback", "SampleGridCallback"]
