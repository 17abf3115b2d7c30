"""The seeds classifier: one Keras model shared by training, prediction and export.

Architecture (as the original seeds model, plus preprocessing inside the graph):
    image (RGB, 0-255, image_size x image_size x 3)
    -> the backbone's own preprocessing (BackbonePreprocessing)
    -> backbone without its top (Xception by default)
    -> global average pooling
    -> [dropout -> Dense(dense_units, relu)]
    -> dropout -> Dense(num_classes, softmax)
Putting the preprocessing inside the model means a saved run cannot be fed images prepared differently
from training, and exports carry it along.
"""

from __future__ import annotations

from pathlib import Path

import keras

from seeds_tf.classifier.backbones import get_backbone
from seeds_tf.core import files
from seeds_tf.core.config import ModelConfig

OUTPUT_LAYER = "predictions"
"""The softmax layer: a Dense whose kernel and bias give the logits (Grad-CAM differentiates them)."""
HEAD_LAYERS = ("head_dense", OUTPUT_LAYER)
FEATURES_LAYER = "avg_pool"
"""The layer whose output is the classifier's embedding: the pooled backbone features the head reads,
which the reference specimens' index holds and searches with."""


@keras.saving.register_keras_serializable(package="seeds_tf")
class BackbonePreprocessing(keras.layers.Layer):
    """Applies the named backbone's ImageNet preprocessing to RGB images in [0, 255]."""

    def __init__(self, modelname: str, **kwargs):
        super().__init__(**kwargs)
        self.modelname = modelname
        self._backbone = get_backbone(modelname)

    def call(self, images):
        return self._backbone.preprocess(images)

    def get_config(self):
        return {**super().get_config(), "modelname": self.modelname}


@keras.saving.register_keras_serializable(package="seeds_tf")
class BackboneScaledAdam(keras.optimizers.Adam):
    """Adam that updates the backbone with `backbone_lr_factor` times the learning rate.

    Adam divides out the scale of the gradients, so a lower backbone learning rate cannot be had by
    scaling gradients: the factor has to act on the learning rate of each backbone variable. Variables
    of the layers named in `head_layers` keep the full rate.
    """

    def __init__(self, backbone_lr_factor: float = 1.0, head_layers=HEAD_LAYERS, **kwargs):
        super().__init__(**kwargs)
        self.backbone_lr_factor = backbone_lr_factor
        self.head_layers = tuple(head_layers)

    def build(self, variables):
        super().build(variables)
        # update_step receives backend variables without Keras paths: decide per index, once.
        self._lr_factors = [
            1.0 if variable.path.split("/")[0] in self.head_layers else self.backbone_lr_factor
            for variable in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        factor = self._lr_factors[self._get_variable_index(variable)]
        super().update_step(gradient, variable, learning_rate * factor)

    def get_config(self):
        return {
            **super().get_config(),
            "backbone_lr_factor": self.backbone_lr_factor,
            "head_layers": list(self.head_layers),
        }


def build_classifier(config: ModelConfig, num_classes: int, weights: str | None = None) -> keras.Model:
    """Builds the classifier described by `config`.

    Args:
        config: the model options (backbone, input size, head, regularisation).
        num_classes: number of species, the size of the softmax output.
        weights: initial backbone weights as keras.applications takes them: "imagenet", the path of
            a weights file, or None for a random initialisation (the default).
    """
    backbone_spec = get_backbone(config.modelname)
    if config.image_size < backbone_spec.min_size:
        raise ValueError(
            f"Expected image_size >= {backbone_spec.min_size} for {config.modelname}. "
            f"Received: image_size={config.image_size}"
        )
    if num_classes < 2:
        raise ValueError(f"Expected num_classes >= 2. Received: num_classes={num_classes}")

    inputs = keras.Input((config.image_size, config.image_size, 3), name="image")
    x = BackbonePreprocessing(config.modelname, name="preprocessing")(inputs)
    backbone = backbone_spec.build(x, weights)
    _set_batchnorm_momentum(backbone, config.batchnorm_momentum)
    regularizer = keras.regularizers.L2(config.l2_reg) if config.l2_reg else None
    _regularize_kernels(backbone, regularizer)

    x = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(backbone.output)
    if config.dense_units:
        x = keras.layers.Dropout(config.dropout, name="head_dropout")(x)
        x = keras.layers.Dense(
            config.dense_units, activation="relu", kernel_regularizer=regularizer, name="head_dense"
        )(x)
    x = keras.layers.Dropout(config.dropout, name="predictions_dropout")(x)
    # float32 softmax keeps probabilities calibrated under mixed precision.
    outputs = keras.layers.Dense(
        num_classes,
        activation="softmax",
        kernel_regularizer=regularizer,
        dtype="float32",
        name=OUTPUT_LAYER,
    )(x)
    return keras.Model(inputs, outputs, name=f"seeds_{config.modelname.lower()}")


def with_features(model: keras.Model) -> keras.Model:
    """`model` with its embedding as a first output: (pooled features, probabilities) from one
    forward pass, on the same layers and weights. The keras engine and every export run this, so
    that one pass gives both an answer's probabilities and the embedding its reference specimens
    are searched with."""
    return keras.Model(model.inputs, [model.get_layer(FEATURES_LAYER).output, model.output], name=model.name)


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of the backbone: all but the input, the preprocessing and the head."""
    head_start = [layer.name for layer in model.layers].index(FEATURES_LAYER)
    return [
        layer
        for layer in model.layers[:head_start]
        if not isinstance(layer, (keras.layers.InputLayer, BackbonePreprocessing))
    ]


def head_model(model: keras.Model) -> keras.Model:
    """The head of `model` alone, from pooled backbone features to class probabilities.

    Its layers are the classifier's own, so training the head trains the classifier.
    """
    names = [layer.name for layer in model.layers]
    features = model.get_layer(FEATURES_LAYER).output
    inputs = keras.Input(features.shape[1:], name="features")
    x = inputs
    for layer in model.layers[names.index(FEATURES_LAYER) + 1 :]:
        x = layer(x)
    return keras.Model(inputs, x, name="head")


def save_classifier(model: keras.Model, path: Path) -> None:
    """Saves `model` to `path` (a .keras file) atomically: a crash never leaves half a model.

    Only the architecture and weights are saved: checkpoints are loaded for inference and export,
    and Adam's two moments per weight would triple the file (resuming uses the training backup).
    The same layers in a new, uncompiled functional model carry no optimizer.
    """
    weights_only = keras.Model(model.input, model.output, name=model.name)
    with files.atomic_path(path) as temporary:
        weights_only.save(temporary)


def load_classifier(path: Path) -> keras.Model:
    """Loads a saved classifier for inference. Safe mode refuses Lambda layers and any other
    deserialisation of code, so a run folder cannot run code in the server."""
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def _regularize_kernels(backbone: keras.Model, regularizer: keras.regularizers.Regularizer | None) -> None:
    """Puts the L2 penalty on every kernel of the already built backbone.

    keras.applications offers no regularizer argument, and setting a layer's `kernel_regularizer`
    after it is built does nothing (the original service's bug); a Keras 3 variable's own
    `regularizer` is what the training loss reads.
    """
    for variable in backbone.trainable_weights:
        if variable.name.endswith("kernel"):
            variable.regularizer = regularizer


def _set_batchnorm_momentum(backbone: keras.Model, momentum: float) -> None:
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
