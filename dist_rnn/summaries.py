"""Run output: log lines, progress bar, ``metrics.jsonl`` and TensorBoard.

Only the chief writes. Other workers get a :class:`MetricsLogger` with
``enabled=False`` that writes nothing into the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import tensorflow as tf

from dist_rnn.config import Config
from dist_rnn.run_dir import RunDirectory

log = logging.getLogger("dist_rnn")


def setup_logging(is_chief: bool, log_file: Path | None = None) -> None:
    """Configures the ``dist_rnn`` logger: INFO on the chief, WARNING elsewhere."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_chief else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)


def peak_memory() -> dict:
    """Peak memory in MiB: of each visible GPU (as TensorFlow reports it) and of this process on the host."""
    import resource

    out = {"peak_host_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for i, _ in enumerate(tf.config.list_logical_devices("GPU")):
        try:
            out[f"peak_gpu{i}_memory_mib"] = tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"] / 2**20
        except (ValueError, tf.errors.OpError):
            pass
    return out


def perplexity(loss: float) -> float:
    """exp(loss), saturating instead of overflowing."""
    return math.exp(loss) if loss < 700 else float("inf")


class ProgressBar:
    """One-line progress bar redrawn in place on a terminal."""

    def __init__(self, stream=sys.stdout, width: int = 24):
        self.stream = stream
        self.width = width
        self.active = False

    def update(self, done: int, total: int, text: str) -> None:
        """Redraws the bar at ``done/total`` followed by ``text``."""
        frac = min(1.0, done / total) if total else 0.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{total} {text}\033[K")
        self.stream.flush()
        self.active = True

    def clear(self) -> None:
        """Erases the bar so a log line can be printed."""
        if self.active:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.active = False


class MetricsLogger:
    """Writes metrics to ``metrics.jsonl``, TensorBoard and the terminal.

    Building one writes nothing: ``metrics.jsonl`` and the event files are
    opened at the first record, so a logger can be built before the run
    directory is checked and created.

    Args:
        run_dir: The run directory (or its path).
        enabled: False on non-chief workers: nothing is written.
        tensorboard: Write TensorBoard event files.
        progress: ``auto`` (terminal only), ``on`` or ``off``.
        level: ``char`` or ``word``: char level adds bits per character.
    """

    def __init__(self, run_dir: RunDirectory | Path, enabled: bool, tensorboard: bool = True, progress: str = "auto",
                 level: str = "char"):
        self.run_dir = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)
        self.enabled = enabled
        self.level = level
        self._writers: dict[str, tf.summary.SummaryWriter] = {}
        self._tensorboard = tensorboard and enabled
        use_bar = progress == "on" or (progress == "auto" and sys.stdout.isatty())
        self.bar = ProgressBar() if (use_bar and enabled) else None
        self._jsonl = None
        self._start = time.time()

    @classmethod
    def for_run(cls, config: Config, run_dir: RunDirectory, is_chief: bool) -> MetricsLogger:
        """The logger of ``dist-rnn train``: ``logging.tensorboard``, ``logging.progress`` and ``data.level``."""
        return cls(run_dir, is_chief, config.logging.tensorboard, config.logging.progress, config.data.level)

    def writer(self, split: str) -> tf.summary.SummaryWriter | None:
        """The TensorBoard writer of ``RUN_DIR/<split>`` (``"."``: RUN_DIR itself; None when disabled)."""
        if not self._tensorboard:
            return None
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(str(self.run_dir.events(split)))
        return self._writers[split]

    def _record(self, split: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        entry = {"split": split, "step": step, "time": round(time.time() - self._start, 3), **values}
        if self._jsonl is None:
            self._jsonl = open(self.run_dir.metrics_file, "a", encoding="utf-8")
        self._jsonl.write(json.dumps(entry) + "\n")
        self._jsonl.flush()
        writer = self.writer(split)
        if writer is not None:
            with writer.as_default(step=step):
                for key, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                        tf.summary.scalar(key, value)
            writer.flush()

    def train(self, step: int, values: dict) -> None:
        """Records a training log point and prints its line."""
        values = self._with_derived(values)
        self._record("train", step, values)
        self._print(
            f"step {step:>7}  epoch {values['epoch']:>3}  loss {values['loss']:.4f}  ppl {values['perplexity']:8.2f}"
            f"  lr {values['learning_rate']:.3g}  gnorm {values['grad_norm']:.3g}"
            f"  {values['tokens_per_sec']:,.0f} tok/s")

    def evaluation(self, step: int, split: str, values: dict) -> None:
        """Records an evaluation and prints its line."""
        values = self._with_derived(values)
        self._record(split, step, values)
        bpc = f"  bpc {values['bpc']:.4f}" if "bpc" in values else ""
        bpb = f"  bpb {values['bpb']:.4f}" if values.get("bpb") is not None else ""
        self._print(f"eval  step {step:>7}  {split}  loss {values['loss']:.4f}  ppl {values['perplexity']:.2f}{bpc}{bpb}")

    def text(self, split: str, tag: str, text: str, step: int) -> None:
        """Writes a text summary (TensorBoard only)."""
        writer = self.writer(split)
        if writer is not None:
            with writer.as_default(step=step):
                tf.summary.text(tag, tf.constant(text))
            writer.flush()

    def hparams(self, hparams: dict, run_name: str) -> None:
        """Records the run's hyperparameters for TensorBoard's HParams table.

        Written to ``RUN_DIR`` itself, with the final validation perplexity
        (``RUN_DIR/valid``, tag ``perplexity``) as the metric, so runs under
        one log root compare in one table.
        """
        if not self._tensorboard:
            return
        from tensorboard.plugins.hparams import api as hp

        writer = self.writer(".")
        with writer.as_default():
            hp.hparams_config(hparams=[hp.HParam(k) for k in hparams],
                              metrics=[hp.Metric("perplexity", group="valid", display_name="valid perplexity"),
                                       hp.Metric("loss", group="valid", display_name="valid loss")])
            hp.hparams(hparams, trial_id=run_name)
        writer.flush()

    def histograms(self, step: int, weights: dict, gradients: dict) -> None:
        """Writes weight and gradient histograms (``RUN_DIR/train``)."""
        writer = self.writer("train")
        if writer is None:
            return
        with writer.as_default(step=step):
            for name, value in weights.items():
                tf.summary.histogram(f"weights/{name}", value)
            for name, value in gradients.items():
                tf.summary.histogram(f"gradients/{name}", value)
        writer.flush()

    def progress(self, done: int, total: int, text: str) -> None:
        """Updates the progress bar (terminal only)."""
        if self.bar is not None:
            self.bar.update(done, total, text)

    def _with_derived(self, values: dict) -> dict:
        values = dict(values)
        values["perplexity"] = perplexity(values["loss"])
        if self.level == "char":
            values["bpc"] = values["loss"] / math.log(2)
        return values

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        log.info(line)

    def close(self) -> None:
        """Flushes and closes files."""
        if self.bar is not None:
            self.bar.clear()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for w in self._writers.values():
            w.close()
