"""The `tidal` command line: demo, train, eval, gen-data, bench sparse|data|train|quality|hetero."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate data, train DLRM, evaluate and summarize")
    demo.add_argument("--rows", type=int, default=300_000, help="training rows to generate (default 300,000)")
    train = commands.add_parser("train", help="train a model from a YAML run config")
    train.add_argument("--config", required=True, help="the YAML file: data, features, tables, model, training")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    evaluate = commands.add_parser("eval", help="AUC and log loss of a run's latest checkpoint on data files")
    evaluate.add_argument("--checkpoint", required=True, help="the run directory (training.run_dir)")
    evaluate.add_argument("--data", required=True, nargs="+", help="files or globs to evaluate on")
    gen = commands.add_parser("gen-data", help="write Criteo-like files with a planted logistic ground truth")
    gen.add_argument("--out", required=True, help="directory to write part-NNNNN.<format> and truth.json into")
    gen.add_argument("--rows", type=int, default=1_000_000)
    gen.add_argument("--files", type=int, default=1)
    gen.add_argument("--format", choices=["tsv", "parquet"], default="tsv")
    gen.add_argument("--seed", type=int, default=0, help="fixes the planted truth")
    gen.add_argument("--split", type=int, default=0, help="other rows of the same truth (e.g. 1 for eval data)")
    bench = commands.add_parser("bench", help="run a benchmark and print its figures")
    which = bench.add_subparsers(dest="benchmark", required=True)
    sparse = which.add_parser("sparse", help="a full sparse training step against torch EmbeddingBag")
    sparse.add_argument("--quick", action="store_true", help="fewer steps: under a minute on 2 cores")
    sparse.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    sparse.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 and all cores)")
    sparse.add_argument("--optimizer", nargs="+", choices=["sgd", "adagrad"], default=["sgd", "adagrad"])
    quality = which.add_parser("quality", help="AUC of collision-free tables against hashed tables of equal bytes")
    quality.add_argument("--rows", type=int, default=1_000_000, help="training rows (default 1,000,000)")
    quality.add_argument("--vocabulary", type=int, default=1_000, help="id ranks per column (default 1,000)")
    quality.add_argument("--epochs", type=int, default=2)
    quality.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    train_bench = which.add_parser("train", help="end-to-end training samples/s against a plain PyTorch DLRM")
    train_bench.add_argument("--quick", action="store_true", help="200,000 rows instead of 1,000,000")
    train_bench.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    hetero = which.add_parser("hetero", help="sparse workers feeding a dense worker against the sequential trainer")
    hetero.add_argument("--rows", type=int, default=400_000, help="training rows (default 400,000)")
    hetero.add_argument("--mode", choices=["sync", "async"], default="async")
    hetero.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    data = which.add_parser("data", help="rows/s read from TSV and Parquet and extracted into batches")
    data.add_argument("--rows", type=int, default=500_000, help="rows generated per format (default 500,000)")
    data.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from tidal import demo

        if args.rows < 1_000:
            print(f"tidal demo: --rows must be at least 1,000, got {args.rows}", file=sys.stderr)
            return 2
        demo.run(rows=args.rows)
    elif args.command == "train":
        return _train(args)
    elif args.command == "eval":
        return _eval(args)
    elif args.command == "gen-data":
        return _gen_data(args)
    elif args.benchmark == "sparse":
        from tidal.bench import sparse

        if args.threads and min(args.threads) < 1:
            print(f"tidal bench sparse: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        cfg = sparse.SparseBenchConfig.quick() if args.quick else sparse.SparseBenchConfig()
        sparse.run(cfg, as_json=args.json, threads=args.threads, optimizers=tuple(args.optimizer))
    elif args.benchmark == "quality":
        from tidal.bench import quality

        if min(args.rows, args.vocabulary, args.epochs) < 1:
            print("tidal bench quality: --rows, --vocabulary and --epochs must be >= 1", file=sys.stderr)
            return 2
        quality.run(rows=args.rows, vocabulary=args.vocabulary, epochs=args.epochs, as_json=args.json)
    elif args.benchmark == "train":
        from tidal.bench import train as train_bench

        train_bench.run(rows=200_000 if args.quick else 1_000_000, as_json=args.json)
    elif args.benchmark == "hetero":
        from tidal.bench import hetero

        if args.rows < 2 * hetero.BATCH:
            print(f"tidal bench hetero: --rows must be at least {2 * hetero.BATCH}, got {args.rows}", file=sys.stderr)
            return 2
        hetero.run(rows=args.rows, mode=args.mode, as_json=args.json)
    elif args.benchmark == "data":
        from tidal.bench import data

        if args.rows < 1:
            print(f"tidal bench data: --rows must be >= 1, got {args.rows}", file=sys.stderr)
            return 2
        data.run(rows=args.rows, as_json=args.json)
    return 0


def _train(args: argparse.Namespace) -> int:
    from tidal.config import RunConfig
    from tidal.errors import TidalError
    from tidal.runtime import Trainer

    try:
        config = RunConfig.from_yaml(args.config)
        summary = Trainer(config).fit(resume=args.resume)
    except TidalError as exc:
        print(f"tidal train: {exc}", file=sys.stderr)
        return 2
    print(f"trained {summary['steps']:,d} steps, {summary['rows']:,d} rows at {summary['samples_per_s']:,.0f} samples/s; "
          f"bad rows: {summary['bad_rows']}")
    for example in summary["bad_row_examples"]:
        print(f"  {example}")
    if summary["eval"]:
        for target, value in summary["eval"]["auc"].items():
            print(f"  eval {target}: AUC {value:.4f}  log loss {summary['eval']['logloss'][target]:.4f} "
                  f"on {summary['eval']['rows']:,d} rows")
    for name, table in summary["tables"].items():
        print(f"  table {name}: {table['rows']:,d} rows, {table['bytes'] / 2**20:.1f} MiB")
    if summary["runtime"]:
        _print_runtime(summary["runtime"], config.training.run_dir)
    print(f"  metrics: {config.training.run_dir}/metrics.jsonl")
    return 0


def _print_runtime(report: dict, run_dir: str) -> None:
    """The heterogeneous run's stage table, its worker failures and lost samples."""
    from tidal.runtime.telemetry import Telemetry

    print(Telemetry.table(report))
    for failure in report["sparse_worker_failures"]:
        print(f"  sparse worker {failure['worker']} failed in {failure['stage']} of batch {failure['batch']}: "
              f"{failure['error']} (replaced; the batch was done again)")
    print(f"  lost samples: {report['lost_samples']:,d}" + "".join(f"\n    {r}" for r in report["lost_reasons"]))
    print(f"  telemetry: {run_dir}/telemetry.json")


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tidal.config import RunConfig
    from tidal.errors import TidalError
    from tidal.runtime import Trainer, checkpoint

    try:
        directory = checkpoint.latest(Path(args.checkpoint))
        config = RunConfig(**json.loads((directory / "trainer.json").read_text())["config"])
        trainer = Trainer(config)
        checkpoint.restore(trainer, directory)
        result = trainer.evaluate(args.data)
    except TidalError as exc:
        print(f"tidal eval: {exc}", file=sys.stderr)
        return 2
    for target, value in result.auc.items():
        print(f"{target}: AUC {value:.4f}  log loss {result.logloss[target]:.4f}  on {result.rows:,d} rows")
    print(f"bad rows: {trainer.bad_rows.summary()}")
    return 0


def _gen_data(args: argparse.Namespace) -> int:
    from tidal.data.generate import generate
    from tidal.errors import ConfigError

    try:
        data = generate(args.out, rows=args.rows, files=args.files, file_format=args.format, seed=args.seed,
                        split=args.split)
    except ConfigError as exc:
        print(f"tidal {exc}", file=sys.stderr)
        return 2
    print(f"wrote {data.rows:,d} rows in {len(data.paths)} file(s) to {args.out}: "
          f"positive rate {data.positive_rate:.3f}, ceiling AUC {data.ceiling_auc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
