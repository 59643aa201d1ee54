"""The training loop: stateful truncated BPTT on any backend.

One trainer for every backend: the replica logic sits behind
:class:`~dist_rnn.distribution.Backend`, the gradient order in
:mod:`dist_rnn.training.steps`. The recurrent state is carried per replica from batch to
batch within an epoch and reset at each epoch start; evaluation does the same.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from dist_rnn.data.batching import EvalBatcher, StreamBatcher
from dist_rnn.training.checkpoints import Checkpointer, TrainingState, accepted_fingerprints, run_fingerprint
from dist_rnn.config import Config
from dist_rnn.data.encoding import EncodedCorpus
from dist_rnn.distribution import Backend
from dist_rnn.errors import UserError
from dist_rnn.generation import Sampler, model_step_fn
from dist_rnn.training.gradients import DynamicLossScale
from dist_rnn.models.model import build_model, check_cudnn_requirement, cudnn_excluded_by, kernel_report
from dist_rnn.models.outputs import output_summary
from dist_rnn.training.optimizers import build_optimizer
from dist_rnn.training.preemption import StopRequest
from dist_rnn.run_dir import RunDirectory
from dist_rnn.training.schedules import learning_rate_at
from dist_rnn.training.steps import StepFunctions
from dist_rnn.summaries import MetricsLogger, peak_memory, perplexity

log = logging.getLogger("dist_rnn")


class NonFiniteLossError(UserError):
    """Training produced a non-finite float32 loss, or too many skipped steps in a row (exit code 1)."""

    exit_code = 1


class SkippedSteps:
    """Optimizer steps skipped because the reduced gradient was not finite.

    The finite flag is computed from the all-reduced gradient, so every
    replica and worker records the same skips and stops at the same step.

    Args:
        max_consecutive: ``train.max_consecutive_skips``.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive: list[int] = []
        self.unreported: list[int] = []

    def record(self, step: int, finite: bool) -> bool:
        """Records whether ``step`` (1-based) applied its update.

        Returns:
            True when the last ``max_consecutive`` steps were all skipped.
        """
        if finite:
            self.consecutive = []
            return False
        self.total += 1
        self.consecutive.append(step)
        self.unreported.append(step)
        return len(self.consecutive) >= self.max_consecutive

    def report(self) -> str | None:
        """One line naming the skips since the last report (and clearing them), or None."""
        if not self.unreported:
            return None
        steps = self.unreported
        shown = ", ".join(str(s) for s in steps[:20]) + (f", ... {steps[-1]}" if len(steps) > 20 else "")
        self.unreported = []
        return (f"skipped {len(steps)} step(s) whose all-reduced gradient was not finite (weights and "
                f"optimizer state unchanged): step {shown}; {self.total} skipped since this process started")


@dataclass
class EvalResult:
    """Loss over a whole split, in nats per token."""

    split: str
    loss: float
    tokens: int
    level: str

    def as_dict(self) -> dict:
        """``split``, ``loss``, ``perplexity``, ``tokens`` and ``bpc`` (char level)."""
        out = {"split": self.split, "loss": self.loss, "perplexity": perplexity(self.loss), "tokens": self.tokens}
        if self.level == "char":
            out["bpc"] = self.loss / math.log(2)
        return out


class Trainer:
    """Builds model, optimizer and steps for a run, and trains, evaluates and samples.

    Args:
        config: The validated run config.
        run_dir: The run directory.
        backend: The distribution backend (replica count known).
        corpus: The encoded corpus.

    Raises:
        UserError: If a split is too small for one batch, or ``model.cudnn``
            is ``require`` and a layer cannot use the fused kernel.
    """

    def __init__(self, config: Config, run_dir: RunDirectory, backend: Backend, corpus: EncodedCorpus):
        self.config = config
        self.run_dir = run_dir
        self.backend = backend
        self.corpus = corpus
        t = config.train
        self.eval_batch_size = t.eval_batch_size or t.batch_size
        self.train_batches = StreamBatcher(corpus.train, t.batch_size, t.num_steps, "train", t.seed,
                                           config.data.random_offset)
        self.eval_batches = {split: EvalBatcher(corpus.split(split), self.eval_batch_size, t.num_steps, split)
                             for split in ("valid", "test") if len(corpus.split(split))}
        # The policy in force, not train.precision: ``dist-rnn eval`` builds a float32 model.
        precision = keras.mixed_precision.global_policy().name
        self.kernels = kernel_report(config.model, bool(tf.config.list_logical_devices("GPU")),
                                     jit_compile=t.jit_compile, precision=precision)
        self._sampler: Sampler | None = None  # built once: its tf.functions trace on the first sample only
        check_cudnn_requirement(config.model, self.kernels)
        with backend.scope():
            self.model = build_model(config.model, len(corpus.vocab), t.seed,
                                     allow_cudnn=not cudnn_excluded_by(t.jit_compile, precision))
            self.optimizer = build_optimizer(config.optimizer)
            self.optimizer.build(self.model.trainable_variables)
            self.loss_scale = DynamicLossScale(t.loss_scale) if t.precision == "mixed_float16" else None
        self.fingerprint = run_fingerprint(config, corpus.vocab.tokens)
        self.state = TrainingState([(t.batch_size, size) for size in self.model.state_sizes],
                                   self.fingerprint)
        self.steps = StepFunctions(self.model, self.optimizer, backend, t.batch_size, t.num_steps,
                                   config.optimizer.clip_norm, self.loss_scale, t.jit_compile,
                                   t.loss_normalization)
        objects = dict(model=self.model, optimizer=self.optimizer, training_state=self.state)
        if self.loss_scale is not None:
            objects["loss_scale"] = self.loss_scale
        self.checkpointer = Checkpointer(run_dir.checkpoints, config.checkpoint.keep, run_dir.path / "best", **objects)
        self.metrics: MetricsLogger | None = None
        self.stopped_by: str | None = None

    # ------------------------------------------------------------------ setup

    def restore(self) -> str | None:
        """Restores the newest checkpoint, if any; returns its path."""
        path = self.checkpointer.restore_latest(self.config.checkpoint.fallback,
                                                accepted_fingerprints(self.config, self.corpus.vocab.tokens), self.state)
        self.backend.after_optimizer_built(self.model.variables + self.optimizer.variables)
        return path

    @property
    def parameter_count(self) -> int:
        """Number of trainable weights."""
        return int(sum(np.prod(v.shape) for v in self.model.trainable_variables))

    def summary_lines(self) -> list[str]:
        """The run summary printed at start."""
        c, t, b = self.config, self.config.train, self.backend
        tokens_per_step = t.batch_size * t.num_steps
        lines = [
            f"run directory   {self.run_dir.path}",
            f"backend         {b.name}: {b.num_replicas} replica(s), {b.num_workers} worker(s), devices {', '.join(b.devices)}",
            f"precision       {t.precision}" + (" (XLA)" if t.jit_compile else ""),
            f"batch           global {t.batch_size} x {t.num_steps} steps = {tokens_per_step} tokens/step, "
            f"{t.batch_size // b.num_replicas} rows per replica",
            f"model           {c.model.num_layers} x {c.model.cell} {c.model.hidden_size}, embedding "
            f"{c.model.embedding_size}, vocab {len(self.corpus.vocab)} ({c.data.level}), "
            f"{self.parameter_count:,} parameters"
            + (f", LSTM projection {c.model.projection_size}" if c.model.projection_size else ""),
            f"output          {output_summary(c.model, self.model.projection)}",
            f"data            {c.data.corpus}: train {len(self.corpus.train):,} / valid {len(self.corpus.valid):,} / "
            f"test {len(self.corpus.test):,} tokens; {self.train_batches.batches_in_epoch()} steps per epoch",
            f"optimizer       {c.optimizer.name} lr {c.optimizer.learning_rate:g} ({c.optimizer.schedule.name}), "
            f"clip {c.optimizer.clip_norm:g}",
        ]
        return lines + [k.line() for k in self.kernels]

    # --------------------------------------------------------------- training

    def _zero_states(self, batch_size: int):
        return self.backend.shard(self.model.initial_state(batch_size))

    def _total_steps(self) -> int | None:
        t = self.config.train
        by_epochs = None
        if t.max_epochs is not None:
            by_epochs = sum(self.train_batches.batches_in_epoch(e) for e in range(1, t.max_epochs + 1))
        if t.max_steps is None:
            return by_epochs
        return t.max_steps if by_epochs is None else min(t.max_steps, by_epochs)

    def train(self, metrics: MetricsLogger) -> dict:
        """Trains until ``max_steps`` or ``max_epochs``, then evaluates, saves and samples.

        Args:
            metrics: Where log points go.

        Returns:
            ``{"step", "epoch", "valid"}`` with the final validation result (or None).

        Raises:
            NonFiniteLossError: If the float32 loss becomes NaN or infinite, or
                ``train.max_consecutive_skips`` steps in a row are skipped for
                a non-finite gradient (any precision).
        """
        self.metrics = metrics
        c, t = self.config, self.config.train
        step, epoch, index = int(self.state.step), int(self.state.epoch), int(self.state.batch_in_epoch)
        total = self._total_steps()
        if index > 0:
            states = self.backend.shard(tuple(v.read_value() for v in self.state.carried))
        else:
            states = self._zero_states(t.batch_size)
        tokens_per_step = t.batch_size * t.num_steps
        pending: list[tf.Tensor] = []
        last_time, last_step = time.perf_counter(), step
        skips = SkippedSteps(t.max_consecutive_skips)
        finished = total is not None and step >= total
        with StopRequest() as stop:
            while not finished:
                if t.max_epochs is not None and epoch > t.max_epochs:
                    break
                n_batches = self.train_batches.batches_in_epoch(epoch)
                if index == 0:
                    states = self._zero_states(t.batch_size)
                for inputs, targets in self.train_batches.dataset(epoch, index):
                    lr = learning_rate_at(c.optimizer, step, epoch, total, self.backend.num_replicas)
                    self.optimizer.learning_rate.assign(lr)
                    x, y = self.backend.shard((inputs, targets))
                    seed = tf.constant([t.seed, step], tf.int64)
                    self._profile(step + 1, before=True)
                    loss_sum, states, grad_norm, finite = self.steps.train_step(x, y, states, seed)
                    step, index = step + 1, index + 1
                    if skips.record(step, bool(finite)):
                        self._report_skips(skips)
                        raise NonFiniteLossError(
                            f"{len(skips.consecutive)} steps in a row (steps {skips.consecutive[0]}-{step}) were "
                            f"skipped because the all-reduced gradient was not finite "
                            f"(train.max_consecutive_skips: {t.max_consecutive_skips}); the last good checkpoint is "
                            f"{self.checkpointer.latest or 'none'} (lower optimizer.learning_rate or set "
                            f"optimizer.clip_norm)")
                    self._profile(step, before=False)
                    if c.logging.histograms_every and step % c.logging.histograms_every == 0 and self.backend.is_chief:
                        self._write_histograms(step, inputs, targets)
                    pending.append(loss_sum)
                    metrics.progress(step, total or 0, f"epoch {epoch}")
                    last = total is not None and step >= total
                    if step % t.log_every == 0 or last or index == n_batches:
                        self._report_skips(skips)
                        loss = self._mean_loss(pending, step)
                        now = time.perf_counter()
                        rate = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
                        norm = float(grad_norm)
                        values = {"epoch": epoch, "loss": loss, "learning_rate": lr, "grad_norm": norm,
                                  "clip_ratio": min(1.0, c.optimizer.clip_norm / norm) if c.optimizer.clip_norm and norm > 0 else 1.0,
                                  "tokens_per_sec": rate, "tokens_per_sec_per_replica": rate / self.backend.num_replicas,
                                  "step_time": (now - last_time) / max(step - last_step, 1)}
                        if self.loss_scale is not None:
                            values["loss_scale"] = float(self.loss_scale.scale.read_value())
                            values["skipped_steps"] = int(self.loss_scale.skipped_steps.read_value())
                        elif skips.total:
                            values["skipped_steps"] = skips.total
                        values.update(peak_memory())
                        metrics.train(step, values)
                        pending, last_time, last_step = [], time.perf_counter(), step
                    # Agreeing on a stop is a collective plus a host read on multi-process backends:
                    # every worker checks at the same steps, the logging cadence (log_every).
                    check_stop = self.backend.num_workers == 1 or step % t.log_every == 0 or last or index == n_batches
                    if check_stop and self.backend.any_worker(stop.requested is not None):
                        self.stopped_by = stop.requested or "a signal on another worker"
                        finished = True
                        break
                    if t.eval_every and step % t.eval_every == 0 and not last:
                        self._evaluate_and_log(step, epoch, index, states)
                        last_time = time.perf_counter()
                    if c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0 and not last:
                        self._mean_loss(pending, step)
                        self.save(step, epoch, index, states)
                        last_time = time.perf_counter()
                    if last:
                        finished = True
                        break
                if not finished:
                    epoch, index = epoch + 1, 0
            if index >= self.train_batches.batches_in_epoch(epoch):
                epoch, index = epoch + 1, 0
            self._report_skips(skips)
            self._mean_loss(pending, step)
            path = self.save(step, epoch, index, states)
        self._profile(None, before=False)
        if self.stopped_by:
            log.info(f"stopped by {self.stopped_by} after step {step}; checkpoint {path or '(written by the chief)'}")
            return {"step": step, "epoch": epoch, "valid": None, "stopped_by": self.stopped_by}
        valid = self._evaluate_and_log(step, epoch, index, states)
        test = None
        if "test" in self.eval_batches:
            test = self.evaluate("test")
            self.metrics.evaluation(step, "test", {"loss": test.loss, "tokens": test.tokens})
        return {"step": step, "epoch": epoch, "valid": valid.as_dict() if valid else None,
                "test": test.as_dict() if test else None}

    def _profile(self, step: int | None, before: bool) -> None:
        """Starts the profiler before the first and stops it after the last of ``logging.profile_steps``."""
        window = self.config.logging.profile_steps
        if not window or not self.backend.is_chief:
            return
        if before and step == window[0]:
            tf.profiler.experimental.start(str(self.run_dir.path / "train"))
            self._profiling = True
        elif getattr(self, "_profiling", False) and (step is None or step == window[1]):
            tf.profiler.experimental.stop()
            self._profiling = False
            log.info(f"profiler trace of steps {window[0]}-{window[1]} written to {self.run_dir.path / 'train'}")

    def _write_histograms(self, step: int, inputs, targets) -> None:
        """Histograms of the weights and of the (unclipped) gradient of the current batch."""
        variables = self.model.trainable_variables
        states = self.model.initial_state(int(inputs.shape[0]))
        with tf.GradientTape() as tape:
            logits, _ = self.model(inputs, states, training=False)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(targets, tf.int32), logits))
        grads = tape.gradient(loss, variables)
        self.metrics.histograms(step, {v.path: v.value for v in variables},
                                {v.path: tf.convert_to_tensor(g) for v, g in zip(variables, grads) if g is not None})

    def _report_skips(self, skips: SkippedSteps) -> None:
        """Logs the steps skipped since the last report: a warning in float32, where a skip is never routine."""
        line = skips.report()
        if line is None:
            return
        if self.loss_scale is not None:
            log.info(f"{line} (float16 loss scale now {float(self.loss_scale.scale.read_value()):g})")
        else:
            log.warning(f"warning: {line}")

    def _mean_loss(self, pending: list, step: int) -> float:
        """Mean token loss of the pending steps; raises if it is not finite in float32."""
        if not pending:
            return float("nan")
        t = self.config.train
        loss = float(tf.add_n(pending)) / (len(pending) * t.batch_size * t.num_steps)
        self._check_finite(loss, step)
        return loss

    def _check_finite(self, loss: float, step: int) -> None:
        if math.isfinite(loss) or self.config.train.precision == "mixed_float16":
            return
        raise NonFiniteLossError(
            f"training loss became {loss} at step {step}; the last good checkpoint is "
            f"{self.checkpointer.latest or 'none'} (lower optimizer.learning_rate or set optimizer.clip_norm)")

    def _set_state(self, step: int, epoch: int, index: int, states) -> None:
        """Puts the position and the carried state (gathered: a collective, every worker calls it) in ``self.state``."""
        self.state.step.assign(step)
        self.state.epoch.assign(epoch)
        self.state.batch_in_epoch.assign(index)
        for var, value in zip(self.state.carried, self.backend.gather(states)):
            var.assign(value)

    def save(self, step: int, epoch: int, index: int, states) -> str | None:
        """Saves a checkpoint of the current position and carried state (chief writes)."""
        self._set_state(step, epoch, index, states)
        if not self.backend.is_chief:
            return None
        path = self.checkpointer.save(step)
        log.info(f"saved checkpoint {path}")
        return path

    # ------------------------------------------------------------- evaluation

    def _evaluate_and_log(self, step: int, epoch: int, index: int, states) -> EvalResult | None:
        if "valid" not in self.eval_batches:
            return None
        result = self.evaluate("valid")
        self.metrics.evaluation(step, "valid", {"loss": result.loss, "tokens": result.tokens})
        self.save_best(step, epoch, index, states, result)
        if self.config.train.sample_length and self.backend.is_chief:
            text = self.sample(self.config.train.sample_prime, self.config.train.sample_length, seed=0)
            self.metrics.text("valid", "sample", text, step)
        return result

    def save_best(self, step: int, epoch: int, index: int, states, result: EvalResult) -> str | None:
        """Saves ``RUN_DIR/best`` if ``result`` beats the best validation loss so far (chief writes).

        The best checkpoint is whole: the weights, optimizer, step, epoch,
        position and carried state of the moment ``result`` was evaluated.

        Returns:
            The saved path prefix, or None.
        """
        self._set_state(step, epoch, index, states)
        best = self.checkpointer.best_record()
        better = math.isfinite(result.loss) and (best is None or result.loss < best["loss"])
        if not (self.backend.is_chief and better):
            return None
        path = self.checkpointer.save_best(step, {"loss": result.loss, "perplexity": perplexity(result.loss)})
        log.info(f"new best validation perplexity {perplexity(result.loss):.3f}: {path}")
        return path

    def evaluate(self, split: str) -> EvalResult:
        """Evaluates a whole split with the state carried across batches.

        Every token but the first is scored exactly once (see
        :class:`~dist_rnn.data.batching.EvalBatcher`); ``tokens`` counts them.

        Raises:
            UserError: If the split is empty.
        """
        if split not in self.eval_batches:
            raise UserError(f"the {split} split of this corpus is empty")
        batches = self.eval_batches[split]
        states = self._zero_states(self.eval_batch_size)
        total = tf.constant(0.0, tf.float64)
        for inputs, targets, weights in batches.dataset():
            loss_sum, states = self.steps.eval_step(*self.backend.shard((inputs, targets, weights)), states)
            total += tf.cast(loss_sum, tf.float64)
        tokens = batches.tokens
        return EvalResult(split, float(total) / tokens, tokens, self.corpus.vocab.level)

    def sample(self, prime: str, length: int, seed: int = 0, temperature: float = 0.8) -> str:
        """Generates a text sample from the current weights."""
        if self._sampler is None:
            self._sampler = Sampler(model_step_fn(self.model), self.corpus.vocab)
        ids = self._sampler.generate(prime, length, temperature=temperature, seed=seed)[0]
        return self.corpus.vocab.decode(ids)
