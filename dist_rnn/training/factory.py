"""The one place a run's parts are built from its config and handed to a :class:`Trainer`.

The command line, the benchmark and the tests all build a trainer here:
backend and corpus (unless given), batchers, kernel choice, model,
optimizer, loss scale, compiled steps, training state and checkpointer.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from dist_rnn.config import Config
from dist_rnn.data.batching import EvalBatcher, StreamBatcher, owned_rows
from dist_rnn.data.encoding import EncodedCorpus
from dist_rnn.data.prepared import PreparedCorpus, load_corpus
from dist_rnn.data.variable_length import VariableLengthBatcher
from dist_rnn.distribution import Backend, create_backend
from dist_rnn.models.model import build_model, check_cudnn_requirement, cudnn_excluded_by, kernel_report
from dist_rnn.run_dir import RunDirectory
from dist_rnn.summaries import MetricsLogger
from dist_rnn.training.checkpoints import Checkpointer, StreamPosition, TrainingState, run_fingerprint
from dist_rnn.training.gradients import DynamicLossScale
from dist_rnn.training.optimizers import build_optimizer
from dist_rnn.training.recipe import build_recipe
from dist_rnn.training.regularization import ActivationPenalties
from dist_rnn.training.steps import StepFunctions
from dist_rnn.training.trainer import Trainer


def build_trainer(config: Config, run_dir: RunDirectory | str | Path, *, backend: Backend | None = None,
                  corpus: PreparedCorpus | EncodedCorpus | None = None,
                  metrics: MetricsLogger | None = None) -> Trainer:
    """Builds every part of a run and the :class:`Trainer` that receives them.

    Nothing is written to the run directory and no checkpoint is restored
    (call :meth:`Trainer.restore`).

    Args:
        config: The validated run config.
        run_dir: The run directory (or its path).
        backend: The distribution backend; None creates ``distribute``'s
            (before TensorFlow initializes, for logical CPU devices).
        corpus: The corpus; None loads ``data`` as ``dist-rnn train`` does (:func:`dist_rnn.data.load_corpus`:
            prepared token files, prepared first if needed).
        metrics: Where :meth:`Trainer.train` writes log points; None for a
            trainer that only evaluates or samples.

    Returns:
        A trainer at step 0 with freshly initialized weights.

    Raises:
        UserError: If a split is too small for one batch, or ``model.cudnn``
            is ``require`` and a layer cannot use the fused kernel.
    """
    rd = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)
    backend = backend if backend is not None else create_backend(config.distribute)
    corpus = corpus if corpus is not None else load_corpus(config.data)
    t = config.train
    # Each process reads only the rows of its own replicas from the (memory-mapped) splits.
    replicas = (backend.num_replicas, backend.local_replica_ids())
    batcher = VariableLengthBatcher if t.variable_length else StreamBatcher
    train_batches = batcher(corpus.train, t.batch_size, t.num_steps, "train", t.seed,
                                  config.data.random_offset, owned_rows(t.batch_size, *replicas))
    eval_batch_size = t.eval_batch_size or t.batch_size
    eval_batches = {split: EvalBatcher(corpus.split(split), eval_batch_size, t.num_steps, split,
                                       owned_rows(eval_batch_size, *replicas))
                    for split in ("valid", "test") if len(corpus.split(split))}
    # The policy in force, not train.precision: ``dist-rnn eval`` builds a float32 model.
    precision = keras.mixed_precision.global_policy().name
    kernels = kernel_report(config.model, bool(tf.config.list_logical_devices("GPU")),
                            jit_compile=t.jit_compile, precision=precision)
    check_cudnn_requirement(config.model, kernels)
    with backend.scope():
        model = build_model(config.model, corpus.tokenizer.size, t.seed,
                            allow_cudnn=not cudnn_excluded_by(t.jit_compile, precision))
        optimizer = build_optimizer(config.optimizer)
        optimizer.build(model.trainable_variables)
        loss_scale = DynamicLossScale(t.loss_scale) if t.precision == "mixed_float16" else None
    recipe = build_recipe(config, model.trainable_variables, backend.scope)
    state = TrainingState([(t.batch_size, size) for size in model.state_sizes],
                          run_fingerprint(config, corpus.tokenizer.identity))
    # adamw decays by itself (decoupled); every other optimizer gets AWD's L2 in the gradient path.
    l2_decay = config.optimizer.weight_decay if config.optimizer.name != "adamw" else 0.0
    steps = StepFunctions(model, optimizer, backend, t.batch_size, t.num_steps, config.optimizer.clip_norm,
                          loss_scale, t.jit_compile, t.loss_normalization,
                          penalties=ActivationPenalties(t.ar, t.tar), weight_decay=l2_decay,
                          accumulate_steps=t.accumulate_steps, weight_average=recipe.average)
    objects = dict(model=model, optimizer=optimizer, training_state=state, **recipe.checkpoint_objects())
    if loss_scale is not None:
        objects["loss_scale"] = loss_scale
    stream_position = StreamPosition() if t.variable_length else None
    if stream_position is not None:
        objects["stream_position"] = stream_position
    checkpointer = Checkpointer(rd.checkpoints, config.checkpoint.keep, rd.best, **objects)
    return Trainer(config, rd, backend, corpus, model=model, optimizer=optimizer, loss_scale=loss_scale,
                   steps=steps, state=state, checkpointer=checkpointer, train_batches=train_batches,
                   eval_batches=eval_batches, kernels=kernels, metrics=metrics, recipe=recipe,
                   stream_position=stream_position)
