"""The `tidal` command line: demo, train, eval, export, serve, gen-data, bench sparse|data|train|quality|hetero|serve|dense|rewrite|pass."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from safetensors import SafetensorError

from tidal import __version__

if TYPE_CHECKING:  # imported where used: the command line starts without torch
    from tidal.config import RunConfig
    from tidal.serving import Predictor

_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EPERM}

__all__ = ["main"]

_NOTED_COMPILE_S = 1.0  # a run that spent longer compiling kernels says so beside its speed


class _Parser(argparse.ArgumentParser):
    """An argparse parser that refuses arguments it does not know with its own usage line.

    Plain argparse leaves them to the top-level parser, whose usage (`tidal [-h] {demo,...}`) does not show
    the options of the command that was typed. Sub-commands' parsers are of the same class.
    """

    def parse_known_args(self, args=None, namespace=None):
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tidal", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tidal {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = _subcommand(commands, "demo", "generate data, train DLRM, evaluate, export and serve it, retrain on the "
                                            "next day's data and update the server online, then summarize")
    demo.add_argument("--rows", type=int, default=300_000, help="training rows to generate (default 300,000)")
    train = _subcommand(commands, "train", "train a model from a YAML run config")
    train.add_argument("--config", required=True, help="the YAML file: data, features, tables, model, training")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    start.add_argument("--init-from", metavar="CHECKPOINT",
                       help="start a fresh run on the config's data from another run's latest checkpoint (its run "
                            "directory) or from a checkpoint directory: its tables, dense weights and step")
    train.add_argument("--set", action="append", default=[], dest="settings", metavar="KEY.PATH=VALUE",
                       help="replace a value of the config, the value in YAML (repeatable); a list's element by its "
                            "name or index, e.g. --set training.lr=0.01 --set tables.items.dim=32")
    train.add_argument("--print-config", action="store_true",
                       help="print the whole config as the run would use it (defaults filled in) and exit")
    evaluate = _subcommand(commands, "eval", "AUC, log loss, normalized entropy and calibration of a run's latest checkpoint "
                                                    "on data files")
    evaluate.add_argument("--checkpoint", required=True, help="the run directory (training.run_dir) or one checkpoint")
    evaluate.add_argument("--data", required=True, nargs="+", help="files or globs to evaluate on")
    evaluate.add_argument("--device", default="auto", help="where the dense network runs (default auto: a GPU if any)")
    evaluate.add_argument("--group-by", metavar="FEATURE",
                          help="also the group AUC (GAUC) over the ids of this sparse feature, a user id say "
                               "(default: the run's data.eval_group_by)")
    evaluate.add_argument("--no-group-by", action="store_true",
                          help="no group AUC, even where the run's data.eval_group_by names a feature")
    evaluate.add_argument("--predictions", metavar="FILE.parquet",
                          help="also write each evaluated row's probability and label per target to this Parquet "
                               "file (columns TARGET and TARGET_label; the valid rows in the files' order)")
    read = evaluate.add_argument_group("how the files are read (default: as the run's data section says)")
    read.add_argument("--format", choices=["tsv", "csv", "parquet"],
                      help="the files' format (default: the run's data.format, else each file's suffix)")
    read.add_argument("--columns", nargs="+", metavar="COLUMN",
                      help="the columns of TSV files and of CSV files without a header line, in order")
    read.add_argument("--csv-header", action=argparse.BooleanOptionalAction,
                      help="whether CSV files open with a line of column names")
    read.add_argument("--max-bad-fraction", type=float, metavar="SHARE",
                      help="the most bad rows skipped, as a share of the rows read (1 skips any number)")
    read.add_argument("--on-bad-row", choices=["skip", "fail"], help="skip a bad row (counted), or stop at it")
    export = _subcommand(commands, "export", "write a serving bundle from a run's latest checkpoint")
    export.add_argument("--checkpoint", required=True, help="the run directory (training.run_dir) or one checkpoint")
    export.add_argument("--out", required=True, help="the bundle directory to write (an earlier bundle there is replaced)")
    export.add_argument("--table-dtype", choices=["float32", "float16"],
                        help="default: that of the bundle at --out, if there is one, else the config's "
                             "serving.table_dtype")
    export.add_argument("--backend", choices=["torch", "onnxruntime", "aotinductor"],
                        help="what tidal serve runs the dense network with; onnxruntime adds an ONNX model to the "
                             "bundle, aotinductor the network compiled for this CPU (a C++ compiler is needed), each "
                             "checked against the torch program (default: that of the bundle at --out, if there is "
                             "one, else the config's serving.backend)")
    export.add_argument("--delta", action="store_true",
                        help="write into the bundle at --out only what changed since what it serves (rows and the "
                             "dense weights); a running tidal serve of it applies the delta without a restart")
    serve = _subcommand(commands, "serve", "serve a bundle over the Open Inference Protocol (KServe v2 HTTP)")
    serve.add_argument("bundle", help="a directory written by tidal export")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: a free one, printed once serving)")
    serve.add_argument("--model-name", help="the model's name in the URLs (default: the bundle directory's name)")
    serve.add_argument("--no-batching", action="store_true", help="run every request alone (no merging or splitting)")
    serve.add_argument("--max-batch-rows", type=int, help="default: the config's serving.max_batch_rows "
                       "(a smaller value lowers serving.chunk_rows with it)")
    serve.add_argument("--chunk-rows", type=int, help="default: the config's serving.chunk_rows")
    serve.add_argument("--max-delay-ms", type=float, help="default: the config's serving.max_delay_ms")
    serve.add_argument("--sparse-threads", type=int, help="default: the config's serving.sparse_threads")
    serve.add_argument("--backend", choices=["torch", "onnxruntime", "aotinductor"],
                       help="what runs the dense network (default: the bundle's serving.backend); onnxruntime "
                            "and aotinductor need a bundle exported with that --backend")
    serve.add_argument("--delta-poll-s", type=float, help="look for new deltas of the bundle (tidal export --delta) "
                       "this often and apply them (default: the config's serving.delta_poll_s; unset: only on "
                       "POST /v2/repository/models/NAME/load)")
    serve.add_argument("--exit-timeout-s", type=_seconds, default=30.0,
                       help="on Ctrl-C or SIGTERM, how long the requests held may still run; those still queued "
                            "a second before get a 503 (default 30)")
    serve.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="settings",
                       help="replace a field of the bundle's serving config, the value in YAML (repeatable), e.g. "
                            "--set max_queue_rows=100000 --set 'buckets=[1, 8, 64, 512]'")
    gen = _subcommand(commands, "gen-data", "write Criteo-like files with a planted logistic ground truth")
    gen.add_argument("--out", required=True, help="directory to write part-NNNNN.<format> and truth.json into")
    gen.add_argument("--rows", type=int, default=1_000_000, help="rows to write (default 1,000,000)")
    gen.add_argument("--files", type=int, default=1,
                     help="how many files (part-00000, ...) to share the rows between (default 1, at most --rows)")
    gen.add_argument("--format", choices=["tsv", "parquet"], default="tsv", help="file format (default tsv)")
    gen.add_argument("--seed", type=int, default=0, help="fixes the planted truth (default 0)")
    gen.add_argument("--split", type=int, default=0,
                     help="other rows of the same truth (default 0; e.g. 1 for eval data)")
    bench = _subcommand(commands, "bench", "run a benchmark and print its figures")
    which = bench.add_subparsers(dest="benchmark", required=True)
    sparse = _subcommand(which, "sparse", "a full sparse training step against torch EmbeddingBag")
    sparse.add_argument("--quick", action="store_true", help="fewer steps: under a minute on 2 cores")
    sparse.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    sparse.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 and all cores)")
    sparse.add_argument("--optimizer", nargs="+", choices=["sgd", "adagrad"], default=["sgd", "adagrad"],
                        help="optimizers to run (default both)")
    quality = _subcommand(which, "quality", "AUC of collision-free tables against hashed tables of equal bytes")
    quality.add_argument("--rows", type=int, default=1_000_000, help="training rows (default 1,000,000)")
    quality.add_argument("--vocabulary", type=int, default=1_000, help="id ranks per column (default 1,000)")
    quality.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    quality.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    train_bench = _subcommand(which, "train", "end-to-end training samples/s against a plain PyTorch DLRM")
    train_bench.add_argument("--quick", action="store_true", help="200,000 rows instead of 1,000,000")
    train_bench.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    hetero = _subcommand(which, "hetero", "sparse workers feeding a dense worker against the sequential trainer")
    hetero.add_argument("--rows", type=int, default=400_000, help="training rows (default 400,000)")
    hetero.add_argument("--mode", choices=["sync", "async"], default="async", help="the engine's mode (default async)")
    hetero.add_argument("--no-ray", action="store_true", help="leave out the Ray backend run")
    hetero.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    serve_bench = _subcommand(which, "serve", "QPS and latency of the server against unbatched and Ray Serve")
    serve_bench.add_argument("--quick", action="store_true", help="shorter runs, concurrency 64 only")
    serve_bench.add_argument("--seconds", type=float, help="measured seconds per point, 1-3600 (default 5; 3 with --quick)")
    serve_bench.add_argument("--no-ray", action="store_true", help="leave out the Ray Serve peer")
    serve_bench.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    pass_bench = _subcommand(which, "pass", "pass-mode training samples/s against the reference trainer")
    pass_bench.add_argument("--quick", action="store_true", help="200,000 rows instead of 400,000")
    pass_bench.add_argument("--batches-per-pass", type=int, default=16, help="batches in a pass (default 16)")
    pass_bench.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    dense_bench = _subcommand(which, "dense", "the serving dense stage on ONNX Runtime and AOTInductor against "
                                                 "torch, per bucket")
    dense_bench.add_argument("--quick", action="store_true", help="100 calls per point instead of 400")
    dense_bench.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    rewrite_bench = _subcommand(which, "rewrite", "the torch serving program rewritten by the graph rules against "
                                                     "the program as exported, per bucket")
    rewrite_bench.add_argument("--quick", action="store_true", help="100 calls per point instead of 400")
    rewrite_bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                               help="where the programs run (default cpu)")
    rewrite_bench.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    data = _subcommand(which, "data", "rows/s read from TSV and Parquet and extracted into batches")
    data.add_argument("--rows", type=int, default=500_000, help="rows generated per format (default 500,000)")
    data.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    return parser


def _subcommand(commands: argparse._SubParsersAction, name: str, what: str) -> argparse.ArgumentParser:
    """A subcommand whose own --help starts with what it does, as the list of commands says it."""
    return commands.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a whole number 0-65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {port}")
    return port


_MOST_BENCH_THREADS = 256  # as the configs' thread counts: more starve the machine of threads


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds are a number 0-3600, got {text!r}") from None
    if not 0.0 <= seconds <= 3600.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"seconds are 0-3600, got {text}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    from tidal.processes import sigterm_interrupts

    args = _parser().parse_args(argv)
    stdout = sys.stdout
    if stdout is not None:  # None: started with standard output closed
        sys.stdout = _ReaderMayLeave(stdout)
    try:
        with sigterm_interrupts():  # every command stops on a SIGTERM as on a Ctrl-C
            return _command(args)
    except KeyboardInterrupt:  # one a command does not meet itself: while torch loads, say, or in a benchmark
        name = args.command if args.command != "bench" else f"bench {args.benchmark}"
        return _interrupted(name, "stopped before it finished")
    finally:
        if stdout is not None:
            sys.stdout.flush()  # what is still buffered, while a closed pipe is still met quietly
            sys.stdout = stdout


class _ReaderMayLeave:
    """Standard output whose reader may leave (`tidal train | head`): what is printed
    after that is dropped, and the command goes on with its work (a run trains to its
    checkpoint, a server serves) instead of failing on a closed pipe."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop_from_now_on()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop_from_now_on()

    def _drop_from_now_on(self) -> None:
        """Point the stream's file descriptor at /dev/null: its buffer, later prints and
        child processes' output go nowhere, without another error."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _say_if_busy(name: str) -> None:
    """Warn, before a benchmark, that other work keeps the machine busy: it competes with
    every peer, and a peer whose threads wait for each other (torch's, on every core)
    loses most, so the figures of such a run mislead."""
    share = busy_share()
    if share is not None and share >= 0.5:
        print(f"tidal {name}: the machine is busy (other work used {share:.0%} of its {os.cpu_count()} cores' time "
              f"over the last half second): it slows the peers unevenly; compare figures from a quiet machine",
              file=sys.stderr, flush=True)


def busy_share(seconds: float = 0.5) -> float | None:
    """The share of all cores' time spent on anything but idling over the next `seconds`
    (a virtual machine's stolen time counted busy); None where /proc/stat cannot be read."""
    try:
        before = _cpu_times()
        time.sleep(seconds)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    spent = [b - a for a, b in zip(before, after)]
    idle = spent[3] + spent[4]  # idle and waiting for I/O
    return 1.0 - idle / sum(spent) if sum(spent) else 0.0


def _cpu_times() -> list[int]:
    """The machine's CPU time so far by kind (user, nice, system, idle, iowait, ...)."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:]]


def _command(args: argparse.Namespace) -> int:
    """Run the command `args` names; its exit code."""
    commands = {"demo": _demo, "train": _train, "eval": _eval, "gen-data": _gen_data, "export": _export,
                "serve": _serve, "bench": _bench}
    return commands[args.command](args)


def _demo(args: argparse.Namespace) -> int:
    from tidal import demo

    if args.rows < 1_000:
        print(f"tidal demo: --rows must be at least 1,000, got {args.rows}", file=sys.stderr)
        return 2
    demo.run(rows=args.rows)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Run `tidal bench NAME` once its options are checked."""
    if problem := _bench_problem(args):
        print(f"tidal bench {args.benchmark}: {problem}", file=sys.stderr)
        return 2
    _say_if_busy(f"bench {args.benchmark}")
    if args.benchmark == "serve":
        from tidal.bench import serve as serve_bench

        serve_bench.run(quick=args.quick, seconds=args.seconds, with_ray=not args.no_ray, as_json=args.json)
    elif args.benchmark == "sparse":
        from tidal.bench import sparse

        cfg = sparse.SparseBenchConfig.quick() if args.quick else sparse.SparseBenchConfig()
        threads = list(dict.fromkeys(args.threads)) if args.threads else None  # each setting measured once
        sparse.run(cfg, as_json=args.json, threads=threads, optimizers=tuple(dict.fromkeys(args.optimizer)))
    elif args.benchmark == "quality":
        from tidal.bench import quality

        quality.run(rows=args.rows, vocabulary=args.vocabulary, epochs=args.epochs, as_json=args.json)
    elif args.benchmark == "train":
        from tidal.bench import train as train_bench

        train_bench.run(rows=200_000 if args.quick else 1_000_000, as_json=args.json)
    elif args.benchmark == "hetero":
        from tidal.bench import hetero

        hetero.run(rows=args.rows, mode=args.mode, with_ray=not args.no_ray, as_json=args.json)
    elif args.benchmark == "pass":
        from tidal.bench import passmode

        passmode.run(rows=200_000 if args.quick else 400_000, batches_per_pass=args.batches_per_pass, as_json=args.json)
    elif args.benchmark == "dense":
        from tidal.bench import dense
        from tidal.errors import TidalError

        try:
            dense.run(quick=args.quick, as_json=args.json)
        except TidalError as exc:
            print(f"tidal bench dense: {exc}", file=sys.stderr)
            return 2
    elif args.benchmark == "rewrite":
        from tidal.bench import rewrite

        rewrite.run(quick=args.quick, as_json=args.json, device=args.device)
    elif args.benchmark == "data":
        from tidal.bench import data

        data.run(rows=args.rows, as_json=args.json)
    return 0


def _bench_problem(args: argparse.Namespace) -> str | None:
    """Why the options of `tidal bench NAME` cannot run, before anything is measured."""
    name = args.benchmark
    if name == "serve" and args.seconds is not None and not 1 <= args.seconds <= 3600:  # also refuses nan and inf
        return f"--seconds must be from 1 to 3600 (a shorter window may get no answer to measure), got {args.seconds}"
    if name == "sparse" and args.threads and not 1 <= min(args.threads) <= max(args.threads) <= _MOST_BENCH_THREADS:
        return f"--threads must be 1 to {_MOST_BENCH_THREADS}, got {args.threads}"
    if name == "quality":
        from tidal.bench import quality

        if args.rows < quality.MIN_ROWS:
            return (f"--rows must be >= {quality.MIN_ROWS:,d} (training rows; a quarter as many more are held out to "
                    f"score), got {args.rows}")
        if not 1 <= args.vocabulary < 2**63:
            return f"--vocabulary must be from 1 to 2**63 - 1, got {args.vocabulary}"
        if args.epochs < 1:
            return f"--epochs must be >= 1, got {args.epochs}"
    if name == "hetero":
        from tidal.bench import hetero

        if args.rows < 2 * hetero.BATCH:
            return f"--rows must be at least {2 * hetero.BATCH}, got {args.rows}"
    if name == "pass":
        from tidal.config import MAX_BATCHES_PER_PASS

        if not 1 <= args.batches_per_pass <= MAX_BATCHES_PER_PASS:
            return f"--batches-per-pass must be from 1 to {MAX_BATCHES_PER_PASS:,d}, got {args.batches_per_pass}"
    if name == "rewrite" and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device cuda, but torch sees no CUDA device; use --device cpu"
    if name == "data" and args.rows < 1:
        return f"--rows must be >= 1, got {args.rows}"
    return None


def _resume(args: argparse.Namespace) -> str:
    """The command that resumes the run `args` began (without --init-from: the run has
    checkpoints of its own once it wrote one)."""
    sets = "".join(f" --set {shlex.quote(entry)}" for entry in args.settings)
    without = " (without --init-from)" if args.init_from else ""
    return f"`tidal train --config {shlex.quote(args.config)}{sets} --resume`{without}"


def _go_on(args: argparse.Namespace, config: RunConfig | None) -> str:
    """How to go on with a run that stopped part way."""
    if last := _saved(config):
        return f"{_resume(args)} continues from the last checkpoint written, {last}"
    return "no checkpoint was written: run the same command again"


def _saved(config: RunConfig | None) -> str | None:
    """The checkpoint the run of `config` resumes from, if it has one."""
    from tidal.runtime import checkpoint

    return None if config is None else checkpoint.latest_name(Path(config.training.run_dir))


def _train(args: argparse.Namespace) -> int:
    import yaml

    from tidal.config import RunConfig
    from tidal.errors import RunStoppedError, TidalError
    from tidal.runtime import Trainer

    config = None
    try:
        config = RunConfig.from_yaml(args.config, args.settings)
        if args.print_config:
            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        summary = Trainer(config).fit(resume=args.resume, init_from=args.init_from)
    except RunStoppedError as exc:
        print(f"tidal train: {exc.what}. The run stopped; {_go_on(args, config)}", file=sys.stderr)
        return 2
    except TidalError as exc:
        print(f"tidal train: {exc}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as exc:
        if not _is_disk_error(exc):
            raise
        return _write_failed("train", exc, f"the last checkpoint written is intact: {_resume(args)} continues from it"
                             if _saved(config) else "no checkpoint was written",
                             config.training.run_dir if config else args.config)
    except KeyboardInterrupt:
        print(f"tidal train: interrupted; {_go_on(args, config)}", file=sys.stderr)
        return 130
    _print_train_summary(args, config, summary)
    return 0


def _print_train_summary(args: argparse.Namespace, config: RunConfig, summary: dict) -> None:
    """What `tidal train` did: steps, rows and speed, bad rows, the last evaluation, the tables, the runtime."""
    from tidal.data.readers import BadRows
    from tidal.runtime.trainer import Evaluation, shown_evaluation, shown_table

    steps, first = summary["steps"], summary["resumed_from"]
    after = (f"started from {args.init_from} at its step {first:,d}" if args.init_from
             else f"resumed after step {first:,d}")
    trained = f"{steps:,d} steps" if not first else f"steps {first + 1:,d}-{steps:,d} ({after})" \
        if steps > first else f"nothing: the run had ended at step {steps:,d}"
    print(f"trained {trained}, {summary['rows']:,d} rows at {summary['samples_per_s']:,.0f} samples/s; "
          f"bad rows: {summary['bad_rows']:,}")
    if summary["compile_s"] >= _NOTED_COMPILE_S:
        print(f"  {summary['compile_s']:.1f} s of the run went to compiling Tidal's kernels on their first use here; "
              "numba keeps them on disk, so later runs skip it")
    for line in BadRows(summary["bad_rows"], summary["bad_row_examples"]).listed():
        print(f"  {line}")
    if summary["eval"]:
        evaluation = Evaluation(**summary["eval"])
        for target in evaluation.auc:
            print(f"  eval {target}: {shown_evaluation(evaluation, target)}")
        if summary["eval"]["bad_rows"]:
            print(f"  eval data: {BadRows(summary['eval']['bad_rows'], summary['eval']['bad_row_examples']).summary()}")
    for name, table in summary["tables"].items():
        print(f"  {shown_table(name, table)}")
    if summary["runtime"] and "passmode" in summary["runtime"]:
        _print_passes(summary["runtime"]["passmode"])
    elif summary["runtime"]:
        _print_runtime(summary["runtime"], config.training.run_dir)
    print(f"  metrics: {config.training.run_dir}/metrics.jsonl")


def _print_passes(report: dict) -> None:
    """A pass-mode run's passes, the rows they moved and where its time went."""
    kept = (f"{report['kept_share']:.0%} of a pass's rows already on the device from the pass before (after the "
            f"first)" if report["passes"] > 1 else "the whole run in it")
    print(f"  pass mode: {_count(report['passes'], 'pass')} of {report['rows_per_pass']:,.0f} rows on average, "
          f"{kept} ({report['rows_in']:,d} rows moved in, {report['rows_out']:,d} out before the end)")
    print(f"    training {report['train_s']:.1f} s, swapping rows {report['swap_s']:.1f} s, safe points (rows written "
          f"back, evictions, evaluations, checkpoints) {report['safe_point_s']:.1f} s; planning {report['plan_s']:.1f} s, "
          f"training waiting for it {report['wait_s']:.1f} s")


def _count(n: int, thing: str) -> str:
    """`n` things, in English ('1 pass', '3 passes')."""
    return f"{n:,d} {thing}" if n == 1 else f"{n:,d} {thing}{'es' if thing.endswith('s') else 's'}"


def _print_runtime(report: dict, run_dir: str) -> None:
    """The heterogeneous run's stage table, its sparse workers when their number
    changed, their failures and lost samples."""
    from tidal.runtime.telemetry import Telemetry

    print(Telemetry.table(report))
    counts = report["sparse_workers"]
    if len(counts) > 1:
        print("  sparse workers: " + ", ".join(f"{n} from step {step:,d}" for step, n in counts))
    for failure in report["sparse_worker_failures"]:
        print(f"  sparse worker {failure['worker']} failed in {failure['stage']} of batch {failure['batch']}: "
              f"{failure['error']} (replaced; the batch was done again)")
    print(f"  lost samples: {report['lost_samples']:,d}" + "".join(f"\n    {r}" for r in report["lost_reasons"]))
    print(f"  telemetry: {run_dir}/telemetry.json")


def _eval(args: argparse.Namespace) -> int:
    from tidal.errors import ConfigError, DataError, DataPathError, TidalError

    reading = {"format": args.format, "columns": args.columns, "csv_header": args.csv_header,
               "max_bad_fraction": args.max_bad_fraction, "on_bad_row": args.on_bad_row}
    given = {k: v for k, v in reading.items() if v is not None}  # how to read the files, as flags said
    try:
        from tidal.config import RunConfig
        from tidal.data.readers import BadRows, expand_paths, format_of
        from tidal.runtime import Trainer, checkpoint
        from tidal.runtime.trainer import predictions_file, shown_evaluation
        from tidal.runtime.workers import dense_device

        dense_device(args.device, key="--device")  # what the flags alone decide, before the checkpoint loads
        if args.no_group_by and args.group_by:
            raise ConfigError(f"--group-by {args.group_by} and --no-group-by contradict each other: give one")
        files = expand_paths(args.data)
        if args.predictions is not None:
            predictions_file(args.predictions)
        with checkpoint.reading(Path(args.checkpoint)) as directory:  # a run training meanwhile keeps it
            saved = checkpoint.read_meta(directory)["config"]
            saved = {**saved, "training": {**saved["training"], "device": args.device},  # its tables are loaded:
                     "tables": [{**t, "reserve_rows": 0} for t in saved["tables"]]}  # none reserves rows ahead
            trainer = Trainer(RunConfig.from_saved(saved))
            step = checkpoint.restore(trainer, directory, check_data=False)["step"]  # the training files may be gone
            print(f"checkpoint {directory.name}, step {step:,d}", flush=True)
        trainer.collection.evict()  # within the tables' caps, as `tidal export` serves them
        data = {**saved["data"], **given}
        trainer.config = RunConfig.from_saved({**saved, "data": data})  # how these files are read
        _check_eval_flags(args, {data["format"] or format_of(f) for f in files})
        result = trainer.evaluate(args.data, group_by=False if args.no_group_by else args.group_by,
                                  predictions=args.predictions)
    except DataError as exc:
        hint = "" if isinstance(exc, DataPathError) else (
            "\n(the files are read as the run's data section says; --format, --columns, --csv-header, "
            "--max-bad-fraction and --on-bad-row say otherwise)")
        print(f"tidal eval: {_as_flags(str(exc), given)}{hint}", file=sys.stderr)
        return 2
    except TidalError as exc:
        print(f"tidal eval: {_as_flags(str(exc), given)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted("eval", "nothing was written (eval writes no file)" if args.predictions is None else
                            f"{args.predictions} was written whole or not at all")
    for target in result.auc:
        print(f"{target}: {shown_evaluation(result, target)}")
    print(f"bad rows: {BadRows(result.bad_rows, result.bad_row_examples).summary()}")
    if args.predictions is not None:
        print(f"predictions of the {result.rows:,d} rows evaluated written to {args.predictions}")
    return 0


def _as_flags(message: str, given: dict) -> str:
    """`message` naming the flags the user typed instead of the data settings they set."""
    for key in given:
        message = message.replace(f"data.{key}", f"--{key.replace('_', '-')}")
    return message


def _check_eval_flags(args: argparse.Namespace, kinds: set[str]) -> None:
    """Refuse --columns and --no-csv-header where no file of the formats `kinds` reads them."""
    from tidal.errors import ConfigError

    positional = "tsv" in kinds or ("csv" in kinds and args.csv_header is False)
    if args.columns and not positional:
        raise ConfigError(f"--columns names the columns of TSV files and of CSV files without a header line "
                          f"(--no-csv-header), but these files are {' and '.join(sorted(kinds))}, which name their "
                          f"own: leave it out")
    if args.csv_header is False and "csv" not in kinds:
        raise ConfigError(f"--no-csv-header is for CSV files, but these files are {' and '.join(sorted(kinds))}: "
                          f"leave it out")


def _export(args: argparse.Namespace) -> int:
    from tidal.errors import TidalError

    for flag, value in (("--table-dtype", args.table_dtype), ("--backend", args.backend)):
        if args.delta and value:
            print(f"tidal export: {flag} applies to a full export; a delta keeps its bundle's", file=sys.stderr)
            return 2
    earlier = args.delta or Path(args.out).exists()  # a delta goes into a bundle
    try:
        from tidal.serving import export, export_delta

        out = export_delta(args.checkpoint, args.out) if args.delta else \
            export(args.checkpoint, args.out, table_dtype=args.table_dtype, backend=args.backend)
    except TidalError as exc:
        print(f"tidal export: {exc}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as exc:
        if not _is_disk_error(exc):
            raise
        return _write_failed("export", exc, "the earlier bundle at --out is intact" if earlier else
                             "nothing was left at --out", args.out)
    except KeyboardInterrupt:
        new = "with the new delta" if args.delta else "the new one"
        was = f"the bundle at {args.out} is whole: as it was" if earlier else f"nothing is at {args.out}"
        return _interrupted("export", f"{was}, or {new} if the interrupt came as it was renamed into place")
    if out is None:  # a delta of the checkpoint the bundle serves already
        print(f"no delta written: {args.out} already serves this checkpoint (nothing changed since)")
        return 0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if args.delta:
        print(f"wrote delta {out.name} into {args.out} ({size / 2**20:,.1f} MiB): {_delta_counts(out)}; a tidal serve "
              f"of it applies it on POST /v2/repository/models/NAME/load or at its next --delta-poll-s")
    else:
        manifest = json.loads((out / "manifest.json").read_text())
        print(f"wrote the serving bundle {out} of step {manifest['source_step']:,d} ({size / 2**20:,.1f} MiB; backend "
              f"{manifest['config']['serving']['backend']}, {manifest['table_dtype']} tables); serve it with: "
              f"tidal serve {out}")
    return 0


def _delta_counts(folder: Path) -> str:
    tables = json.loads((folder / "manifest.json").read_text())["tables"]
    return ", ".join(f"table {name!r} {c['changed']:,d} rows changed, {c['removed']:,d} removed"
                     for name, c in tables.items())


def _is_disk_error(exc: Exception) -> bool:
    """Whether `exc` is a file that could not be written or read (not, say, a lost
    connection, also an OSError)."""
    return isinstance(exc, SafetensorError) or exc.filename is not None or exc.errno in _DISK_ERRORS


def _write_failed(command: str, exc: Exception, consequence: str, folder: str) -> int:
    """Report a file that could not be written or read (a full or read-only disk, say),
    named, or else the folder being written (`folder`)."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else f" (writing under {folder})"
    if getattr(exc, "filename2", None):  # a rename: the second path is where it failed to go
        where = f" (moving {exc.filename} to {exc.filename2})"
    print(f"tidal {command}: a file could not be written or read: {getattr(exc, 'strerror', None) or exc}{where}; "
          f"{consequence}", file=sys.stderr)
    return 2


def _interrupted(command: str, state: str) -> int:
    """Report Ctrl-C in one line, with the state it left (`state`); 130, as a shell
    reports a command stopped by SIGINT."""
    print(f"tidal {command}: interrupted; {state}", file=sys.stderr)
    return 130


def _dense_backend(predictor: Predictor) -> str:
    """What runs the dense network, with the graph rules it runs rewritten by and any
    rule left out for another reason than finding nothing to rewrite."""
    from tidal.compile import NOT_FOUND

    kept = [o.rule for o in predictor.rewrites if o.kept]
    dropped: dict[str, list[str]] = {}  # reason -> the rules left out for it
    for o in predictor.rewrites:
        if not o.kept and o.reason != NOT_FOUND:
            dropped.setdefault(o.reason, []).append(o.rule)
    rules = f", rewritten by {', '.join(kept)}" if kept else ""
    return predictor.backend + rules + "".join(f"; {', '.join(r)} left out: {why}" for why, r in dropped.items())


def _serve(args: argparse.Namespace) -> int:
    from tidal.errors import ConfigError, TidalError
    from tidal.processes import SIGTERM_CAME
    from tidal.serving import LoadingAnswers, Service, listen, load_bundle, serve
    from tidal.serving.server import MODEL_NAME_RULE, is_model_name

    flags = {k: v for k, v in {"max_batch_rows": args.max_batch_rows, "chunk_rows": args.chunk_rows,
                               "max_delay_ms": args.max_delay_ms, "sparse_threads": args.sparse_threads,
                               "delta_poll_s": args.delta_poll_s, "backend": args.backend}.items()
             if v is not None}
    try:
        settings = _serving_settings(args.settings, flags)
        _check_batching_flags(args.no_batching, flags, settings)
    except ConfigError as exc:
        print(f"tidal serve: {exc}", file=sys.stderr)
        return 2
    overrides = {**flags, **settings}
    name = args.model_name if args.model_name is not None else Path(args.bundle).resolve().name
    if not is_model_name(name):
        given = "" if args.model_name is not None else " (the bundle folder's name; give another with --model-name)"
        print(f"tidal serve: --model-name {MODEL_NAME_RULE}; got {name!r}{given}", file=sys.stderr)
        return 2
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        print(f"tidal serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    loading = LoadingAnswers(sock, f"bundle {args.bundle}")
    try:
        try:
            service = Service(load_bundle(args.bundle), name=name, batching=not args.no_batching, **overrides)
        finally:
            loading.stop()
        if SIGTERM_CAME.is_set():  # one that landed in a finalizer, which dropped its KeyboardInterrupt
            service.close()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        sock.close()
        print("stopped before serving", flush=True)
        return 0
    except TidalError as exc:
        sock.close()
        message = str(exc)
        for key in overrides:  # the flag the user typed, not the config field behind it
            flag = f"--set {key}" if key in settings else f"--{key.replace('_', '-')}"
            message = message.replace(f"{key}:", f"{flag}:").replace(f"{key} (", f"{flag} (")
        print(f"tidal serve: {message}", file=sys.stderr)
        return 2
    try:
        print(f"serving {name!r}{_served(service)} at http://{args.host}:{sock.getsockname()[1]}/v2/models/"
              f"{name} (dense network on {_dense_backend(service.predictor)}; metrics at /metrics; Ctrl-C stops)",
              flush=True)
        serve(service, sock, exit_timeout_s=args.exit_timeout_s)
    except KeyboardInterrupt:  # the server has shut down and closed the service; uvicorn passes the signal on
        pass
    finally:
        service.close()  # again, if the signal came before serving began
    print(f"stopped serving {name!r}", flush=True)
    return 0


def _check_batching_flags(no_batching: bool, flags: dict, settings: dict) -> None:
    """Refuse batching settings (by their flags, or `--set`) beside --no-batching, which
    runs every request alone."""
    from tidal.errors import ConfigError

    batching = ("max_batch_rows", "chunk_rows", "max_delay_ms")
    unused = [f"--{key.replace('_', '-')}" for key in batching if key in flags] + \
        [f"--set {key}" for key in batching if key in settings]
    if no_batching and unused:
        raise ConfigError(f"--no-batching runs every request alone, so {', '.join(unused)} would have no effect: "
                          f"remove {'them' if len(unused) > 1 else 'it'}, or --no-batching")


def _served(service) -> str:  # type: ignore[no-untyped-def]
    """" (checkpoint C, with its delta N)": what the service serves, as far as its
    bundle records it."""
    source, delta = service.predictor.source, service.updater.delta
    said = ([str(source)] if source else []) + ([f"with its delta {delta}"] if delta else [])
    return f" ({', '.join(said)})" if said else ""


def _serving_settings(entries: list[str], flags: dict) -> dict:
    """`--set FIELD=VALUE` entries as serving-config overrides (values parsed as YAML)."""
    import yaml

    from tidal.config import ServingConfig, closest_match, yaml_loader
    from tidal.errors import ConfigError

    settings = {}
    for entry in entries:
        field, equals, text = entry.partition("=")
        field = field.strip()
        if not equals:
            raise ConfigError(f"--set takes FIELD=VALUE, got {entry!r}")
        whole, dot, _ = field.partition(".")
        if whole == "table_dtype":
            raise ConfigError(f"--set {field}: the tables' dtype is fixed when the bundle is written "
                              "(tidal export --table-dtype)")
        if dot and whole in ServingConfig.model_fields:
            raise ConfigError(f"--set {field}: a serving field is set whole, not a part of it: give {whole}'s "
                              f"whole value as YAML (--set '{whole}={{...}}')")
        if field not in ServingConfig.model_fields:
            fields = [f for f in ServingConfig.model_fields if f != "table_dtype"]
            raise ConfigError(f"--set {field}: no such serving field"
                              f"{closest_match(field, fields, ' the fields are ' + ', '.join(fields))}")
        if field in flags or field in settings:
            raise ConfigError(f"--set {field}: given twice (by --set or by its own flag)")
        try:
            settings[field] = yaml.load(text, Loader=yaml_loader())
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {field}: the value is not YAML: {exc}") from None
    return settings


def _gen_data(args: argparse.Namespace) -> int:
    from tidal.data.generate import AFTER_THE_FILES_WERE_IN_PLACE, check_arguments, generate
    from tidal.errors import ConfigError

    flags = {"rows": "--rows", "files": "--files", "file_format": "--format", "seed": "--seed", "split": "--split"}
    try:  # checked here first, so that a message names the flag (--rows), not generate's argument (rows)
        check_arguments(rows=args.rows, files=args.files, file_format=args.format, seed=args.seed, split=args.split,
                        names=flags)
        data = generate(args.out, rows=args.rows, files=args.files, file_format=args.format, seed=args.seed,
                        split=args.split)
    except ConfigError as exc:
        print(f"tidal {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the folder is there, but a file in it cannot be written (read-only, disk full)
        print(f"tidal gen-data: cannot write to --out {args.out}: {exc.strerror or exc}"
              f"{f' ({exc.filename})' if exc.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        in_place = exc.args == (AFTER_THE_FILES_WERE_IN_PLACE,)
        return _interrupted("gen-data", f"{args.out} holds the whole new data set, which was being put in place"
                            if in_place else f"the files being written were removed: {args.out} holds what it held "
                                             f"before")
    files = len(data.paths)
    print(f"wrote {data.rows:,d} row{'s' * (data.rows != 1)} in {files} file{'s' * (files != 1)} to {args.out}: "
          f"positive rate {data.positive_rate:.3f}, ceiling AUC "
          f"{'n/a (one class only)' if data.ceiling_auc is None else f'{data.ceiling_auc:.4f}'}")
    if data.replaced:
        shown = ", ".join(data.replaced[:3]) + (", ..." if len(data.replaced) > 3 else "")
        print(f"  replaced {len(data.replaced)} earlier file{'s' * (len(data.replaced) != 1)} in {args.out} "
              f"({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
