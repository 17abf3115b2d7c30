"""Inference copies of the classifier: batch norms folded into convolutions, and bfloat16."""

import keras
import numpy as np

from seeds_tf.classifier.inference_model import bfloat16_copy, fold_batch_norms
from seeds_tf.classifier.model import build_classifier
from seeds_tf.core import config

IMAGES = np.random.default_rng(0).uniform(0, 255, (4, 71, 71, 3)).astype("float32")


def _with_trained_statistics(model: keras.Model, seed: int = 0) -> keras.Model:
    """Gives every batch normalisation the non-trivial statistics and affine terms a trained model
    has (fresh ones are the identity, which would fold into nothing)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(
                [
                    rng.uniform(low, high, weight.shape).astype("float32")
                    for weight, (low, high) in zip(
                        layer.get_weights(), [(0.5, 1.5), (-0.5, 0.5), (-0.2, 0.2), (0.5, 2.0)], strict=True
                    )
                ]
            )
    return model


def _batch_norms(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_every_foldable_convolution_absorbs_its_batch_norm():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.SeparableConv2D(12, 3, use_bias=False, name="sep")(x)
    x = keras.layers.BatchNormalization(name="sep_bn")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=True, name="depthwise")(x)
    x = keras.layers.BatchNormalization(name="depthwise_bn")(x)
    x = keras.layers.ReLU()(x)
    joined = keras.layers.Conv2D(24, 1, use_bias=False, name="joined")(x)
    x = keras.layers.Add()([keras.layers.BatchNormalization(name="joined_bn")(joined), x])  # kept
    activated = keras.layers.Conv2D(6, 1, activation="relu", name="activated")(x)
    x = keras.layers.BatchNormalization(name="after_relu")(activated)  # not linear: kept
    shared = keras.layers.Conv2D(6, 1, name="shared")(x)
    x = keras.layers.Add()([keras.layers.BatchNormalization(name="shared_bn")(shared), shared])  # kept
    model = _with_trained_statistics(keras.Model(inputs, x))
    pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype("float32")

    folded = fold_batch_norms(model)

    assert _batch_norms(folded) == ["joined_bn", "after_relu", "shared_bn"]
    assert all(folded.get_layer(name).use_bias for name in ("conv", "sep", "depthwise"))
    np.testing.assert_allclose(folded(pixels), model(pixels, training=False), rtol=1e-4, atol=1e-4)


def test_a_folded_xception_classifier_gives_the_same_probabilities():
    tiny = config.load(config.ModelConfig, image_size=71, dense_units=16, weights="none")
    model = _with_trained_statistics(build_classifier(tiny, num_classes=5))

    folded = fold_batch_norms(model)

    assert len(_batch_norms(model)) == 40
    assert len(_batch_norms(folded)) == 12
    np.testing.assert_allclose(folded(IMAGES), model(IMAGES, training=False), atol=1e-5)


def test_the_bfloat16_copy_computes_in_bf16_up_to_a_float32_softmax():
    tiny = config.load(config.ModelConfig, image_size=71, dense_units=16, weights="none")
    model = _with_trained_statistics(build_classifier(tiny, num_classes=5))

    reduced = bfloat16_copy(fold_batch_norms(model))

    assert reduced.get_layer("block1_conv1").compute_dtype == "bfloat16"
    assert reduced.get_layer("block1_conv1").kernel.dtype == "bfloat16"
    assert reduced.get_layer("predictions").compute_dtype == "float32"
    assert reduced.input.dtype == "float32"
    probabilities = keras.ops.convert_to_numpy(reduced(IMAGES))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(probabilities - model(IMAGES, training=False)).max() < 0.05
