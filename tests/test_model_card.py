"""The model card's pure parts: base_model detection and the jedi-eval section update (the card as a
whole is checked on a real export in test_train_cli.py)."""
from jedi_train.export.model_card import EVAL_BEGIN, EVAL_END, _base_model, update_eval_section


def test_base_model_is_a_hub_id_only_when_the_run_started_from_one(tmp_path):
    snap = "/home/u/.cache/huggingface/hub/models--stabilityai--stable-diffusion-2-1-base/snapshots/5ede9e4/"
    assert _base_model(snap) == "stabilityai/stable-diffusion-2-1-base"
    assert _base_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    local = tmp_path / "org"  # an existing local dir that happens to look like org/name is not a Hub id
    (local / "name").mkdir(parents=True)
    assert _base_model(str(local / "name")) is None
    assert _base_model(None) is None and _base_model("data/models/tiny_pixel_f4") is None


def test_eval_section_is_replaced_not_appended_and_only_in_our_cards(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# card\n\ntext\n")
    assert update_eval_section(str(tmp_path), "# jedi-eval procedural: A\n\n| refs |\n|---|\n| 1 |\n")
    assert update_eval_section(str(tmp_path), "# jedi-eval procedural: B\n\n| refs |\n|---|\n| 3 |\n")
    card = (tmp_path / "README.md").read_text()
    assert card.count(EVAL_BEGIN) == card.count(EVAL_END) == 1
    assert "procedural: B" in card and "procedural: A" not in card and card.startswith("---\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("# someone else's readme\n")
    assert not update_eval_section(str(other), "# x\n")
    assert (other / "README.md").read_text() == "# someone else's readme\n"
    assert not update_eval_section(str(tmp_path / "missing"), "# x\n")
