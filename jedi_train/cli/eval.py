"""jedi-eval {procedural,dreambench} PIPELINE_DIR --out DIR ...

procedural: identity against re-rendered ground truth (held-out procedural subjects).
dreambench: the DreamBench protocol (DINO, CLIP-I, CLIP-T, MDINO) on a DreamBench-layout folder.
compare: B - A of two procedural results on the same subjects and seeds, with paired CIs.
Bad input: one `jedi-eval: error:` line, exit 2; --out only ever holds complete files.
"""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"jedi-eval: error: {message}; see jedi-eval --help", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from jedi_train.eval import compare, dreambench, procedural

    p = _Parser(prog="jedi-eval", description="Measure personalization of an exported JeDiPipeline.")
    sub = p.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    for name, mod in (("procedural", procedural), ("dreambench", dreambench), ("compare", compare)):
        sp = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(run=mod.run)
    return p


def main(argv=None) -> int:
    import os

    from jedi_train.eval.common import EvalError

    args = build_parser().parse_args(argv)
    try:
        out = getattr(args, "out", None)
        probe = os.path.abspath(out) if out else None
        while probe and not os.path.lexists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)  # the deepest part of --out that exists must be a directory
        if probe and not os.path.isdir(probe):  # checked before the model loads
            what = "is a file" if probe == os.path.abspath(out) else f"is inside {probe}, which is a file"
            raise EvalError(f"--out {out} {what}, not a directory; give a new or existing directory for the results")
        return int(args.run(args) or 0)
    except Exception as e:  # user errors and disk trouble: one line; anything else: the traceback
        from jedi_common.errors import report_error

        if not report_error(e, "jedi-eval", "--out", (EvalError, FileNotFoundError)):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
