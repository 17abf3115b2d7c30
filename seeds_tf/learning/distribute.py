"""Choosing TensorFlow's distribution strategy for a training run.

One device by default; every GPU of the machine with MirroredStrategy; a cluster of machines with
MultiWorkerMirroredStrategy when `TF_CONFIG` describes one (each machine runs `seeds-tf train` with
the same options and its own `TF_CONFIG`; the chief writes the run, the others a scratch copy).
Each waits at most `$SEEDS_TF_CLUSTER_TIMEOUT` seconds for the others to start.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
from collections.abc import Iterator

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as keras_tf_trainer

from seeds_tf.core.errors import InputError

ROLES = ("chief", "worker")
"""The task types of a MultiWorkerMirroredStrategy cluster."""

CLUSTER_TIMEOUT_ENV = "SEEDS_TF_CLUSTER_TIMEOUT"
DEFAULT_CLUSTER_TIMEOUT_S = 600.0
"""How long a task of a cluster waits for the others to start, unless `$SEEDS_TF_CLUSTER_TIMEOUT`
says otherwise: long enough for machines whose images are still being pulled."""

_LOGGER = logging.getLogger(__name__)


def cluster_spec() -> dict:
    """The `TF_CONFIG` of this process ({} when unset).

    Raises:
        InputError: naming TF_CONFIG, for text that is not a JSON object, or a cluster of several
            tasks whose `task` is not one of them: a clear refusal at start-up instead of a
            traceback from json or from TensorFlow's cluster resolver.
    """
    text = os.environ.get("TF_CONFIG") or "{}"
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError("TF_CONFIG", f"is not JSON ({error}). Received: {text!r}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster", {}), dict):
        raise InputError("TF_CONFIG", f"expected an object with a 'cluster' object. Received: {text!r}")
    cluster = spec.get("cluster", {})
    if sum(len(cluster.get(role, [])) for role in ROLES) > 1:
        _check_task(spec.get("task"), cluster, text)
    return spec


def _check_task(task: object, cluster: dict, text: str) -> None:
    """Refuses a `task` that names no task of `cluster` (type chief or worker, an index in range)."""
    roles = {role: len(cluster[role]) for role in ROLES if cluster.get(role)}
    kind = task.get("type") if isinstance(task, dict) else None
    index = str(task.get("index", 0)) if isinstance(task, dict) else ""
    if kind not in roles or not index.isdigit() or int(index) >= roles[kind]:
        tasks = ", ".join(f"{role} 0..{count - 1}" for role, count in roles.items())
        raise InputError(
            "TF_CONFIG",
            f"expected a 'task' naming one of this cluster's tasks ({tasks}), e.g. "
            f'{{"type": "{next(iter(roles))}", "index": 0}}. Received: {text!r}',
        )


def is_multi_worker() -> bool:
    cluster = cluster_spec().get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", [])) > 1


def is_chief() -> bool:
    """True unless this process is a non-chief worker of a cluster: only the chief writes the run."""
    spec = cluster_spec()
    task = spec.get("task", {})
    if not is_multi_worker():
        return True
    if "chief" in spec.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def cluster_timeout_s() -> float:
    """Seconds a task of a cluster waits for the others: `$SEEDS_TF_CLUSTER_TIMEOUT`, or
    DEFAULT_CLUSTER_TIMEOUT_S when unset.

    Raises:
        InputError: naming SEEDS_TF_CLUSTER_TIMEOUT, for text that is not a number of seconds > 0.
    """
    text = os.environ.get(CLUSTER_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_CLUSTER_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(
            CLUSTER_TIMEOUT_ENV, f"expected a number of seconds > 0, e.g. 600. Received: {text!r}"
        )
    return seconds


def strategy() -> tf.distribute.Strategy:
    """The strategy for this process. Must be called before any other TensorFlow work when
    training on a cluster: collective operations are configured at start-up.

    On a cluster, TensorFlow waits for every task to start with no time limit, in C++ where neither
    an exception nor SIGTERM ends it (TensorFlow catches SIGTERM): a task whose peers
    never start would hold its machine, and the models folder's training reservation, for ever.
    So the process ends, with status 1 and its stack, if the cluster has not formed within
    cluster_timeout_s().
    """
    if is_multi_worker():
        seconds = cluster_timeout_s()
        _fix_keras_multi_worker()
        _LOGGER.info(
            "Waiting at most %g s for every task of TF_CONFIG's cluster to start: %s. A task "
            "missing by then ends this one with status 1 (%s=SECONDS waits longer).",
            seconds,
            _cluster_tasks(),
            CLUSTER_TIMEOUT_ENV,
        )
        with _exit_unless_done_within(seconds):
            return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _cluster_tasks() -> str:
    """The tasks of TF_CONFIG's cluster, e.g. "worker 0 (node1:12345), worker 1 (node2:12345)"."""
    cluster = cluster_spec()["cluster"]
    return ", ".join(
        f"{role} {index} ({address})" for role in ROLES for index, address in enumerate(cluster.get(role, []))
    )


@contextlib.contextmanager
def _exit_unless_done_within(seconds: float) -> Iterator[None]:
    """Ends the process with status 1, after printing where it waited, unless the block ends within
    `seconds`. TensorFlow's wait for the cluster holds the GIL, so no Python thread could end it:
    faulthandler's watchdog is a thread of C."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def synchronize_batch_norm(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """With more than one replica, batch normalisation takes its statistics over the global batch.

    Otherwise every replica updates its own moving mean and variance from its own shard, and the
    workers of a cluster end with different models (the chief's is then fitted to half the data).
    """
    if strategy.num_replicas_in_sync == 1:
        return
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def _fix_keras_multi_worker() -> None:
    """Makes Keras 3's `fit` work under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    Keras' TensorFlow trainer has two collective reductions that `CollectiveAllReduceStrategy`
    refuses: its symbolic build reduces the whole (images, labels) batch tuple across workers only
    to learn shapes and dtypes, and its step logs (scalars) are reduced along axis 0, which scalars
    do not have. The first needs no communication at all (any local replica's batch has the right
    structure); the second is a mean over workers of scalars. Everything else of `fit`: gradients,
    metrics, callbacks, stays Keras' own.
    """
    if getattr(keras_tf_trainer, "_seeds_tf_multi_worker_fix", False):
        return
    keras_reduce = keras_tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction="auto"):
        if reduction == "auto" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tree.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    def maybe_symbolic_build(model, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tree.map_structure(_one_local_replica(model.distribute_strategy), next(batches))
                break
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    keras_tf_trainer.reduce_per_replica = reduce_per_replica
    keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    keras_tf_trainer._seeds_tf_multi_worker_fix = True


def _one_local_replica(strategy: tf.distribute.Strategy):
    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return local
