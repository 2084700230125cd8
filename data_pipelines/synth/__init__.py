"""jedi-synth: build same-subject image sets (S3) and write them as WebDataset shards.

One module per stage: prompts (subject descriptions), procedural + scenes (the weight-free
generator), collage (diffusers text-to-image backend), split (collage -> panels), filter (subject
consistency), caption, writer (resumable shard units + manifest), pipeline (stages glued per set),
cli (Hydra entry point `jedi-synth`).
"""
