"""The tf.data side of the pixels: resizing as training and prediction both do it."""

import numpy as np

from seeds_tf.data import pipeline


def test_resize_gives_float_pixels_in_range():
    photo = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    resized = pipeline.resize(photo, 71).numpy()
    assert resized.shape == (71, 71, 3)
    assert resized.dtype == np.float32
    assert resized.min() >= 0.0 and resized.max() <= 255.0
