"""Choosing TensorFlow's distribution strategy for a training run.

One device by default; every GPU of the machine with MirroredStrategy; a cluster of machines with
MultiWorkerMirroredStrategy when `TF_CONFIG` describes one (each machine runs `seeds-tf train` with
the same options and its own `TF_CONFIG`; the chief writes the run, the others a scratch copy).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf


def cluster_spec() -> dict:
    """The `TF_CONFIG` of this process ({} when unset)."""
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


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


def strategy() -> tf.distribute.Strategy:
    """The strategy for this process. Must be called before any other TensorFlow work when
    training on a cluster: collective operations are configured at start-up."""
    if is_multi_worker():
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
