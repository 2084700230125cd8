"""jedi-app PIPELINE_DIR [--host 127.0.0.1] [--port 7860] [--device cpu|cuda] [--max-refs 8] [--max-queue 16]

A web demo (Gradio) for a pipeline jedi-export wrote: upload photos of a subject (or pick an example),
write prompts, get the subject in new scenes; jedi-sample's sampling and defaults (app/handler.py).
Binds to 127.0.0.1 unless --host says otherwise; requests wait in Gradio's queue, one sampling at a time.
Needs the app extra: pip install -e '.[app]'. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

MAX_FILE_SIZE = "32mb"  # per upload; Gradio refuses bigger files in the page


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"jedi-app: error: {message}; see jedi-app --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = _Parser(prog="jedi-app", description="Web demo for a JeDiPipeline: reference photos + prompts -> images.")
    p.add_argument("pipeline_dir", help="pipeline directory written by jedi-export (model_index.json inside)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 shares it on the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")
    p.add_argument("--max-refs", type=int, default=8, help="most reference photos per request (default 8)")
    p.add_argument("--max-queue", type=int, default=16, help="most requests waiting in the queue (default 16)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from jedi_train.sampling import UsageError, check_pipeline_dir, load_pipeline

    try:
        check_pipeline_dir(args.pipeline_dir)
        for name, value in (("--max-refs", args.max_refs), ("--max-queue", args.max_queue)):
            if value < 1:
                raise UsageError(f"{name} {value} is too small; use {name} 1 or more")
        if not 0 < args.port < 65536:
            raise UsageError(f"--port {args.port} is not a port; use 1 to 65535")
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UsageError("gradio is not installed; install the app extra: pip install -e '.[app]'") from None
        from jedi_train.app.examples import build_examples
        from jedi_train.app.handler import JeDiApp
        from jedi_train.app.ui import build_ui

        pipe = load_pipeline(args.pipeline_dir, args.device)
        app = JeDiApp(pipe, args.pipeline_dir, max_refs=args.max_refs)
        app.examples = build_examples(os.path.join(app.work_dir, "examples"))
        demo = build_ui(app, max_queue=args.max_queue)
        print(f"jedi-app: {args.pipeline_dir} on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
        try:
            demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE,
                        show_error=True, quiet=True)
        except OSError as e:
            raise UsageError(f"cannot listen on {args.host}:{args.port} ({e}); give another --port or --host") from None
    except (UsageError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"jedi-app: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
