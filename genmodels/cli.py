"""The `genmodels` command. Each subcommand calls the same library function as its DVC stage.

    genmodels prepare [--params params.yaml] [--set prepare.image_size=32] [--out data/shards]
    genmodels train gan|vae [--params params.yaml] [--set train.num_workers=4]
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


def _train(args: argparse.Namespace) -> None:
    from genmodels.train.run import train

    params = load_params(args.params, args.set)
    summary = train(params, args.family, shards=args.shards, models_dir=args.models, metrics_dir=args.metrics)
    print(f"train {args.family}: {summary['step']} steps in {summary['wall_s']} s; "
          f"models/{args.family}/ written; MLflow run {summary['mlflow_run_id']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genmodels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="image source -> WebDataset shards + manifest.json")
    prepare.add_argument("--out", default="data/shards", help="shard directory (default: data/shards)")
    train = commands.add_parser("train", help="Ray Train DDP training of one family -> models/<family>/")
    train.add_argument("family", choices=["gan", "vae"])
    train.add_argument("--shards", default="data/shards")
    train.add_argument("--models", default="models", help="parent of models/<family>/")
    train.add_argument("--metrics", default="metrics", help="where train_<family>.json and the curve CSV go")
    train.set_defaults(run=_train)
    for sub in (prepare, train):
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
