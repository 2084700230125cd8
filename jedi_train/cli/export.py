"""jedi-export CHECKPOINT OUT_DIR [--no-ema] [--model-dir DIR] [--overwrite]"""
import argparse
import sys


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="jedi-export", description="Export a jedi-train checkpoint (Lightning .ckpt "
                                "or DeepSpeed ZeRO dir) as a diffusers JeDiPipeline directory.")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--no-ema", action="store_true", help="export the raw training weights instead of EMA")
    p.add_argument("--model-dir", default=None, help="base model directory, if it moved since training")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a previous export (model_index.json); nothing else is replaced")
    args = p.parse_args(argv)
    from jedi_train.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, use_ema=not args.no_ema, model_dir=args.model_dir,
                                overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:
        print(f"jedi-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported pipeline: {out}")


if __name__ == "__main__":
    main()
