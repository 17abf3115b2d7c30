"""The reference specimens behind an answer: the training images most like a photo.

A run's index holds one embedding per training image: the classifier's pooled features (its
FEATURES_LAYER, the input of the head), L2-normalised and stored as float16 (held as float32 in
memory, where a search is one matrix product), with the image's path relative to the dataset's
images folder and its label. An answer can then show the k reference images nearest to the photo
by cosine similarity, which makes a prediction checkable by eye. The same search gives the
decision its two specimen signals (specimen_evidence): whether the nearest references agree with
the classifier, and how far the photo is from them.

Files in the run's index folder (`RunLayout.index_dir`):
    embeddings.npy   float16 array (count, dimension), rows L2-normalised (np.save, no pickles)
    references.json  {"paths", "labels", "count", "dimension", "dtype"}, row i of the array is
                     paths[i]; written last, so an index whose writing was cut short has none
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import threadpoolctl

from seeds_tf.classifier.engines import Engine
from seeds_tf.core import files, runs
from seeds_tf.data.pipeline import images_only, make_dataset
from seeds_tf.data.splits import Split

_LOGGER = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"

STORED_DTYPE = np.float16
"""The file's precision: half the size of float32; cosine similarities of unit vectors lose under
1e-3 (enough to rank)."""

SEARCH_DTYPE = np.float32
"""The precision held in memory: one BLAS product per search. Holding float16 and casting chunk by
chunk at each search would halve the memory (117 against 234 MiB for 30,000 references of 2048
dimensions) but took 5x as long at batch 1 (52 against 10 ms, a third of the original model's
forward pass: benchmarks/retrieval.py), and the first float16 tensor of a process makes TensorFlow
log an error line (oneDNN has no float16 kernels on most CPUs, this AVX-512 one included)."""

SIMILARITY_DIGITS = 4
"""Decimals of the similarities in an answer: float16 storage makes further digits noise."""

AGREEMENT_NEIGHBOURS = 5
"""The nearest references whose majority species is compared with the classifier's top species. On
the demo, the classifier's top-1 was right 91% of the time where this majority agreed with it and
40% where it did not (reports/trust.json)."""

KNN_RANK = 5
"""The rank of the reference whose distance scores how unfamiliar an image is (the deep nearest
neighbour score of Sun et al., 2022): on the demo the 5th nearest told unseen images apart better
than the 1st, and photos of no seed at AUROC 0.89 where the entropy of the probabilities is at chance."""

EVIDENCE_K = max(AGREEMENT_NEIGHBOURS, KNN_RANK)
"""References per query that specimen_evidence needs with its defaults."""


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero (similar to nothing)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceIndex:
    """The embeddings of a run's training images, with their paths and labels.

    Attributes:
        embeddings: float32 array (n, dimension) of float16 values (as stored, so an index
            answers the same before and after a reload), rows L2-normalised.
        paths: path of each image relative to the dataset's images folder, in rows' order.
        labels: class id of each image, an int array of shape (n,).
    """

    embeddings: np.ndarray
    paths: tuple[str, ...]
    labels: np.ndarray

    def __post_init__(self):
        if self.embeddings.ndim != 2 or self.embeddings.dtype != SEARCH_DTYPE:
            raise ValueError(
                "Expected float32 embeddings of shape (n, dimension). "
                f"Received: dtype={self.embeddings.dtype}, shape={self.embeddings.shape}"
            )
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"Expected integer labels. Received: dtype={self.labels.dtype}")
        count = len(self.embeddings)
        if len(self.paths) != count or self.labels.shape != (count,):
            raise ValueError(
                f"Expected one path and one label per embedding ({count}). "
                f"Received: {len(self.paths)} paths, labels of shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dimension(self) -> int:
        return self.embeddings.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k references most similar to each query, by cosine similarity, most similar first.

        Args:
            queries: float array (q, dimension); normalised here, so any scale will do.
            k: references per query, at least 1; capped at the number of references.

        Returns:
            indices (q, k) into the references and similarities (q, k) in [-1, 1], float32.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"Expected k >= 1. Received: k={k!r}")
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValueError(
                f"Expected queries of shape (q, {self.dimension}). Received: shape={queries.shape}"
            )
        if not np.all(np.isfinite(queries)):
            raise ValueError("Expected finite queries. Received: NaN or infinite values")
        k = min(int(k), len(self))
        # One BLAS thread: after a product, OpenBLAS's other threads spin for about a tenth of a
        # second, taking the cores from the engine's next batch; answers with the specimens took
        # 1.9x as long on 2 cores (benchmarks/NOTES.md), for a product of milliseconds.
        with _blas().limit(limits=1, user_api="blas"):
            scores = normalised(np.asarray(queries, dtype=SEARCH_DTYPE)) @ self.embeddings.T
        if k < scores.shape[1]:
            candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            candidates = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        candidate_scores = np.take_along_axis(scores, candidates, axis=1)
        order = np.argsort(-candidate_scores, axis=1, kind="stable")
        indices = np.take_along_axis(candidates, order, axis=1)
        return indices, np.take_along_axis(candidate_scores, order, axis=1)


@functools.cache
def _blas() -> threadpoolctl.ThreadpoolController:
    """The BLAS libraries this process has loaded (NumPy's), found once: finding them takes 0.3 ms,
    limiting their threads with the controller 10 us."""
    return threadpoolctl.ThreadpoolController()


def split_outputs(
    engine: Engine, split: Split, image_size: int, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Every image of `split`, in order, through `engine` (one pass each, embedding and
    probabilities: the run's keras engine): unit embeddings, float32 (n, dimension), and
    probabilities, float64 (n, classes).

    Raises:
        ValueError: for a split without images.
    """
    if not split.paths:
        raise ValueError(f"Expected a split with images. Received: split {split.name!r} without any")
    images = dataclasses.replace(split, labels=None)  # the pixels alone: no labels to encode
    data = images_only(make_dataset(images, image_size, batch_size, num_classes=0))
    pairs = [engine.observe(batch.numpy()) for batch in data]
    probabilities, features = (np.concatenate(part) for part in zip(*pairs, strict=True))
    return normalised(features.astype(np.float32)), probabilities.astype(np.float64)


def build_index(
    engine: Engine, split: Split, images_dir: Path, image_size: int, batch_size: int = 32
) -> ReferenceIndex:
    """Embeds every image of `split` (a labelled split, usually the run's training images) through
    the run's keras engine: the reference that every export's embedding is held to (an answer
    embeds its photo with the engine it runs).

    Args:
        engine: the run's keras engine (seeds_tf.classifier.engines.KerasEngine).
        split: the images and their labels; every path lies inside `images_dir`.
        images_dir: the dataset's images folder: the paths are stored relative to it, so the index
            survives a move of the data folder.
        image_size: the classifier's input side.
        batch_size: images per forward pass (default 32).
    """
    if split.labels is None:
        raise ValueError(f"Expected a labelled split. Received: split {split.name!r} without labels")
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    root = images_dir.resolve()
    paths = tuple(_relative(path, root) for path in split.paths)
    embeddings = split_outputs(engine, split, image_size, batch_size)[0]
    _LOGGER.debug("Embedded %d images of %s: dimension %d", len(embeddings), split.name, embeddings.shape[1])
    stored = embeddings.astype(STORED_DTYPE).astype(SEARCH_DTYPE)  # the values a reload gives
    return ReferenceIndex(stored, paths, np.asarray(split.labels, dtype=np.int32))


def save_index(index: ReferenceIndex, folder: Path) -> None:
    """Writes `index` into `folder` (a run's `index_dir`): embeddings.npy, then references.json,
    each atomically."""
    with files.atomic_path(folder / EMBEDDINGS_FILE) as temporary:
        np.save(temporary, index.embeddings.astype(STORED_DTYPE), allow_pickle=False)
    files.write_json(
        folder / runs.INDEX_REFERENCES,
        {
            "paths": list(index.paths),
            "labels": index.labels.tolist(),
            "count": len(index),
            "dimension": index.dimension,
            "dtype": np.dtype(STORED_DTYPE).name,
        },
    )


def load_index(folder: Path) -> ReferenceIndex | None:
    """The index saved in `folder`, or None when there is none (no references.json).

    Raises:
        ValueError: naming the file, when embeddings.npy is missing or disagrees with
            references.json (count, dimension or dtype), or references.json is malformed, or the
            embeddings are not float16.
    """
    references_file = folder / runs.INDEX_REFERENCES
    if not references_file.is_file():
        return None
    try:
        references = files.read_json(references_file)
    except ValueError as error:
        raise ValueError(f"{references_file} is not JSON: {error}") from None
    if not isinstance(references, dict):
        raise ValueError(f"{references_file} is not a JSON object")
    embeddings_file = folder / EMBEDDINGS_FILE
    if not embeddings_file.is_file():
        raise ValueError(f"{embeddings_file} is missing: {references_file} lists {references.get('count')}")
    embeddings = np.load(embeddings_file, allow_pickle=False)
    try:
        paths, labels = tuple(references["paths"]), np.asarray(references["labels"], dtype=np.int32)
        expected = (references["count"], references["dimension"], references["dtype"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{references_file} is malformed: {error}") from None
    found = (len(embeddings), embeddings.shape[-1] if embeddings.ndim == 2 else None, str(embeddings.dtype))
    if found != expected or embeddings.ndim != 2:
        raise ValueError(
            f"{embeddings_file} holds {found[0]} embeddings of dimension {found[1]} ({found[2]}); "
            f"{references_file} expects {expected[0]} of dimension {expected[1]} ({expected[2]})"
        )
    if found[2] != np.dtype(STORED_DTYPE).name:
        raise ValueError(f"{embeddings_file} holds {found[2]} embeddings; an index stores float16")
    if len(paths) != expected[0] or labels.shape != (expected[0],):
        raise ValueError(
            f"{references_file} lists {len(paths)} paths and {len(labels)} labels "
            f"for a count of {expected[0]}"
        )
    return ReferenceIndex(embeddings.astype(SEARCH_DTYPE), paths, labels)


def neighbours_of(
    index: ReferenceIndex, queries: np.ndarray, k: int, classes: Sequence[str]
) -> list[list[dict[str, Any]]]:
    """For each query embedding, its k most similar references, most similar first, each as
    {"label", "label_id", "similarity" (rounded), "path" (relative to the images folder)}.

    Raises:
        ValueError: for k < 1, queries of another dimension, or labels beyond `classes`.
    """
    if len(index) and int(index.labels.max()) >= len(classes):
        raise ValueError(
            f"Expected labels below {len(classes)} classes. Received: label {int(index.labels.max())}"
        )
    indices, similarities = index.search(queries, k)
    return specimens(index, indices, similarities, classes)


def specimens(
    index: ReferenceIndex, indices: np.ndarray, similarities: np.ndarray, classes: Sequence[str]
) -> list[list[dict[str, Any]]]:
    """The references of a search (ReferenceIndex.search's results) as neighbours_of lists them."""
    return [
        [
            {
                "label": classes[int(index.labels[i])],
                "label_id": int(index.labels[i]),
                "similarity": round(float(similarity), SIMILARITY_DIGITS),
                "path": index.paths[i],
            }
            for i, similarity in zip(row_indices, row_similarities, strict=True)
        ]
        for row_indices, row_similarities in zip(indices, similarities, strict=True)
    ]


def specimen_evidence(
    index: ReferenceIndex,
    indices: np.ndarray,
    similarities: np.ndarray,
    voters: int = AGREEMENT_NEIGHBOURS,
    rank: int = KNN_RANK,
) -> tuple[np.ndarray, np.ndarray]:
    """The two signals of a search (ReferenceIndex.search with k >= max(voters, rank), or every
    reference of a smaller index) that the decision uses besides the probabilities.

    Args:
        index: the references searched.
        indices, similarities: the search's answer, most similar first.
        voters: the nearest references whose majority species is taken (AGREEMENT_NEIGHBOURS by
            default; a run's calibration records the value its thresholds were chosen with).
        rank: the rank of the reference whose distance is taken (KNN_RANK by default; recorded too).

    Returns:
        (majority species of the `voters` most similar references, int64 (q,): a tie goes to the
        species of the most similar reference among those tied; specimen distance, float64 (q,):
        1 - the cosine similarity of the `rank`-th most similar reference, or of the last one in an
        index of fewer, in [0, 2], higher being less like any training image).

    Raises:
        ValueError: for voters or rank below 1, or a search of fewer references than they need.
    """
    if min(voters, rank) < 1:
        raise ValueError(f"Expected voters >= 1 and rank >= 1. Received: voters={voters}, rank={rank}")
    needed = min(max(voters, rank), len(index))
    if indices.ndim != 2 or indices.shape[1] < needed or similarities.shape != indices.shape:
        raise ValueError(
            f"Expected a search of at least {needed} references per query. "
            f"Received: indices of shape {indices.shape}, similarities of shape {similarities.shape}"
        )
    nearest = index.labels[indices[:, :voters]]
    # argmax takes the first of equal counts, and the references are in order of similarity.
    votes = (nearest[:, :, None] == nearest[:, None, :]).sum(axis=2)
    majority = nearest[np.arange(len(nearest)), votes.argmax(axis=1)].astype(np.int64)
    # Clipped: float16 references can give a similarity a hair above 1 (a distance of -1e-5).
    distance = np.clip(1.0 - similarities[:, min(rank, indices.shape[1]) - 1].astype(np.float64), 0.0, 2.0)
    return majority, distance


def _relative(path: Path, root: Path) -> str:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"Expected images inside {root}. Received: {path}")
    return resolved.relative_to(root).as_posix()
