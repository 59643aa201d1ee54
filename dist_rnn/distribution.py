"""Distribution backends behind one small interface.

The trainer sees a :class:`Backend`: it creates variables in ``scope()``,
places the global batch on replicas with ``distribute_rows`` (replica ``r``
always owns rows ``r*b .. r*b+b-1``), runs a per-replica function with
``run``, all-reduces gradients with ``all_reduce_sum`` and applies updates
once, in cross-replica context, with ``apply_once``. Everything else
(gradient order, state carrying, logging) is backend-independent.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from dist_rnn.config import DistributeConfig
from dist_rnn.errors import UserError


class Backend:
    """One device: the default strategy. Base class of the others.

    Attributes:
        num_replicas: Replicas in the whole job.
        num_workers: Processes in the whole job.
        worker_index: This process' index (0 is the chief).
    """

    name = "none"

    def __init__(self):
        self.strategy = tf.distribute.get_strategy()
        self.num_replicas = 1
        self.num_workers = 1
        self.worker_index = 0

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run directory."""
        return self.worker_index == 0

    @property
    def devices(self) -> list[str]:
        """Devices of this process' replicas."""
        gpus = tf.config.list_logical_devices("GPU")
        return [gpus[0].name] if gpus else ["/device:CPU:0"]

    def scope(self):
        """Context in which model and optimizer variables are created."""
        return self.strategy.scope()

    def local_replica_ids(self) -> list[int]:
        """Global replica ids hosted by this process, in order."""
        return [0]

    def shard(self, value: Any) -> Any:
        """Places rows of global-batch tensors on the replicas.

        Args:
            value: A nested structure of tensors whose first axis is the global
                batch.

        Returns:
            A per-replica value for :meth:`run`: replica ``r`` gets rows
            ``r*b .. r*b+b-1`` of every tensor (the whole value on one replica).
        """
        return value

    def gather(self, value: Any) -> Any:
        """Inverse of :meth:`shard`: concatenates per-replica rows in replica order."""
        return value

    def run(self, fn: Callable, args: tuple) -> Any:
        """Runs ``fn(*args)`` on every local replica."""
        return fn(*args)

    def replica_id(self) -> tf.Tensor:
        """The global id of the replica running the current function."""
        return tf.constant(0, tf.int32)

    def all_reduce_sum(self, values: list[tf.Tensor]) -> list[tf.Tensor]:
        """Sums tensors over all replicas (called in replica context)."""
        return values

    def apply_if_finite(self, apply_fn: Callable, grads: list, finite: tf.Tensor, finalize_fn: Callable) -> None:
        """Applies the reduced gradients on every replica, or on none.

        Called in replica context with ``grads`` and ``finite`` identical on
        every replica. ``apply_fn(grads)`` runs per replica only if ``finite``;
        ``finalize_fn(finite)`` (loss-scale bookkeeping) runs once.
        """
        tf.cond(finite, lambda: _call_true(apply_fn, grads), lambda: tf.constant(False))
        finalize_fn(finite)

    def local_results(self, value: Any) -> list:
        """Per-replica results of :meth:`run` hosted by this process, in replica order."""
        return [value]

    def reduce_sum(self, value: Any) -> tf.Tensor:
        """Sums a per-replica scalar over all replicas (cross-replica context)."""
        return value

    def first(self, value: Any) -> Any:
        """Any one replica's copy of a value identical on all replicas."""
        return self.local_results(value)[0]

    def after_optimizer_built(self, variables: list) -> None:
        """Hook to synchronize freshly initialized or restored variables."""

    def barrier(self) -> None:
        """Waits for all workers."""


class MirroredBackend(Backend):
    """tf.distribute.MirroredStrategy over the GPUs of this host, or logical CPU devices.

    Args:
        cpu_devices: Number of logical CPU devices (must have been created
            before TensorFlow initialized); 0 uses the visible GPUs.
    """

    name = "mirrored"

    def __init__(self, cpu_devices: int = 0):
        super().__init__()
        if cpu_devices:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_devices]
            if len(devices) < cpu_devices:
                raise UserError(f"distribute.cpu_devices: {cpu_devices} requested but TensorFlow has "
                                f"{len(devices)} logical CPU devices (it was initialized before they could be created)")
            cross = tf.distribute.ReductionToOneDevice(reduce_to_device=devices[0])
            self.strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross)
        else:
            gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
            if not gpus:
                raise UserError("distribute.backend 'mirrored' found no GPU; set distribute.cpu_devices "
                                "to train on logical CPU devices")
            self.strategy = tf.distribute.MirroredStrategy(gpus)
        self.num_replicas = self.strategy.num_replicas_in_sync

    @property
    def devices(self) -> list[str]:
        return list(self.strategy.extended.worker_devices)

    def local_replica_ids(self) -> list[int]:
        return list(range(self.num_replicas))

    def shard(self, value):
        def value_fn(ctx: tf.distribute.DistributedContext):
            return tf.nest.map_structure(lambda t: _rows(t, ctx.replica_id_in_sync_group, self.num_replicas), value)

        return self.strategy.experimental_distribute_values_from_function(value_fn)

    def gather(self, value):
        return tf.nest.map_structure(lambda v: tf.concat(self.strategy.experimental_local_results(v), 0), value)

    def run(self, fn, args):
        return self.strategy.run(fn, args=args)

    def replica_id(self):
        return tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)

    def all_reduce_sum(self, values):
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)

    def apply_if_finite(self, apply_fn, grads, finite, finalize_fn):
        def merge_fn(strategy, grads, finite):
            # The flag is identical on every replica: take the first copy. The
            # cond must be built in cross-replica context (a replica-context
            # cond cannot contain the optimizer's merge_call); each replica
            # then updates its variable copy from its own reduced gradient.
            finite = strategy.experimental_local_results(finite)[0]

            def apply():
                strategy.extended.call_for_each_replica(apply_fn, args=(grads,))
                return tf.constant(True)

            tf.cond(finite, apply, lambda: tf.constant(False))
            finalize_fn(finite)

        tf.distribute.get_replica_context().merge_call(merge_fn, args=(grads, finite))

    def local_results(self, value):
        return list(self.strategy.experimental_local_results(value))

    def reduce_sum(self, value):
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


def _call_true(fn: Callable, *args) -> tf.Tensor:
    fn(*args)
    return tf.constant(True)


def _rows(tensor, replica: int, num_replicas: int):
    """Rows ``replica*b .. replica*b+b-1`` of a global-batch tensor, ``b = batch / num_replicas``."""
    per = tensor.shape[0] // num_replicas
    return tensor[replica * per:(replica + 1) * per]


def configure_devices(config: DistributeConfig) -> None:
    """Creates logical CPU devices before TensorFlow initializes (mirrored on CPU).

    Raises:
        UserError: If TensorFlow is already initialized with fewer devices.
    """
    if config.backend == "mirrored" and config.cpu_devices:
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(config.cpu_devices)])
        except RuntimeError:
            have = len(tf.config.list_logical_devices("CPU"))
            if have < config.cpu_devices:
                raise UserError(f"distribute.cpu_devices: TensorFlow is already initialized with {have} "
                                f"CPU devices; start a fresh process") from None


def create_backend(config: DistributeConfig) -> Backend:
    """Creates the configured backend.

    Args:
        config: The ``distribute`` section.

    Returns:
        The backend, with its replica count known.

    Raises:
        UserError: If the backend cannot start (no GPU, missing Horovod,
            missing or malformed TF_CONFIG).
    """
    if config.backend == "none":
        return Backend()
    if config.backend == "mirrored":
        configure_devices(config)
        return MirroredBackend(config.cpu_devices)
    raise UserError(f"distribute.backend '{config.backend}' is not available in this build")
