"""The tf.data side of the pixels: resizing as training and prediction both do it."""

import numpy as np
import tensorflow as tf

from seeds_tf.data import pipeline


def test_resize_gives_float_pixels_in_range():
    photo = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    resized = pipeline.resize(photo, 71).numpy()
    assert resized.shape == (71, 71, 3)
    assert resized.dtype == np.float32
    assert resized.min() >= 0.0 and resized.max() <= 255.0


def test_an_image_of_the_size_keeps_its_pixels_as_the_resize_would():
    """The shortcut for images already of the network's size gives exactly what the antialiased
    resize gives them, one image or a batch, eagerly and in a tf.data graph."""
    rng = np.random.default_rng(1)
    for shape in [(71, 71, 3), (4, 71, 71, 3)]:
        photo = rng.integers(0, 256, shape, dtype=np.uint8)
        by_resize = tf.image.resize(photo, (71, 71), method="bilinear", antialias=True).numpy()
        np.testing.assert_array_equal(pipeline.resize(photo, 71).numpy(), by_resize)
        np.testing.assert_array_equal(by_resize, photo.astype(np.float32))
    both = [
        rng.integers(0, 256, (71, 71, 3), dtype=np.uint8),
        rng.integers(0, 256, (90, 120, 3), dtype=np.uint8),
    ]
    data = tf.data.Dataset.from_generator(
        lambda: iter(both), output_signature=tf.TensorSpec((None, None, 3), tf.uint8)
    )
    data = data.map(lambda photo: pipeline.resize(photo, 71))
    assert data.element_spec.shape == (71, 71, 3)
    for photo, resized in zip(both, data.as_numpy_iterator(), strict=True):
        expected = tf.image.resize(photo, (71, 71), method="bilinear", antialias=True).numpy()
        np.testing.assert_array_equal(resized, np.clip(expected, 0.0, 255.0))
