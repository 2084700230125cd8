"""Training callbacks, one per concern (configs: conf/callbacks/, one file each)."""
from .checkpoint import Checkpoint
from .identity_gain import IdentityGainCallback
from .loss_curve import LossCurveCallback
from .sample_grid import SampleGridCallback

__all__ = ["Checkpoint", "IdentityGainCallback", "LossCurveCallback", "SampleGridCallback"]
