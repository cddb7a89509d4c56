"""The `genmodels` command. Each subcommand calls the same library function as its DVC stage.

    genmodels prepare [--params params.yaml] [--set prepare.image_size=32] [--out data/shards]
    genmodels featurizer                       # domain classifier for the offline FID
    genmodels train gan|vae [--params params.yaml] [--set train.num_workers=4] [--overlay tune/gan_best.yaml]
    genmodels tune gan|vae [--resume]          # Ray Tune sweep -> tune/<family>_best.yaml
    genmodels evaluate gan|vae
    genmodels register gan|vae                 # MLflow model version + alias candidate (champion if none)
    genmodels promote gan|vae [--version N] [--margin X] [--dry-run] [--rollback]
    genmodels sample models:/genmodels-gan@champion -n 64 -o grid.png
    genmodels status                           # what is trained, evaluated, registered; where to look
    genmodels report [-o report.html]          # samples, real images, curves, metrics: one HTML page
    genmodels submit --address http://HEAD:8265 -- genmodels train gan --shards http://data/shards
    genmodels jobs list|logs ID|stop ID --address http://HEAD:8265
"""

from __future__ import annotations

import argparse
import os
import sys

from genmodels.config import ConfigError, load_params
from genmodels.progress import VERBOSE_ENV, quiet_libraries


# Families are looked up (and unknown names refused, listing the known ones) by the subcommand:
# importing the registry here would make every stage depend on every model file.
FAMILY_HELP = "a model family of genmodels.families (gan, vae, ...)"


def _params(args: argparse.Namespace):
    return load_params(args.params, args.set, args.overlay)


def _prepare(args: argparse.Namespace) -> None:
    from genmodels.data.shards import prepare_shards

    params = _params(args)
    manifest = prepare_shards(params.prepare, args.out)
    counts = ", ".join(f"{name} {split.num_samples} in {len(split.shards)} shards" for name, split in manifest.splits.items())
    print(f"prepare: {manifest.source} -> {args.out}: {counts}; {len(manifest.rejected)} rejected")


def _train(args: argparse.Namespace) -> None:
    from genmodels.families import get_family
    from genmodels.train.run import train

    get_family(args.family)
    params = _params(args)
    summary = train(params, args.family, shards=args.shards, models_dir=args.models, metrics_dir=args.metrics,
                    featurizer_dir=args.featurizer)
    print(f"train {args.family}: {summary['step']} steps in {summary['wall_s']} s; "
          f"models/{args.family}/ written; MLflow run {summary['mlflow_run_id']}")


def _tune(args: argparse.Namespace) -> None:
    from genmodels.families import get_family
    from genmodels.tune import tune

    get_family(args.family)
    summary = tune(_params(args), args.family, shards=args.shards, out_dir=args.out, featurizer_dir=args.featurizer,
                   resume={"yes": True, "no": False, "auto": None}[args.resume])
    print(f"tune {args.family}: {summary['num_trials']} trials ({summary['stopped_early']} stopped early, "
          f"{summary['errors']} failed); MLflow parent run {summary['parent_run_id']}")


def _featurizer(args: argparse.Namespace) -> None:
    from genmodels.stages.featurizer import train_featurizer

    params = _params(args)
    summary = train_featurizer(params.featurizer, args.shards, args.out, args.metrics)
    print(f"featurizer: val accuracy {summary['val_accuracy']:.4f} on {summary['num_val']} images -> {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from genmodels.families import get_family
    from genmodels.stages.evaluate import evaluate

    get_family(args.family)
    params = _params(args)
    record = evaluate(params, args.family, models_dir=args.models, shards=args.shards, featurizer_dir=args.featurizer,
                      metrics_dir=args.metrics)
    shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
    print(f"evaluate {args.family}: {shown}")


def _register(args: argparse.Namespace) -> None:
    from genmodels.families import get_family
    from genmodels.stages.register import register

    get_family(args.family)
    register(_params(args), args.family, models_dir=args.models, metrics_dir=args.metrics)


def _promote(args: argparse.Namespace) -> int:
    from genmodels.stages.promote import promote, rollback

    params = _params(args)
    if args.rollback:
        if args.version is not None or args.margin != 0.0:
            raise ValueError("--rollback goes back along the audit trail: it takes no --version or --margin")
        decision = rollback(params, args.family, dry_run=args.dry_run)
    else:
        decision = promote(params, args.family, version=args.version, margin=args.margin, dry_run=args.dry_run)
    print(f"promote {args.family}: {decision.message}")
    return 1 if decision.action == "kept" else 0


def _sample(args: argparse.Namespace) -> None:
    from genmodels.stages.sample import sample

    out = sample(args.model_uri, num_images=args.num_images, out=args.out, seed=args.seed, truncation=args.truncation)
    print(f"sample: {args.num_images} images of {args.model_uri} -> {out}")


def _status(args: argparse.Namespace) -> None:
    from pathlib import Path

    from genmodels.config import parse_params
    from genmodels.status import status

    # A project that has nothing yet may have no params file either: the defaults name its models.
    print(status(_params(args) if Path(args.params).is_file() else parse_params({})))


def _report(args: argparse.Namespace) -> None:
    from genmodels.report import write_report

    families = write_report(_params(args), args.out)
    print(f"report: {', '.join(families)} -> {args.out}")


def _submit(args: argparse.Namespace) -> int:
    import shlex
    import tempfile
    from pathlib import Path

    from genmodels.cluster import (SHIPPED_ARTIFACTS, TERMINAL_OK, check_not_secret, follow, forwarded_env, job_client,
                                   job_runtime_env)

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        raise ValueError("nothing to run: genmodels submit --address http://HEAD:8265 -- genmodels train gan")
    if command[0] == "dvc":
        raise ValueError("dvc repro needs the git repository, which a job does not get: run the data stages where the "
                         "data lives (dvc repro prepare featurizer), publish data/shards by URL, and submit training "
                         "(genmodels train gan --shards URL)")
    env = forwarded_env(args.env)
    check_not_secret(env, command)
    tracking = env.get("MLFLOW_TRACKING_URI", "")
    if not tracking.startswith(("http://", "https://", "databricks")) or "://127.0.0.1" in tracking or "://localhost" in tracking:
        print(f"submit: warning: MLFLOW_TRACKING_URI={tracking or '(unset)'} is not a server the cluster reaches: the "
              f"job's runs would go to a store on the head that is deleted with the job", file=sys.stderr)
    missing = [a for a in SHIPPED_ARTIFACTS if not Path(a).is_dir()]
    if missing:
        print(f"submit: warning: {', '.join(missing)} missing here (dvc repro featurizer): a periodic FID would fail",
              file=sys.stderr)
    client = job_client(args.address)
    with tempfile.TemporaryDirectory(prefix="genmodels-submit-") as staging:
        runtime_env, size = job_runtime_env(".", staging, env)
        print(f"submit: {size / 1e6:.2f} MB to upload (the project's code and {', '.join(SHIPPED_ARTIFACTS)}); "
              f"environment: {', '.join(env) or 'none'}", flush=True)
        job_id = client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env)
    print(f"submit: job {job_id} on {args.address}", flush=True)
    if not args.wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"submit: stopped following; the job runs on (genmodels jobs stop {job_id} --address {args.address})")
        return 130
    print(f"submit: job {job_id} {status}")
    return 0 if status == TERMINAL_OK else 1


def _jobs(args: argparse.Namespace) -> int:
    from genmodels.cluster import job_client

    client = job_client(args.address)
    if args.action == "list":
        for job in client.list_jobs():
            print(f"{job.submission_id}  {job.status.value:<9}  {job.entrypoint}")
        return 0
    if not args.job_id:
        raise ValueError(f"genmodels jobs {args.action} needs a job id (genmodels jobs list)")
    if args.action == "logs":
        print(client.get_job_logs(args.job_id), end="")
    else:
        print(f"jobs: stop {args.job_id}: {'stopping' if client.stop_job(args.job_id) else 'already ended'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genmodels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="image source -> WebDataset shards + manifest.json")
    prepare.add_argument("--out", default="data/shards", help="shard directory (default: data/shards)")
    train = commands.add_parser("train", help="Ray Train DDP training of one family -> models/<family>/")
    train.add_argument("family", help=FAMILY_HELP)
    train.add_argument("--shards", default="data/shards")
    train.add_argument("--models", default="models", help="parent of models/<family>/")
    train.add_argument("--metrics", default="metrics", help="where train_<family>.json and the curve CSV go")
    train.add_argument("--featurizer", default="models/featurizer", help="domain classifier for the periodic GAN FID")
    train.set_defaults(run=_train)
    tune = commands.add_parser("tune", help="Ray Tune sweep of one family (trials = Ray Train runs) -> tune/<family>_best.yaml")
    tune.add_argument("family", help=FAMILY_HELP)
    tune.add_argument("--resume", nargs="?", const="yes", default="no", choices=("yes", "no", "auto"),
                      help="continue the sweep of the same name after a crash or Ctrl-C (auto: if there is one)")
    tune.add_argument("--shards", default="data/shards")
    tune.add_argument("--out", default="tune", help="where <family>_best.yaml goes (default: tune)")
    tune.add_argument("--featurizer", default="models/featurizer", help="domain classifier for the periodic GAN FID")
    tune.set_defaults(run=_tune)
    featurizer = commands.add_parser("featurizer", help="train the domain classifier behind the offline FID")
    featurizer.add_argument("--shards", default="data/shards")
    featurizer.add_argument("--out", default="models/featurizer")
    featurizer.add_argument("--metrics", default="metrics/featurizer.json")
    featurizer.set_defaults(run=_featurizer)
    evaluate = commands.add_parser("evaluate", help="FID/KID/PRDC (GAN), ELBO/IWAE (VAE) -> metrics/eval_<family>.json + MLflow")
    evaluate.add_argument("family", help=FAMILY_HELP)
    evaluate.add_argument("--shards", default="data/shards")
    evaluate.add_argument("--models", default="models")
    evaluate.add_argument("--featurizer", default="models/featurizer")
    evaluate.add_argument("--metrics", default="metrics")
    evaluate.set_defaults(run=_evaluate)
    register = commands.add_parser("register", help="log models/<family> as an MLflow pyfunc model, new registered "
                                   "version with alias candidate (and champion when there is none)")
    register.add_argument("family", help=FAMILY_HELP)
    register.add_argument("--models", default="models")
    register.add_argument("--metrics", default="metrics", help="where eval_<family>.json is")
    register.set_defaults(run=_register)
    promote = commands.add_parser("promote", help="move alias champion to the candidate if it beats the champion "
                                  "(exit 1 when kept)")
    promote.add_argument("family", help=FAMILY_HELP)
    promote.add_argument("--version", type=int, help="the version to promote (default: the candidate alias)")
    promote.add_argument("--margin", type=float, default=0.0,
                         help="required improvement, in the gate metric's units (default 0: strictly better)")
    promote.add_argument("--dry-run", action="store_true", help="print the decision, move nothing")
    promote.add_argument("--rollback", action="store_true", help="champion back to the version it replaced (audit trail)")
    promote.set_defaults(run=_promote)
    sample = commands.add_parser("sample", help="a PNG grid from a registered model, e.g. models:/genmodels-gan@champion")
    sample.add_argument("model_uri")
    sample.add_argument("-n", "--num-images", type=int, default=64)
    sample.add_argument("-o", "--out", default="samples.png")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--truncation", type=float, default=None, help="GANs: redraw latents beyond this many std")
    sample.set_defaults(run=_sample)
    submit = commands.add_parser("submit", help="run a genmodels command as a Ray job on a cluster: "
                                 "genmodels submit --address http://HEAD:8265 -- genmodels train gan")
    submit.add_argument("--address", required=True, help="the Ray job server (the head's dashboard, port 8265)")
    submit.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="stream the logs and exit with the job's status (0 only for SUCCEEDED)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a non-secret variable for the job (credentials belong on the cluster's nodes)")
    submit.add_argument("command_line", nargs=argparse.REMAINDER, help="-- then the command, e.g. genmodels train gan")
    submit.set_defaults(run=_submit)
    jobs = commands.add_parser("jobs", help="list, show the logs of, or stop Ray jobs")
    jobs.add_argument("action", choices=("list", "logs", "stop"))
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--address", required=True, help="the Ray job server (the head's dashboard, port 8265)")
    jobs.set_defaults(run=_jobs)
    status = commands.add_parser("status", help="what is trained, evaluated and registered, and where to look next")
    status.set_defaults(run=_status)
    report = commands.add_parser("report", help="one self-contained HTML page: samples beside real images, curves, "
                                 "the evaluation and its protocol, lineage")
    report.add_argument("-o", "--out", default="report.html")
    report.set_defaults(run=_report)
    for sub in (prepare, featurizer, train, tune, evaluate, register, promote, status, report):
        sub.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        sub.add_argument("--overlay", action="append", default=[], metavar="FILE",
                         help="params fragment merged over --params, e.g. tune/gan_best.yaml (repeatable)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a param, e.g. prepare.image_size=32 (value parsed as YAML)")
    prepare.set_defaults(run=_prepare)
    for sub in commands.choices.values():
        sub.add_argument("-v", "--verbose", action="store_true",
                         help=f"show Ray's own progress and INFO lines (or set {VERBOSE_ENV}=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by genmodels.progress here and in the Ray workers this process starts
    quiet_libraries()
    try:
        code = args.run(args)
    except (ConfigError, ValueError, RuntimeError, OSError, ImportError) as err:  # OSError: files, network
        print(f"genmodels {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genmodels {args.command}: interrupted by SIGINT", file=sys.stderr)
        return 130
    except BaseException as err:
        if type(err).__module__.startswith("mlflow."):  # MlflowException: a bad model URI, an unreachable server
            print(f"genmodels {args.command}: error: {err}", file=sys.stderr)
            return 2
        if (code := getattr(err, "exit_code", None)) is None:  # train.run.Interrupted: SIGINT or SIGTERM
            raise
        print(f"genmodels {args.command}: {err}", file=sys.stderr)
        return code
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
