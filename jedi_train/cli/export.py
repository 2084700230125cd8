"""jedi-export CHECKPOINT OUT_DIR [--no-ema] [--model-dir DIR] [--overwrite] [--lora-only] [--push-to-hub REPO_ID [--public]]"""
import argparse
import sys


def push_to_hub(out_dir: str, repo_id: str, private: bool = True) -> str:
    """Upload a finished export (private repo by default) through huggingface_hub; the URL of the repo."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=out_dir, repo_id=repo_id, repo_type="model",
                      commit_message="jedi-export: JeDi pipeline")
    return str(url)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="jedi-export", description="Export a jedi-train checkpoint (Lightning .ckpt "
                                "or DeepSpeed ZeRO dir) as a diffusers JeDiPipeline directory (with its code and "
                                "a model card: loads with DiffusionPipeline.from_pretrained(OUT, "
                                "trust_remote_code=True)).")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--no-ema", action="store_true", help="export the raw training weights instead of EMA")
    p.add_argument("--model-dir", default=None, help="base model directory, if it moved since training")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a previous export (model_index.json); nothing else is replaced")
    p.add_argument("--lora-only", action="store_true",
                   help="LoRA runs: write only the adapter (pytorch_lora_weights.safetensors, diffusers' format; "
                        "pipe.load_lora_weights(OUT_DIR) on a JeDiPipeline of the base model) instead of the "
                        "pipeline with the LoRA fused")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="after the local export, upload it to this Hugging Face Hub model repo (private)")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: create the repo public")
    args = p.parse_args(argv)
    from jedi_common.errors import cli_errors
    from jedi_train.export.to_pipeline import export_checkpoint

    with cli_errors("jedi-export", "OUT_DIR", (FileNotFoundError, ValueError)):  # one line, exit 2
        out = export_checkpoint(args.checkpoint, args.out_dir, use_ema=not args.no_ema, model_dir=args.model_dir,
                                overwrite=args.overwrite, lora_only=args.lora_only)
    print(f"exported {'LoRA adapter' if args.lora_only else 'pipeline'}: {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=not args.public)
        except Exception as e:  # noqa: BLE001 -- offline, no token, no permission: the local export stays complete
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"jedi-export: error: pushing to the Hub failed ({type(e).__name__}: {reason[:200]}); the local "
                  f"export {out} is complete: upload it later with `hf upload {args.push_to_hub} {out}`",
                  file=sys.stderr)
            sys.exit(3)
        print(f"pushed to {url}")


if __name__ == "__main__":
    main()
