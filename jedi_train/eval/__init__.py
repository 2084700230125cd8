"""jedi-eval: measure personalization. `procedural` (identity against re-rendered ground truth) and
`dreambench` (the DINO / CLIP-I / CLIP-T protocol on real photos). Shared pieces in common.py."""
