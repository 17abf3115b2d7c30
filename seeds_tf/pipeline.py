"""The tf.data input pipeline: parallel decode and resize, augmentation on the fly, prefetch.

Decoding goes through `seeds_tf.images` (Pillow), so training reads every format prediction accepts
and prepares pixels exactly as prediction does. Unreadable images are screened out beforehand
(`images.find_unreadable`), which keeps the number of batches known to Keras.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from seeds_tf import images
from seeds_tf.splits import Split


def augmentation(seed: int) -> keras.Sequential:
    """Random changes a seed photo can plausibly undergo: any orientation, a closer or farther
    camera, other lighting. Applied to training batches only."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomRotation(0.5, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom((-0.2, 0.2), fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomContrast(0.2, seed=seed + 3),
            keras.layers.RandomBrightness(0.1, value_range=(0.0, 255.0), seed=seed + 4),
        ],
        name="augmentation",
    )


def make_dataset(
    split: Split,
    image_size: int,
    batch_size: int,
    *,
    training: bool = False,
    augment: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of (images, labels), or of images alone for an unlabelled split.

    Args:
        split: the images (and labels) to read.
        image_size: side of the square float32 images produced, pixel values in [0, 255].
        batch_size: images per batch; the last batch may be smaller.
        training: shuffle (reshuffled each epoch, seeded) and apply `augment`.
        augment: random augmentation, only with `training`; evaluation stays deterministic.
        seed: seed of shuffling and augmentation.
    """
    paths = tf.data.Dataset.from_tensor_slices([str(path) for path in split.paths])
    if split.labels is not None:
        data = tf.data.Dataset.zip(paths, tf.data.Dataset.from_tensor_slices(np.array(split.labels)))
    else:
        data = paths.map(lambda path: (path, tf.constant(-1, tf.int64)))
    if training:
        data = data.shuffle(len(split.paths), seed=seed, reshuffle_each_iteration=True)

    def load(path, label):
        pixels = tf.numpy_function(_read, [path], tf.uint8, stateful=False)
        pixels.set_shape([None, None, 3])
        return pixels, label

    data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    data = data.map(
        lambda pixels, label: (images.resize(pixels, image_size), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    data = data.batch(batch_size)
    if training and augment:
        layers = augmentation(seed)
        data = data.map(
            lambda batch, label: (layers(batch, training=True), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if split.labels is None:
        data = data.map(lambda batch, label: batch)
    return data.prefetch(tf.data.AUTOTUNE)


def _read(path: bytes) -> np.ndarray:
    return images.read_image(Path(path.decode()))
