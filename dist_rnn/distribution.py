"""Distribution backends behind one small interface.

The trainer sees a :class:`Backend`: it creates variables in ``scope()``,
places the global batch on replicas with ``shard`` (replica ``r`` always owns
rows ``r*b .. r*b+b-1``) and collects per-replica rows back with ``gather``,
runs a per-replica function with ``run``, all-reduces gradients with
``all_reduce_sum`` and applies the update on every replica or on none (when
the reduced gradients are not finite) with ``apply_if_finite``.
Everything else (gradient order, state carrying, logging) is
backend-independent and lives in :mod:`dist_rnn.training`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import tensorflow as tf

from dist_rnn.config import DistributeConfig
from dist_rnn.errors import UserError, first_line

log = logging.getLogger("dist_rnn")


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
        """Global replica ids hosted by this process, in order (the rows it reads)."""
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

    def after_variables_ready(self, variables: list) -> None:
        """Called once the variables are final (freshly initialized or restored): e.g. broadcasts them from rank 0."""

    def any_worker(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any worker (a collective on multi-process backends).

        Every worker must call it at the same steps; the trainer does so every
        ``train.log_every`` steps when there are several workers.
        """
        return flag

    def gather_text(self, text: str) -> list[str]:
        """Every worker's ``text``, in worker order (every worker calls it, the same number of times).

        For small facts the workers must agree on before training (e.g. the
        prepared data's identity); not a tensor collective.
        """
        return [text]


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
        return tf.nest.map_structure(lambda v: self.strategy.gather(v, axis=0), value)

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


class MultiWorkerBackend(MirroredBackend):
    """tf.distribute.MultiWorkerMirroredStrategy from ``TF_CONFIG`` (NCCL on GPUs, ring on CPUs).

    Every worker builds the same global batch and keeps the rows of its own
    replicas. A lost worker is detected by the coordination service's
    heartbeats, not by a timeout on each collective: TensorFlow starts two
    threads per collective that sleep for the whole timeout, so a per-collective
    timeout grows the thread count by thousands per minute of training. A
    worker that stops sending heartbeats for ``timeout_seconds`` makes the
    coordination service abort every pending collective on the others (a
    worker that exits aborts them sooner, through its closed connections).

    Args:
        timeout_seconds: Heartbeat timeout of the coordination service.

    Raises:
        UserError: If ``TF_CONFIG`` is missing or malformed.
    """

    name = "multiworker"

    def __init__(self, timeout_seconds: float):
        Backend.__init__(self)
        cluster, task = parse_tf_config(os.environ.get("TF_CONFIG"))
        _configure_heartbeats(cluster, timeout_seconds)
        gpus = tf.config.list_physical_devices("GPU")
        implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        self.num_replicas = self.strategy.num_replicas_in_sync
        workers = cluster.get("chief", []) + cluster.get("worker", [])
        self.num_workers = len(workers)
        self.worker_index = task["index"] + (len(cluster.get("chief", [])) if task["type"] == "worker" else 0)

    def any_worker(self, flag):
        if not hasattr(self, "_any_fn"):
            self._any_fn = tf.function(lambda x: self.strategy.reduce(
                tf.distribute.ReduceOp.SUM, self.strategy.run(lambda: tf.identity(x)), axis=None))
        return float(self._any_fn(tf.constant(1.0 if flag else 0.0))) > 0

    def gather_text(self, text):
        # Through the coordination service's key-value store: it runs before any collective, and a
        # worker that is still preparing its data is waited for (up to an hour).
        from tensorflow.python.eager import context

        self._gathers = getattr(self, "_gathers", 0) + 1
        key = f"dist_rnn/gather_text/{self._gathers}"
        context.context().set_config_key_value(f"{key}/{self.worker_index}", text)
        return [context.context().get_config_key_value(f"{key}/{i}", timeout_in_ms=3_600_000)
                for i in range(self.num_workers)]

    def local_replica_ids(self) -> list[int]:
        per_worker = self.num_replicas // self.num_workers
        return list(range(self.worker_index * per_worker, (self.worker_index + 1) * per_worker))


def _configure_heartbeats(cluster: dict, timeout_seconds: float) -> None:
    """Starts the coordination service with a heartbeat timeout (before the strategy exists).

    MultiWorkerMirroredStrategy would start it with TensorFlow's default
    timeout; configured first, ours is kept.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    if context.context().coordination_service is not None:
        return
    jobs = [job for job in ("chief", "worker") if cluster.get(job)]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{jobs[0]}/replica:0/task:0",
        heartbeat_timeout_in_ms=int(timeout_seconds * 1000),
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster[job]))
                          for job in jobs])


def parse_tf_config(text: str | None) -> tuple[dict, dict]:
    """Reads the cluster and this task from a ``TF_CONFIG`` JSON string.

    Raises:
        UserError: If it is missing, not JSON, or lacks cluster/task entries.
    """
    if not text:
        raise UserError("distribute.backend 'multiworker' needs the TF_CONFIG environment variable "
                        "(start workers with launch/multiworker.sh)")
    try:
        data = json.loads(text)
        cluster, task = data["cluster"], data["task"]
        if task["type"] not in cluster or not 0 <= int(task["index"]) < len(cluster[task["type"]]):
            raise KeyError("task")
        return cluster, {"type": task["type"], "index": int(task["index"])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"TF_CONFIG is not a valid cluster description ({e.__class__.__name__}: {e})") from None


class HorovodBackend(Backend):
    """One process per replica with the low-level ``horovod.tensorflow`` API.

    Gradients are summed with ``hvd.grouped_allreduce``; model and optimizer
    variables are broadcast from rank 0 after the optimizer is built (and
    after a restore). ``horovod.tensorflow.keras`` and
    ``DistributedGradientTape`` are not used: they do not work with Keras 3
    variables. Each process pins the GPU of its local rank; more ranks on a
    host than GPUs is refused, and a Horovod built without NCCL is warned
    about on GPUs.

    Raises:
        UserError: If Horovod is not installed with TensorFlow support, or a
            host runs more ranks than it has GPUs.
    """

    name = "horovod"

    def __init__(self):
        try:
            import horovod.tensorflow as hvd
        except ImportError:
            raise UserError("distribute.backend 'horovod' needs Horovod built for this TensorFlow: "
                            "run tools/install_horovod.sh") from None
        except tf.errors.NotFoundError as e:  # its op library does not load (e.g. libnccl.so.2 or libmpi gone)
            raise UserError(f"distribute.backend 'horovod': Horovod's TensorFlow ops do not load ({first_line(e)}); "
                            "rebuild it with tools/install_horovod.sh") from None
        self.hvd = hvd
        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            if hvd.local_size() > len(gpus):
                raise UserError(f"distribute.backend 'horovod': {hvd.local_size()} ranks on this host but only "
                                f"{len(gpus)} visible GPU(s); two ranks on one GPU fail in NCCL: start at most "
                                f"{len(gpus)} rank(s) per host (launch/horovod.sh -H host:{len(gpus)})")
            if not hvd.nccl_built():
                log.warning("warning: Horovod was built without NCCL: gradients are all-reduced through host "
                            "memory (slow on GPUs); rebuild it with tools/install_horovod.sh on a host with "
                            "CUDA and NCCL")
            gpu = gpus[hvd.local_rank()]
            tf.config.set_visible_devices(gpu, "GPU")
            tf.config.experimental.set_memory_growth(gpu, True)
        super().__init__()
        self.num_replicas = hvd.size()
        self.num_workers = hvd.size()
        self.worker_index = hvd.rank()

    def local_replica_ids(self) -> list[int]:
        return [self.worker_index]

    def shard(self, value):
        return tf.nest.map_structure(lambda t: _rows(t, self.worker_index, self.num_replicas), value)

    def gather(self, value):
        return tf.nest.map_structure(self.hvd.allgather, value)

    def replica_id(self):
        return tf.constant(self.worker_index, tf.int32)

    def all_reduce_sum(self, values):
        # Horovod 0.28.1's grouped_allreduce pairs tf.IndexedSlices with the wrong
        # list entries when dense tensors are in the list: row-sparse gradients'
        # rows (values and indices) are all-gathered here instead, in rank order.
        dense = [v for v in values if not isinstance(v, tf.IndexedSlices)]
        summed = iter(self.hvd.grouped_allreduce(dense, op=self.hvd.Sum) if dense else [])
        return [tf.IndexedSlices(self.hvd.allgather(v.values), self.hvd.allgather(v.indices), v.dense_shape)
                if isinstance(v, tf.IndexedSlices) else next(summed) for v in values]

    def reduce_sum(self, value):
        return self.hvd.allreduce(value, op=self.hvd.Sum)

    def after_variables_ready(self, variables):
        self.hvd.broadcast_variables([getattr(v, "value", v) for v in variables], root_rank=0)

    def any_worker(self, flag):
        return float(self.hvd.allreduce(tf.constant(1.0 if flag else 0.0), op=self.hvd.Sum)) > 0


    def gather_text(self, text):
        return list(self.hvd.allgather_object(text))


def _call_true(fn: Callable, *args) -> tf.Tensor:
    fn(*args)
    return tf.constant(True)


def _rows(tensor, replica: int, num_replicas: int):
    """Rows ``replica*b .. replica*b+b-1`` of a global-batch tensor, ``b = batch / num_replicas``."""
    per = tensor.shape[0] // num_replicas
    return tensor[replica * per:(replica + 1) * per]


def enable_memory_growth() -> None:
    """Lets every visible GPU allocate memory as needed instead of all of it at start.

    Needed for every backend: without it the first TensorFlow process on a GPU
    takes nearly all its memory, and a second process on the same host (another
    worker or rank, an evaluation) runs out. Does nothing once TensorFlow has
    initialized its devices (the setting can then no longer change).
    """
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # devices already initialized: the setting is fixed
            return


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
    enable_memory_growth()
    if config.backend == "none":
        return Backend()
    if config.backend == "mirrored":
        configure_devices(config)
        return MirroredBackend(config.cpu_devices)
    if config.backend == "multiworker":
        return MultiWorkerBackend(config.timeout_seconds)
    if config.backend == "horovod":
        return HorovodBackend()
    raise UserError(f"config key 'distribute.backend': unknown backend {config.backend!r}")
