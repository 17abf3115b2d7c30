"""The tf.data input pipeline: parallel decode and resize, augmentation on the fly, prefetch.

Decoding goes through `seeds_tf.data.images` (Pillow), so training reads every format prediction accepts
and prepares pixels exactly as prediction does. Unreadable images are screened out beforehand
(`images.find_unreadable`), which keeps the number of batches known to Keras.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from seeds_tf.core.config import AugmentationConfig
from seeds_tf.data import images
from seeds_tf.data.splits import Split


def resize(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes uint8 RGB images (one or a batch) to image_size x image_size float32 in [0, 255].

    Antialiasing keeps fine seed texture from aliasing when large photos are shrunk a lot. Images
    that already have the size are only converted: the resize would give back their very pixels,
    at three times the cost of decoding a 299-px JPEG (1.4 ms against 0.4 on one core), which a
    collection photographed at the network's size would pay on every photo.
    """
    images = tf.convert_to_tensor(images)
    size = images.shape[-3:-1]
    if size.is_fully_defined():  # eagerly, or in a graph of known shapes: decided here
        return (
            tf.cast(images, tf.float32)
            if size == (image_size, image_size)
            else _antialiased(images, image_size)
        )
    height, width = tf.shape(images)[-3], tf.shape(images)[-2]
    resized = tf.cond(
        tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size)),
        lambda: tf.cast(images, tf.float32),
        lambda: _antialiased(images, image_size),
    )
    # The two branches' shapes merge into an unknown size; the size is known.
    resized.set_shape(images.shape[:-3].concatenate([image_size, image_size, images.shape[-1]]))
    return resized


def _antialiased(images: tf.Tensor, image_size: int) -> tf.Tensor:
    resized = tf.image.resize(images, (image_size, image_size), method="bilinear", antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def augmentation(config: AugmentationConfig, seed: int) -> keras.Sequential | None:
    """Random changes a seed photo can plausibly undergo: any orientation, a closer or farther
    camera, other light and colour, sensor noise, blur, occlusion. None when all are off.

    Each layer gets its own seed derived from `seed`, so a run's augmentation is reproducible.
    """
    layers = []
    if config.flip:
        layers.append(keras.layers.RandomFlip("horizontal_and_vertical", seed=seed))
    if config.rotation:
        layers.append(keras.layers.RandomRotation(config.rotation, fill_mode="reflect", seed=seed + 1))
    if config.zoom:
        layers.append(
            keras.layers.RandomZoom((-config.zoom, config.zoom), fill_mode="reflect", seed=seed + 2)
        )
    if config.contrast:
        layers.append(keras.layers.RandomContrast(config.contrast, seed=seed + 3))
    if config.brightness:
        layers.append(keras.layers.RandomBrightness(config.brightness, seed=seed + 4))
    if config.saturation:
        # Keras' saturation factor 0.5 is the identity; spread it symmetrically around that.
        spread = (0.5 - config.saturation / 2, 0.5 + config.saturation / 2)
        layers.append(keras.layers.RandomSaturation(spread, seed=seed + 5))
    if config.blur:
        layers.append(keras.layers.RandomGaussianBlur(config.blur, sigma=(0.1, 1.5), seed=seed + 6))
    if config.noise:
        # GaussianNoise takes a standard deviation of at most 1: apply it on [0, 1] pixels.
        layers.append(keras.layers.Rescaling(1 / 255))
        layers.append(keras.layers.GaussianNoise(config.noise, seed=seed + 7))
        layers.append(keras.layers.Rescaling(255))
    if config.cutout:
        layers.append(keras.layers.RandomErasing(config.cutout, scale=(0.02, 0.2), seed=seed + 8))
    return keras.Sequential(layers, name="augmentation") if layers else None


def make_dataset(
    split: Split,
    image_size: int,
    batch_size: int,
    num_classes: int,
    *,
    shuffle: bool = False,
    augment: keras.Sequential | None = None,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of (images, one-hot labels), or of images alone for an unlabelled split.

    Args:
        split: the images (and labels) to read.
        image_size: side of the square float32 images produced, pixel values in [0, 255].
        batch_size: images per batch; the last batch may be smaller.
        num_classes: length of the one-hot labels (one-hot, so label smoothing can apply).
        shuffle: reshuffle the images every epoch, seeded by `seed` (for training).
        augment: layers applied to each training batch (from `augmentation`); None for evaluation,
            which must stay deterministic.
        seed: seed of shuffling.
    """
    paths = [str(path) for path in split.paths]
    if split.labels is not None:
        labels = tf.one_hot(np.asarray(split.labels), num_classes)
        data = tf.data.Dataset.from_tensor_slices((paths, labels))
    else:
        data = tf.data.Dataset.from_tensor_slices((paths,))
    if shuffle:
        data = data.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def load(path, *label):
        pixels = tf.numpy_function(_read, [path], tf.uint8, stateful=False)
        pixels.set_shape([None, None, 3])
        return (resize(pixels, image_size), *label)

    data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Training drops the last, partial batch: a few images give noisy batch-norm statistics, and a
    # second batch shape would trace the whole train step a second time.
    data = data.batch(batch_size, drop_remainder=shuffle and len(paths) > batch_size)
    if augment is not None:
        # Noise and the colour changes can leave the valid range; the model expects [0, 255].
        data = data.map(
            lambda batch, *label: (tf.clip_by_value(augment(batch, training=True), 0.0, 255.0), *label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return data.prefetch(tf.data.AUTOTUNE)


def images_only(data: tf.data.Dataset) -> tf.data.Dataset:
    """The images of a (images, labels) dataset, for prediction."""
    return data.map(lambda batch, *label: batch)


def _read(path: bytes) -> np.ndarray:
    return images.read_image(Path(path.decode()))
