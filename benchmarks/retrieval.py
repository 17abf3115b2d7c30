"""The cost of showing the reference specimens: a top-5 search of the reference index against the
forward pass, side by side in one process.

    .venv/bin/python benchmarks/retrieval.py [--references 30000] [--size 299] [--classes 743] [--quick]

The index holds `--references` random L2-normalised embeddings of dimension 2048 (Xception's
pooled features; the values do not change the cost), searched as seeds_tf.prediction.neighbours
does (float32 in memory, one matrix product) for batches of 1 and 8 queries. The forward pass is
seeds_tf's keras engine on an untrained Xception at 299 px with 743 classes (the original seeds
model's shape). The two are timed alternately and the median of the per-pair ratios is kept, so a
noisy neighbour slows both sides of a pair alike. Also measured: the alternative seeds_tf does not
take, the index kept in float16 as stored (half the memory) and cast to float32 by TensorFlow in
chunks of 1024 references at each search. Writes benchmarks/results.json under "retrieval".
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from results import record

from seeds_tf.classifier import engines
from seeds_tf.classifier.model import build_classifier
from seeds_tf.core import config
from seeds_tf.prediction import neighbours

DIMENSION = 2048
"""Xception's pooled features, the embedding of the default backbone."""

K = 5
"""Neighbours per query: a contact sheet's worth."""

CHUNK = 1024
"""References per cast and product of the float16 alternative: the fastest chunk measured for it."""


def machine() -> dict:
    """The CPU the figures were measured on (lscpu's model name) and the cores this process may use."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    return {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0))}


def random_index(count: int, dimension: int, classes: int, seed: int = 0) -> neighbours.ReferenceIndex:
    """`count` random unit vectors of float16 values, with paths and labels as a real index has them."""
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((count, dimension), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.arange(count, dtype=np.int32) % classes
    paths = tuple(f"species{label}/seed{i}.jpg" for i, label in enumerate(labels))
    stored = embeddings.astype(neighbours.STORED_DTYPE).astype(neighbours.SEARCH_DTYPE)
    return neighbours.ReferenceIndex(stored, paths, labels)


def float16_search(embeddings16: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The search over the index held in float16, each chunk cast to float32 by TensorFlow (twice
    as fast as NumPy's cast in a process where TensorFlow's threads run)."""
    queries = neighbours.normalised(queries)
    scores = np.empty((len(queries), len(embeddings16)), dtype=np.float32)
    for start in range(0, len(embeddings16), CHUNK):
        chunk = tf.cast(embeddings16[start : start + CHUNK], tf.float32)
        scores[:, start : start + CHUNK] = tf.matmul(queries, chunk, transpose_b=True).numpy()
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def paired(
    first: Callable[[], object], second: Callable[[], object], rounds: int
) -> tuple[float, float, float]:
    """Median seconds of `first` and of `second`, timed alternately after one warm-up call each,
    and the median of the per-pair ratios first / second."""
    first()
    second()
    pairs = []
    for _ in range(rounds):
        times = []
        for call in (first, second):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        pairs.append(times)
    a, b = (statistics.median(side) for side in zip(*pairs, strict=True))
    return a, b, statistics.median(x / y for x, y in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--references", type=int, default=30_000)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--classes", type=int, default=743)
    parser.add_argument("--rounds", type=int, default=9, help="timed pairs per batch size")
    parser.add_argument("--quick", action="store_true", help="a small model and few rounds: a smoke check")
    args = parser.parse_args()
    size, rounds = (96, 3) if args.quick else (args.size, args.rounds)

    index = random_index(args.references, DIMENSION, args.classes)
    model = build_classifier(config.load(config.ModelConfig, image_size=size, weights="none"), args.classes)
    forward = engines.load_engine("keras", model, Path("."))
    rng = np.random.default_rng(1)
    figures = {
        "machine": machine(),
        "model": f"Xception {size} px, {args.classes} classes, keras engine",
        "references": len(index),
        "dimension": DIMENSION,
        "index_mib": round(index.embeddings.nbytes / 2**20, 1),
        "float16_mib": round(index.embeddings.nbytes / 2 / 2**20, 1),
        "k": K,
    }
    embeddings16 = index.embeddings.astype(neighbours.STORED_DTYPE)
    for batch in (1, 8):
        queries = rng.standard_normal((batch, DIMENSION)).astype(np.float32)
        pixels = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
        search, bare, ratio = paired(
            lambda q=queries: index.search(q, K), lambda p=pixels: forward(p), rounds
        )
        half, _, half_ratio = paired(
            lambda q=queries: float16_search(embeddings16, q, K),
            lambda q=queries: index.search(q, K),
            max(3, rounds // 3),
        )
        figures[f"batch_{batch}"] = {
            "search_ms": round(1000 * search, 2),
            "forward_ms": round(1000 * bare, 1),
            "search_over_forward": round(ratio, 4),
            "float16_chunks_search_ms": round(1000 * half, 2),
            "float16_chunks_over_search": round(half_ratio, 2),
        }
    record("retrieval", figures)


if __name__ == "__main__":
    main()
