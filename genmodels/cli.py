"""The `genmodels` command. Each subcommand calls the same library function as its DVC stage.

    genmodels prepare [--params params.yaml] [--set prepare.image_size=32] [--out data/shards]
"""

from __future__ import annotations

import argparse
import sys

from genmodels.config import ConfigError, load_params


def _prepare(args: argparse.Namespace) -> None:
    from genmodels.data.shards import prepare_shards

    params = load_params(args.params, args.set)
    manifest = prepare_shards(params.prepare, args.out)
    counts = ", ".join(f"{name} {split.num_samples} in {len(split.shards)} shards" for name, split in manifest.splits.items())
    print(f"prepare: {manifest.source} -> {args.out}: {counts}; {len(manifest.rejected)} rejected")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genmodels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="image source -> WebDataset shards + manifest.json")
    prepare.add_argument("--out", default="data/shards", help="shard directory (default: data/shards)")
    for sub in (prepare,):
        sub.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a param, e.g. prepare.image_size=32 (value parsed as YAML)")
    prepare.set_defaults(run=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, ValueError, RuntimeError) as err:
        print(f"genmodels {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
