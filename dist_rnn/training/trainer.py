"""The training loop: stateful truncated BPTT on any backend.

One trainer for every backend: the replica logic sits behind
:class:`~dist_rnn.distribution.Backend`, the gradient order in
:mod:`dist_rnn.training.steps`. The recurrent state is carried per replica from batch to
batch within an epoch and reset at each epoch start; evaluation
(:mod:`dist_rnn.training.evaluation`) does the same. The trainer receives its
parts ready-built from :func:`dist_rnn.training.factory.build_trainer`.
"""

from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np
import tensorflow as tf

from dist_rnn.config import Config
from dist_rnn.data.batching import EvalBatcher, StreamBatcher
from dist_rnn.data.encoding import EncodedCorpus
from dist_rnn.data.prepared import PreparedCorpus
from dist_rnn.data.variable_length import max_window_length
from dist_rnn.distribution import Backend
from dist_rnn.errors import UserError
from dist_rnn.generation import Sampler, model_step_fn
from dist_rnn.models.model import LayerKernel
from dist_rnn.models.outputs import output_summary
from dist_rnn.models.outputs.histograms import histogram_loss
from dist_rnn.run_dir import RunDirectory
from dist_rnn.summaries import MetricsLogger, peak_memory, perplexity
from dist_rnn.training.checkpoints import Checkpointer, StreamPosition, TrainingState, accepted_fingerprints
from dist_rnn.training.evaluation import EvalResult, evaluate_split
from dist_rnn.training.gradients import DynamicLossScale
from dist_rnn.training.preemption import StopRequest
from dist_rnn.training.progress import LogWindow, Position, SkippedSteps, due
from dist_rnn.training.recipe import TrainingRecipe
from dist_rnn.training.steps import StepFunctions

log = logging.getLogger("dist_rnn")


class NonFiniteLossError(UserError):
    """Training produced a non-finite float32 loss, or too many skipped steps in a row (exit code 1)."""

    exit_code = 1


class Trainer:
    """Trains, evaluates and samples one run from ready parts.

    :func:`~dist_rnn.training.factory.build_trainer` builds the parts from a
    config; the trainer only receives them.

    Args:
        config: The validated run config (cadences, limits, sampling).
        run_dir: The run directory.
        backend: The distribution backend (replica count known).
        corpus: The encoded corpus.
        model: The language model, built in ``backend.scope()``.
        optimizer: The built optimizer.
        loss_scale: The float16 loss scale, or None.
        steps: The compiled training and evaluation steps.
        state: Position and carried state, saved in every checkpoint.
        checkpointer: Rolling and best checkpoints.
        train_batches: The training windows.
        eval_batches: The evaluation windows by split (non-empty splits only).
        kernels: Which recurrent kernel each layer runs.
        metrics: Where log points go; :meth:`train` needs it, :meth:`evaluate` does not.
        recipe: Early stopping, plateau decay and averaged weights (none by default).
        stream_position: The tokens per row consumed in the epoch, saved in
            checkpoints (``train.variable_length`` only, else None).
    """

    def __init__(self, config: Config, run_dir: RunDirectory, backend: Backend,
                 corpus: PreparedCorpus | EncodedCorpus, *,
                 model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_scale: DynamicLossScale | None,
                 steps: StepFunctions, state: TrainingState, checkpointer: Checkpointer,
                 train_batches: StreamBatcher, eval_batches: dict[str, EvalBatcher], kernels: list[LayerKernel],
                 metrics: MetricsLogger | None = None, recipe: TrainingRecipe | None = None,
                 stream_position: StreamPosition | None = None):
        self.config = config
        self.run_dir = run_dir
        self.backend = backend
        self.corpus = corpus
        self.model = model
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.steps = steps
        self.state = state
        self.checkpointer = checkpointer
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.kernels = kernels
        self.metrics = metrics
        self.recipe = recipe or TrainingRecipe()
        self.stream_position = stream_position
        self.stopped_by: str | None = None
        self._sampler: Sampler | None = None  # built once: its tf.functions trace on the first sample only
        self._profiling = False
        self._last_valid: tuple[int, EvalResult] | None = None  # (step, result) of the latest validation

    # ------------------------------------------------------------------ setup

    def restore(self) -> str | None:
        """Restores the newest checkpoint, if any; returns its path."""
        path = self.checkpointer.restore_latest(self.config.checkpoint.fallback,
                                                accepted_fingerprints(self.config, self.corpus.tokenizer.identity), self.state)
        self.backend.after_variables_ready(self.model.variables + self.optimizer.variables)
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
            f"{c.model.embedding_size}, vocab {self.corpus.tokenizer.size} ({c.data.level}), "
            f"{self.parameter_count:,} parameters"
            + (f", LSTM projection {c.model.projection_size}" if c.model.projection_size else ""),
            f"output          {output_summary(c.model, self.model.projection)}",
            f"data            {c.data.corpus}: train {len(self.corpus.train):,} / valid {len(self.corpus.valid):,} / "
            f"test {len(self.corpus.test):,} tokens; {self.train_batches.windows_in_epoch(1, 0, 0, 0)} steps per epoch"
            + (" (epoch 1; variable-length BPTT)" if t.variable_length else ""),
            f"optimizer       {c.optimizer.name} lr {c.optimizer.learning_rate:g} ({c.optimizer.schedule.name}), "
            f"clip {c.optimizer.clip_norm:g}"
            + (f", row-sparse updates of gathered rows ({self.steps.sparse_rule}: exact)"
               if self.steps.sparse_rule else ""),
        ]
        return lines + [k.line() for k in self.kernels]

    # --------------------------------------------------------------- training

    def _zero_states(self, batch_size: int):
        return self.backend.shard(self.model.initial_state(batch_size))

    def _total_steps(self, pos: Position) -> int | None:
        t = self.config.train
        by_epochs = None
        if t.max_epochs is not None:
            by_epochs = self.train_batches.steps_through_epoch(t.max_epochs, pos.epoch, pos.step, pos.index, pos.token)
        if t.max_steps is None:
            return by_epochs
        return t.max_steps if by_epochs is None else min(t.max_steps, by_epochs)

    def train(self) -> dict:
        """Trains until ``max_steps`` or ``max_epochs``, then evaluates, saves and samples.

        Returns:
            ``{"step", "epoch", "valid", "test"}`` with the final results (or
            None), or ``{"step", "epoch", "valid": None, "stopped_by"}`` after
            a stop request.

        Raises:
            ValueError: If the trainer was built without a metrics logger.
            NonFiniteLossError: If the float32 loss becomes NaN or infinite, or
                ``train.max_consecutive_skips`` steps in a row are skipped for
                a non-finite gradient (any precision).
        """
        if self.metrics is None:
            raise ValueError("Trainer.train needs a MetricsLogger: pass metrics to build_trainer")
        t = self.config.train
        pos = Position(int(self.state.step), int(self.state.epoch), int(self.state.batch_in_epoch))
        pos.token = (int(self.stream_position.tokens_in_epoch.numpy()) if self.stream_position is not None
                     else pos.index * t.num_steps)
        total = self._total_steps(pos)
        if pos.index > 0:
            states = self.backend.shard(tuple(v.read_value() for v in self.state.carried))
        else:
            states = self._zero_states(t.batch_size)
        window = LogWindow(pos.step)
        skips = SkippedSteps(t.max_consecutive_skips)
        self._last_save_time = time.monotonic()
        with StopRequest() as stop:
            if total is None or pos.step < total:
                states = self._train_epochs(pos, total, states, window, skips, stop)
            if pos.index >= self.train_batches.windows_in_epoch(pos.epoch, pos.step, pos.index, pos.token):
                pos.next_epoch()
            self._report_skips(skips)
            self._mean_loss(window, pos.step)
            path = self.save(pos, states)
        self._profile(None, before=False)
        if self.stopped_by:
            log.info(f"stopped by {self.stopped_by} after step {pos.step}; "
                     f"checkpoint {path or '(written by the chief)'}")
            return {"step": pos.step, "epoch": pos.epoch, "valid": None, "stopped_by": self.stopped_by}
        return self._final_evaluation(pos, states)

    def _train_epochs(self, pos: Position, total: int | None, states, window: LogWindow, skips: SkippedSteps,
                      stop: StopRequest):
        """Trains epoch after epoch until the last step, the last epoch or a stop; returns the carried state."""
        t = self.config.train
        while t.max_epochs is None or pos.epoch <= t.max_epochs:
            if pos.index == 0:
                states = self._zero_states(t.batch_size)
            states, finished = self._train_epoch(pos, total, states, window, skips, stop)
            if finished:
                break
            pos.next_epoch()
        return states

    def _train_epoch(self, pos: Position, total: int | None, states, window: LogWindow, skips: SkippedSteps,
                     stop: StopRequest):
        """Trains the rest of epoch ``pos.epoch``; returns the carried state and whether training is over."""
        c, t = self.config, self.config.train
        n_batches = self.train_batches.windows_in_epoch(pos.epoch, pos.step, pos.index, pos.token)
        for inputs, targets in self.train_batches.dataset(pos.epoch, pos.index, pos.step, pos.token):
            states, lr, grad_norm = self._train_batch(pos, total, inputs, targets, states, window, skips)
            last = total is not None and pos.step >= total
            log_point = due(t.log_every, pos.step) or last or pos.index == n_batches
            if log_point:
                self._log_point(pos, lr, grad_norm, window, skips)
            # Agreeing on a stop is a collective plus a host read on multi-process backends:
            # every worker checks at the same steps, the log points.
            check_stop = self.backend.num_workers == 1 or log_point
            if check_stop and self.backend.any_worker(stop.requested is not None):
                self.stopped_by = stop.requested or "a signal on another worker"
                return states, True
            if due(t.eval_every, pos.step) and not last:
                self._evaluate_and_log(pos, states)
                window.restart_clock()
                last = self.recipe.stop_due()  # early stopping ends the run here as at its last step
            due_by_time = check_stop and not last and self._time_to_save()
            if (due_by_time or due(c.checkpoint.every_steps, pos.step)) and not last:
                self._mean_loss(window, pos.step)
                self.save(pos, states)
                window.restart_clock()
            if last:
                return states, True
        return states, False

    def _train_batch(self, pos: Position, total: int | None, inputs, targets, states, window: LogWindow,
                     skips: SkippedSteps):
        """One optimizer step on one batch; advances ``pos``. Returns the new state, learning rate and gradient norm."""
        c, t = self.config, self.config.train
        lr = self.recipe.learning_rate(c.optimizer, pos.step, pos.epoch, total, self.backend.num_replicas)
        length, step_length = int(inputs.shape[1]), None
        x, y = inputs, targets
        if t.variable_length:
            # AWD-LSTM: the update in proportion to the window's tokens. One padded
            # width for every length: the step traces once.
            lr = lr * length / t.num_steps
            padding = [[0, 0], [0, max_window_length(t.num_steps) - length]]
            x, y, step_length = tf.pad(x, padding), tf.pad(y, padding), tf.constant(length, tf.int32)
        self.optimizer.learning_rate.assign(lr)
        x, y = self.backend.shard((x, y))
        seed = tf.constant([t.seed, pos.step], tf.int64)
        self._profile(pos.step + 1, before=True)
        loss_sum, states, grad_norm, finite = self.steps.train_step(x, y, states, seed, step_length)
        pos.step, pos.index, pos.token = pos.step + 1, pos.index + 1, pos.token + length
        if skips.record(pos.step, bool(finite)):
            self._report_skips(skips)
            raise NonFiniteLossError(
                f"{len(skips.consecutive)} steps in a row (steps {skips.consecutive[0]}-{pos.step}) were "
                f"skipped because the all-reduced gradient was not finite "
                f"(train.max_consecutive_skips: {t.max_consecutive_skips}); the last good checkpoint is "
                f"{self.checkpointer.latest or 'none'} (lower optimizer.learning_rate or set "
                f"optimizer.clip_norm)")
        self._profile(pos.step, before=False)
        if due(c.logging.histograms_every, pos.step) and self.backend.is_chief:
            self._write_histograms(pos.step, inputs, targets)
        window.losses.append(loss_sum)
        window.tokens += t.batch_size * length
        self.metrics.progress(pos.step, total or 0, f"epoch {pos.epoch}")
        return states, lr, grad_norm

    def _log_point(self, pos: Position, lr: float, grad_norm, window: LogWindow, skips: SkippedSteps) -> None:
        """Reports the skipped steps and records one training log point over ``window``, then restarts it."""
        c = self.config
        self._report_skips(skips)
        loss = self._mean_loss(window, pos.step)
        now = time.perf_counter()
        rate = window.tokens / max(now - window.start_time, 1e-9)
        norm = float(grad_norm)
        values = {"epoch": pos.epoch, "loss": loss, "learning_rate": lr, "grad_norm": norm,
                  "clip_ratio": min(1.0, c.optimizer.clip_norm / norm) if c.optimizer.clip_norm and norm > 0 else 1.0,
                  "tokens_per_sec": rate, "tokens_per_sec_per_replica": rate / self.backend.num_replicas,
                  "step_time": (now - window.start_time) / max(pos.step - window.start_step, 1)}
        if self.loss_scale is not None:
            values["loss_scale"] = float(self.loss_scale.scale.read_value())
            values["skipped_steps"] = int(self.loss_scale.skipped_steps.read_value())
        elif skips.total:
            values["skipped_steps"] = skips.total
        values.update({name: float(value) for name, value in self.steps.last_penalties.items()})  # AR/TAR
        values.update(peak_memory())
        self.metrics.train(pos.step, values)
        window.restart(pos.step)

    def _final_evaluation(self, pos: Position, states) -> dict:
        """Evaluates valid (saving the best checkpoint and a sample) and test after the last step.

        A validation result of this very step (early stopping ends the run right
        after an evaluation) is reused, not recomputed.
        """
        if self._last_valid is not None and self._last_valid[0] == pos.step:
            valid = self._last_valid[1]
        else:
            valid = self._evaluate_and_log(pos, states)
            if self.recipe.history is not None:  # the latest checkpoint holds this evaluation too, for a resume
                self.save(pos, states)
        test = None
        if "test" in self.eval_batches:
            test = self.evaluate("test")
            self.metrics.evaluation(pos.step, "test", test.metrics())
        return {"step": pos.step, "epoch": pos.epoch, "valid": valid.as_dict() if valid else None,
                "test": test.as_dict() if test else None}

    def _profile(self, step: int | None, before: bool) -> None:
        """Starts the profiler before the first and stops it after the last of ``logging.profile_steps``."""
        window = self.config.logging.profile_steps
        if not window or not self.backend.is_chief:
            return
        trace_dir = self.run_dir.events("train")
        if before and step == window[0]:
            tf.profiler.experimental.start(str(trace_dir))
            self._profiling = True
        elif self._profiling and (step is None or step == window[1]):
            tf.profiler.experimental.stop()
            self._profiling = False
            log.info(f"profiler trace of steps {window[0]}-{window[1]} written to {trace_dir}")

    def _write_histograms(self, step: int, inputs, targets) -> None:
        """Histograms of the weights and of the (unclipped) gradient of the current batch (:func:`histogram_loss`)."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = histogram_loss(self.model, inputs, targets, tf.constant([self.config.train.seed, step], tf.int64))
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

    def _mean_loss(self, window: LogWindow, step: int) -> float:
        """Mean token loss of the window's pending steps; raises if it is not finite in float32."""
        if not window.losses:
            return float("nan")
        loss = float(tf.add_n(window.losses)) / window.tokens
        self._check_finite(loss, step)
        return loss

    def _check_finite(self, loss: float, step: int) -> None:
        if math.isfinite(loss) or self.config.train.precision == "mixed_float16":
            return
        raise NonFiniteLossError(
            f"training loss became {loss} at step {step}; the last good checkpoint is "
            f"{self.checkpointer.latest or 'none'} (lower optimizer.learning_rate or set optimizer.clip_norm)")

    def _set_state(self, pos: Position, states) -> None:
        """Puts the position and the carried state (gathered: a collective, every worker calls it) in ``self.state``."""
        self.state.step.assign(pos.step)
        self.state.epoch.assign(pos.epoch)
        self.state.batch_in_epoch.assign(pos.index)
        if self.stream_position is not None:
            self.stream_position.tokens_in_epoch.assign(pos.token)
        for var, value in zip(self.state.carried, self.backend.gather(states)):
            var.assign(value)

    def _time_to_save(self) -> bool:
        """Whether ``checkpoint.every_seconds`` passed since the last save, by the chief's clock.

        A collective on several workers (the chief's answer is shared like a
        stop request): call it at the stop-check steps, which all workers share.
        """
        every = self.config.checkpoint.every_seconds
        if not every:
            return False
        return self.backend.any_worker(self.backend.is_chief and time.monotonic() - self._last_save_time >= every)

    def save(self, pos: Position, states) -> str | None:
        """Saves a checkpoint of the current position and carried state (chief writes)."""
        self._set_state(pos, states)
        self._last_save_time = time.monotonic()
        if not self.backend.is_chief:
            return None
        path = self.checkpointer.save(pos.step)
        log.info(f"saved checkpoint {path}")
        return path

    # ------------------------------------------------------------- evaluation

    def _evaluate_and_log(self, pos: Position, states) -> EvalResult | None:
        if "valid" not in self.eval_batches:
            return None
        result = self.evaluate("valid")
        self._last_valid = (pos.step, result)
        self.metrics.evaluation(pos.step, "valid", result.metrics())
        self.recipe.after_evaluation(pos.step, result.loss)
        self.save_best(pos, states, result)
        if self.config.train.sample_length and self.backend.is_chief:
            text = self.sample(self.config.train.sample_prime, self.config.train.sample_length, seed=0)
            self.metrics.text("valid", "sample", text, pos.step)
        return result

    def save_best(self, pos: Position, states, result: EvalResult) -> str | None:
        """Saves ``RUN_DIR/best`` if ``result`` beats the best validation loss so far (chief writes).

        The best checkpoint is whole: the weights, optimizer, step, epoch,
        position and carried state of the moment ``result`` was evaluated.

        Returns:
            The saved path prefix, or None.
        """
        self._set_state(pos, states)
        best = self.checkpointer.best_record()
        better = math.isfinite(result.loss) and (best is None or result.loss < best["loss"])
        if not (self.backend.is_chief and better):
            return None
        path = self.recipe.with_average(self.checkpointer.save_best, pos.step,
                                        {"loss": result.loss, "perplexity": perplexity(result.loss)})
        log.info(f"new best validation perplexity {perplexity(result.loss):.3f}: {path}")
        return path

    def evaluate(self, split: str) -> EvalResult:
        """Evaluates a whole split with the state carried across batches (see :func:`evaluate_split`).

        Raises:
            UserError: If the split is empty.
        """
        if split not in self.eval_batches:
            raise UserError(f"the {split} split of this corpus is empty")
        batches = self.eval_batches[split]
        return self.recipe.with_average(evaluate_split, split, batches, self.steps, self.backend,
                                        self._zero_states(batches.batch_size), self.corpus.tokenizer.kind,
                                        self.corpus.bits_per_byte)

    def sample(self, prime: str, length: int, seed: int = 0, temperature: float = 0.8) -> str:
        """Generates a text sample from the current weights."""
        if self._sampler is None:
            self._sampler = Sampler(model_step_fn(self.model), self.corpus.tokenizer)
        ids = self.recipe.with_average(self._sampler.generate, prime, length, temperature=temperature, seed=seed)[0]
        return self.corpus.tokenizer.decode(ids)
