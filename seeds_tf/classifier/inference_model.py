"""Inference-only copies of a trained classifier, with the same answers and less work per image.

A batch normalisation after a convolution is, at inference, a fixed per-channel scale and shift:
folding it into the convolution's kernel and bias removes two passes over every activation map,
and lets TensorFlow fuse the convolution, its bias and the ReLU into one oneDNN kernel. The
bfloat16 copy computes on the bf16 units that recent x86 CPUs have (AVX512-BF16, AMX) and keeps
the softmax in float32, so probabilities stay calibrated.
"""

from __future__ import annotations

import keras
import numpy as np

from seeds_tf.classifier.model import FEATURES_LAYER, OUTPUT_LAYER

FOLDABLE = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
"""Convolutions a following batch normalisation can be folded into."""

FLOAT32_LAYERS = (FEATURES_LAYER, OUTPUT_LAYER)
"""Layers that keep float32 in the bfloat16 copy: the embedding, which is compared with the
reference specimens' float32 ones, and the softmax, for calibrated probabilities."""


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """A copy of `model` in which each batch normalisation that alone follows a linear convolution
    is folded into it (the convolution gains a bias; the normalisation becomes an Identity).
    The copy's weights are its own: `model` is unchanged."""
    pairs = _foldable_pairs(model)
    folded_convs = {conv.name: model.get_layer(bn) for bn, conv in pairs.items()}

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if layer.name in folded_convs:
            return layer.__class__.from_config({**layer.get_config(), "use_bias": True})
        if layer.name in pairs:
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    def call(layer: keras.layers.Layer, inputs, *args, **kwargs):
        # An Identity takes no `mask`, which the functional graph records for a normalisation.
        return layer(inputs) if layer.name in pairs else layer(inputs, *args, **kwargs)

    copy = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer in model.layers:
        if layer.name in folded_convs:
            copy.get_layer(layer.name).set_weights(_folded_weights(layer, folded_convs[layer.name]))
        elif layer.name not in pairs and layer.weights:
            copy.get_layer(layer.name).set_weights(layer.get_weights())
    return copy


def bfloat16_copy(model: keras.Model) -> keras.Model:
    """A copy of `model` whose layers compute and keep their weights in bfloat16, except the
    FLOAT32_LAYERS. It takes and returns float32 tensors, as `model` does."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        # Keras ops in the graph (MobileNetV3's) have no dtype; the input stays float32.
        if (
            layer.name not in FLOAT32_LAYERS
            and "dtype" in config
            and not isinstance(layer, keras.layers.InputLayer)
        ):
            config["dtype"] = "bfloat16"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer, copied in zip(model.layers, copy.layers, strict=True):
        copied.set_weights(layer.get_weights())
    return copy


def _foldable_pairs(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Batch-normalisation layer name -> the convolution it can be folded into.

    A normalisation that feeds an Add (Xception's residual joins) is kept: TensorFlow 2.21's
    remapper fuses convolution, bias and Add, fails on the Add's second consumer, and then
    skips every fusion of the graph (measured: keeping these 12 of Xception's 40 is as fast).
    """
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or layer.axis not in (-1, 3):
            continue
        producer = layer.input._keras_history.operation
        if (
            isinstance(producer, FOLDABLE)
            and producer.get_config()["activation"] == "linear"
            and len(producer._outbound_nodes) == 1
            and not any(isinstance(node.operation, keras.layers.Add) for node in layer._outbound_nodes)
        ):
            pairs[layer.name] = producer
    return pairs


def _folded_weights(conv: keras.layers.Layer, bn: keras.layers.BatchNormalization) -> list[np.ndarray]:
    """The convolution's weights with the normalisation's scale and shift folded in."""
    mean = np.asarray(bn.moving_mean, np.float64)
    variance = np.asarray(bn.moving_variance, np.float64)
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta, np.float64) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + bn.epsilon)

    weights = [np.asarray(weight, np.float64) for weight in conv.get_weights()]
    bias = weights.pop() if conv.use_bias else np.zeros_like(mean)
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        # (h, w, in, multiplier): output channel c * multiplier + m
        weights[0] = (weights[0].reshape(*weights[0].shape[:2], -1) * scale).reshape(weights[0].shape)
    else:
        # Conv2D (h, w, in, out), or the pointwise kernel of a SeparableConv2D (1, 1, in, out)
        weights[-1] = weights[-1] * scale
    weights.append(beta + (bias - mean) * scale)
    return [weight.astype(np.float32) for weight in weights]
