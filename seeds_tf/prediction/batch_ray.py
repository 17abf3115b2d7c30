"""Identifying a collection on a Ray cluster: the job of seeds_tf.prediction.batch, sharded by Ray Data.

The driver (`seeds-tf identify --ray ADDRESS`) lists the inputs, skips those already answered and
writes the part files and the output exactly as on one machine; only the answering moves to the
cluster. The pending inputs, cut into the batches one machine would answer, become a Ray dataset of
one row per batch (`ray.data.from_items`) that `map_batches` sends to a pool of actors, each an
`_Identifier` that loads the run once and answers whole batches (reading, decoding and resizing as
on one machine, then `batch.answer`). Order is preserved and each image goes through the engine in
the batch it would have on one machine (a batch's composition changes the last float32 digits), so
the output is row for row what one machine writes.

Every node reads the images and the run from the same paths as the driver: a shared file system
(or URLs) for the images, and the models folder mounted on every node.

Ray is an optional extra (`pip install seeds_tf[ray]`), imported only here and only when a job
runs: the service never needs it.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seeds_tf.classifier.engines import THREADS_ENV
from seeds_tf.core import runs
from seeds_tf.core.errors import InputError
from seeds_tf.data import pipeline
from seeds_tf.prediction import batch, inference

_LOGGER = logging.getLogger(__name__)


def ray_answerer(address: str, models_dir: Path, cpus_per_worker: float = 1.0) -> batch.Answerer:
    """What answers a batch.identify job on the Ray cluster at `address` ("host:port" of its head,
    or "auto" for the cluster this machine belongs to), with workers of `cpus_per_worker` CPUs
    that read runs from `models_dir`.

    Raises:
        InputError: naming `ray_cpus_per_worker`, when it is not positive; naming `ray`, where Ray
            is not installed, or for an address that is not host:port or auto, or whose head does
            not answer.
    """
    if not cpus_per_worker > 0:
        raise InputError("ray_cpus_per_worker", f"expected a positive number. Received: {cpus_per_worker!r}")
    try:  # refused before the job lists its inputs and loads the run
        importlib.import_module("ray")
    except ImportError:
        raise InputError("ray", "Ray is not installed here: pip install 'seeds_tf[ray]'") from None
    _check_head(address)
    return _OnRay(address, Path(models_dir).resolve(), cpus_per_worker)


def _check_head(address: str, timeout_s: float = 10.0) -> None:
    """Refuses, before the job lists its inputs and loads the run, an `address` whose head does not
    accept a connection: ray.init retried such an address for minutes, without an error."""
    if address == "auto":
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise InputError("ray", f"expected host:port of the cluster's head, or auto. Received: {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise InputError(
            "ray", f"no Ray head answers at {address} ({error.strerror or error}): is the cluster started?"
        ) from None


@dataclasses.dataclass(frozen=True)
class _OnRay:
    """A batch.Answerer on a Ray cluster (see ray_answerer)."""

    address: str
    models_dir: Path
    cpus_per_worker: float

    def __call__(
        self,
        run: inference.LoadedRun,
        engine: str,
        items: Sequence[batch.Item],
        options: batch.IdentifyOptions,
    ) -> Iterator[dict[str, Any]]:
        return _answer_on_ray(self, run, engine, items, options)


def _answer_on_ray(
    cluster: _OnRay,
    run: inference.LoadedRun,
    engine: str,
    items: Sequence[batch.Item],
    options: batch.IdentifyOptions,
) -> Iterator[dict[str, Any]]:
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        try:
            ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as error:  # `auto` on a machine of no cluster
            raise InputError("ray", f"no Ray cluster to join at {cluster.address}: {error}") from None
    try:
        # Rows come back in the order of the inputs, as on one machine: the part files and the
        # output are then the same, and a resumed job skips a prefix of what it submits.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
        workers = worker_count(nodes, cluster.cpus_per_worker, cluster.address)
        threads = max(1, int(cluster.cpus_per_worker))
        batches = [
            items[start : start + options.batch_size] for start in range(0, len(items), options.batch_size)
        ]
        # As JSON, which keeps names that are not UTF-8 (Arrow's strings refuse them) as escapes.
        data = ray.data.from_items(
            [{"items": json.dumps([[item.input, item.source] for item in chunk])} for chunk in batches]
        )
        answered = data.map_batches(
            _Identifier,
            fn_constructor_kwargs={
                "models_dir": str(cluster.models_dir),
                "run_id": run.run_id,
                "engine": engine,
                "options": options,
                "threads": threads,
            },
            batch_size=1,  # one batch of images
            batch_format="numpy",
            # Every worker from the start: a job's work is known, and nothing is gained by
            # starting one actor and waiting for a queue to grow before adding the others.
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cluster.cpus_per_worker,
            runtime_env={"env_vars": {THREADS_ENV: str(threads)}},
        )
        _LOGGER.info(
            "Answering %d images on Ray (%s), up to %d workers", len(items), cluster.address, workers
        )
        nodes = collections.Counter()
        for answers in answered.iter_batches(batch_size=None, batch_format="numpy"):
            for rows, node in zip(answers["rows"], answers["node"], strict=True):
                answered_here = json.loads(rows)
                nodes[str(node)] += len(answered_here)
                yield from answered_here
        _LOGGER.info(
            "Answered %d images on %d Ray nodes (%s)",
            sum(nodes.values()),
            len(nodes),
            ", ".join(f"{node[:8]}: {count}" for node, count in sorted(nodes.items())),
        )
    finally:
        if connected_here:
            ray.shutdown()


def worker_count(node_cpus: Sequence[float], cpus_per_worker: float, address: str) -> int:
    """The workers of `cpus_per_worker` CPUs that the nodes (`node_cpus`, the CPUs of each) hold: a
    worker runs on one node, so two nodes of 1 CPU hold no worker of 2. Counted on the whole
    cluster's CPUs, such a job waited forever for a worker no node could start.

    Raises:
        InputError: naming `ray_cpus_per_worker`, when no node has that many CPUs.
    """
    count = sum(int(cpus // cpus_per_worker) for cpus in node_cpus)
    if count == 0:
        raise InputError(
            "ray_cpus_per_worker",
            f"no node of the Ray cluster at {address} has {cpus_per_worker:g} CPUs (its nodes have "
            f"{', '.join(f'{cpus:g}' for cpus in node_cpus) or 'none'}): no worker could start. "
            f"Received: {cpus_per_worker!r}",
        )
    return count


class _Identifier:
    """A Ray Data worker: loads the run once (the engine too), then answers rows of one batch of
    images each ({"items": the batch's (input, source) pairs as JSON}) with a "rows" column, the
    batch's rows (see batch.answer) as one JSON list, and a "node" column, the id of the Ray node
    that answered it."""

    def __init__(
        self, models_dir: str, run_id: str, engine: str, options: batch.IdentifyOptions, threads: int
    ):
        import tensorflow as tf

        # The worker's share of the node's CPUs, before TensorFlow starts its thread pools.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        import ray

        self._node = ray.get_runtime_context().get_node_id()
        self._run = inference.load_run(runs.RunLayout(Path(models_dir) / run_id))
        self._engine = self._run.engine(engine).name
        self._options = options

    def __call__(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answers = [
            json.dumps(self._answer([batch.Item(*pair) for pair in json.loads(items)]))
            for items in columns["items"]
        ]
        return {
            "rows": np.array(answers, dtype=object),
            "node": np.array([self._node] * len(answers), dtype=object),
        }

    def _answer(self, items: list[batch.Item]) -> list[dict[str, Any]]:
        size = self._run.config.image_size
        decoded = []
        for read in batch.read_all(items, self._options.fetch_policy, self._options.fetch_threads):
            pixels, error = batch.decode(*read)
            decoded.append((pixels if error else pipeline.resize(pixels, size).numpy(), error))
        return batch.answer(self._run, self._engine, items, decoded, self._options)
