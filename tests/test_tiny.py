"""The embedded tiny models are created once, in place, whatever the family."""
import os

from jedi_train.models.tiny import create_tiny_model_dir_if_missing


def test_a_tiny_model_is_created_once_and_leaves_no_temp_dirs(tmp_path):
    for family, sub in (("sd", "unet"), ("flux", "transformer")):
        model_dir = str(tmp_path / family)
        assert create_tiny_model_dir_if_missing(model_dir, {"family": family}) is True
        assert os.path.isfile(os.path.join(model_dir, sub, "config.json"))
        stamp = os.path.getmtime(os.path.join(model_dir, sub, "config.json"))
        assert create_tiny_model_dir_if_missing(model_dir, {"family": family}) is False  # a FLUX dir has no unet/
        assert os.path.getmtime(os.path.join(model_dir, sub, "config.json")) == stamp
    assert sorted(os.listdir(tmp_path)) == ["flux", "sd"]  # no .tmp-<pid> leftovers
