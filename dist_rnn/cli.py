"""The ``dist-rnn`` command line: parse arguments, call :mod:`dist_rnn.app`.

Bad input of any kind ends with one ``error: ...`` line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = _Parser(prog="dist-rnn", description="Train, evaluate and sample recurrent language models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also show TensorFlow's start-up notices (oneDNN, CUDA probe) on stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", parents=[common], help="train a new run, or resume one")
    t.add_argument("configs", nargs="*", metavar="CONFIG", help="YAML files, merged left to right")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable)")
    t.add_argument("--run-dir", help="run directory (default runs/<last config name>); an existing run resumes")

    p = sub.add_parser("prepare", parents=[common],
                       help="prepare the config's corpus: token files and manifest in the data cache (once)")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML files, merged left to right")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable)")

    checkpoint_help = ("which checkpoint of the run: latest (default, the newest in RUN_DIR/checkpoints), best "
                       "(RUN_DIR/best, lowest validation loss) or a checkpoint path such as RUN_DIR/checkpoints/ckpt-20")
    data_set_help = ("where the run's data is read from now, if it moved: data.path, data.train_file, "
                     "data.valid_file, data.test_file or data.cache_dir (repeatable; the text must be the run's)")

    e = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint of a run (the latest by default)")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--split", choices=["valid", "test"], default="valid")
    e.add_argument("--checkpoint", default="latest", metavar="best|latest|PATH", help=checkpoint_help)
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=data_set_help)
    e.add_argument("--dynamic", action="store_true",
                   help="dynamic evaluation (Krause et al. 2018): a copy of the weights adapts to the text as it is "
                        "scored, segment by segment; the run directory is not modified")
    e.add_argument("--dynamic-rule", choices=["sgd", "rms"], help="update rule (default sgd)")
    e.add_argument("--dynamic-lr", type=float, metavar="LR",
                   help="learning rate of the updates (default 0.3 for sgd, 0.003 for rms)")
    e.add_argument("--dynamic-decay", type=float, metavar="LAMBDA",
                   help="pull back towards the trained weights per segment (default 0.002 for sgd, 0.02 for rms)")
    e.add_argument("--dynamic-segment", type=int, metavar="TOKENS",
                   help="tokens per segment, one update each (default the run's train.num_steps)")
    e.add_argument("--dynamic-batch", type=int, metavar="ROWS",
                   help="parallel streams sharing the adapted weights (default 16; 1 is the paper's setting, slower)")
    e.add_argument("--dynamic-epsilon", type=float, metavar="EPS", help="rms: added to the gradient RMS (default 1e-3)")
    e.add_argument("--dynamic-stat-batches", type=int, metavar="N",
                   help="rms: training batches (train.batch_size rows) the gradient RMS is collected over "
                        "(default 10)")

    g = sub.add_parser("generate", parents=[common], help="sample text from a checkpoint of a run, or from an export")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="training run: samples from its latest checkpoint (see --checkpoint)")
    source.add_argument("--model", metavar="EXPORTED_DIR", help="folder written by 'dist-rnn export'")
    g.add_argument("--checkpoint", metavar="best|latest|PATH", help=checkpoint_help + " (with --run-dir)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=data_set_help + "; generate reads no data, so they are only checked")
    g.add_argument("--prime", default="", help="text that warms up the state")
    g.add_argument("--length", type=int, default=200, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    g.add_argument("--num-samples", type=int, default=1, help="samples generated in one batch")
    g.add_argument("--seed", type=int, default=0)

    x = sub.add_parser("export", parents=[common],
                       help="export a checkpoint of a run (the latest by default) as a SavedModel "
                            "and a .keras file")
    x.add_argument("--run-dir", required=True)
    x.add_argument("--checkpoint", default="latest", metavar="best|latest|PATH", help=checkpoint_help)
    x.add_argument("--out", required=True, metavar="DIR",
                   help="new or empty folder, or a previous export (replaced)")

    r = sub.add_parser("report", parents=[common], help="print a run's summary and plot its training curves")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--out", metavar="PNG", help="image file of the curves (default RUN_DIR/report.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dist-rnn`` console script; returns the exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    from dist_rnn import runtime
    from dist_rnn.errors import LOST_PEER_EXIT_CODE, UserError, first_line

    runtime.show_startup_logs(args.verbose)

    try:
        from dist_rnn import app

        if args.command == "train":
            app.train(args.configs, args.overrides, args.run_dir)
        elif args.command == "prepare":
            app.print_json_line(app.prepare(args.configs, args.overrides))
        elif args.command == "eval":
            app.print_json_line(app.evaluate(args.run_dir, args.split, args.checkpoint, args.overrides,
                                             dynamic=_dynamic_settings(args)))
        elif args.command == "generate":
            app.generate(args.run_dir, args.prime, args.length, args.temperature, args.top_k, args.top_p,
                         args.seed, args.num_samples, model_dir=args.model, checkpoint=args.checkpoint,
                         overrides=args.overrides)
        elif args.command == "export":
            app.print_json_line(app.export(args.run_dir, args.out, args.checkpoint))
        elif args.command == "report":
            from dist_rnn import report

            report.report(args.run_dir, args.out)
    except UserError as e:
        sys.stdout.flush()
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:
        if _is_lost_peer(e):
            sys.stderr.write("error: a collective operation failed, another worker probably died: "
                             f"{first_line(e)}\n")
            return LOST_PEER_EXIT_CODE
        raise
    return 0


def _dynamic_settings(args):
    """The :class:`DynamicSettings` of ``eval --dynamic`` (None without it), checked.

    Raises:
        UserError: A ``--dynamic-*`` option without ``--dynamic``, or a bad value.
    """
    from dist_rnn.errors import UserError
    from dist_rnn.training.dynamic_settings import DynamicSettings

    given = {name: value for name, value in vars(args).items() if name.startswith("dynamic_") and value is not None}
    if not args.dynamic:
        if given:
            raise UserError(f"eval: --{next(iter(given)).replace('_', '-')} needs --dynamic")
        return None
    fields = {"dynamic_rule": "rule", "dynamic_lr": "learning_rate", "dynamic_decay": "decay",
              "dynamic_segment": "segment", "dynamic_batch": "batch", "dynamic_epsilon": "epsilon",
              "dynamic_stat_batches": "stat_batches"}
    settings = DynamicSettings(**{fields[name]: value for name, value in given.items()})
    settings.check()
    return settings


def _is_lost_peer(error: Exception) -> bool:
    """Whether an error is a collective that failed because a peer worker or rank is gone."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                                             tf.errors.CancelledError)):
        return True
    return type(error).__module__.startswith("horovod") or "HorovodInternalError" in type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
