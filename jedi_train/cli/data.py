"""jedi-data stats SHARDS... | jedi-data import FORMAT SRC OUT_DIR | jedi-data encode IN_URLS... OUT_DIR --model DIR

One console script over the data tools: `stats` reads shards as training does (data_pipelines/stats.py);
`import` converts released same-subject datasets and photo folders into set shards (data_pipelines/importers/);
`encode` caches latents and text embeddings with a model's frozen encoders (jedi_train/training/encode.py,
on the model side because it loads them).
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from data_pipelines import stats
    from data_pipelines.importers import cli as importers
    from jedi_train.training import encode

    p = argparse.ArgumentParser(prog="jedi-data", description="Check, cache and import same-subject set shards.")
    sub = p.add_subparsers(dest="cmd", required=True)
    tools = {"stats": stats, "import": importers, "encode": encode}
    for tool in tools.values():
        tool.add_parser(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    return tools[args.cmd].main(args)


if __name__ == "__main__":
    sys.exit(main())
