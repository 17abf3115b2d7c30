"""The registry of backbones: keras.applications architectures by name.

Each entry knows its constructor, its own ImageNet preprocessing and the smallest input it accepts,
so a run config that names a backbone fully determines how images are prepared for it.
"""

from __future__ import annotations

import dataclasses
import importlib

import keras

IMAGENET_SIZE = 224
"""An input side at which every registered backbone loads its ImageNet weights without a warning
(MobileNet's weights ask for 128 to 224; the others load at any side)."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One keras.applications architecture.

    Attributes:
        name: the name users give (`modelname`), also the keras.applications constructor.
        module: the keras.applications submodule whose `preprocess_input` prepares RGB 0-255 images.
        min_size: smallest square input side the architecture accepts.
    """

    name: str
    module: str
    min_size: int

    def preprocess(self, images):
        """The backbone's own preprocessing of RGB images in [0, 255] (identity for those that
        carry it inside, like EfficientNetV2 and MobileNetV3)."""
        module = importlib.import_module(f"keras.applications.{self.module}")
        return module.preprocess_input(images)

    def fetch_imagenet_weights(self) -> None:
        """Puts the ImageNet weights into Keras' cache (~/.keras/models), where `build` finds
        them, downloading them the first time (the backbone is built once at IMAGENET_SIZE).

        Raises:
            Exception: the bare one Keras' download raises when the file cannot be fetched.
        """
        self.build(keras.Input((IMAGENET_SIZE, IMAGENET_SIZE, 3)), "imagenet")

    def build(self, input_tensor, weights: str | None) -> keras.Model:
        """The architecture without its top, built on `input_tensor` so its layers join the caller's
        graph (a flat model, as the original seeds model was)."""
        constructor = getattr(keras.applications, self.name)
        return constructor(include_top=False, weights=weights, input_tensor=input_tensor)


BACKBONES: dict[str, Backbone] = {
    backbone.name: backbone
    for backbone in (
        Backbone("Xception", "xception", 71),
        Backbone("EfficientNetV2B0", "efficientnet_v2", 32),
        Backbone("EfficientNetV2B1", "efficientnet_v2", 32),
        Backbone("EfficientNetV2B2", "efficientnet_v2", 32),
        Backbone("EfficientNetV2B3", "efficientnet_v2", 32),
        Backbone("EfficientNetV2S", "efficientnet_v2", 32),
        Backbone("ResNet50", "resnet", 32),
        Backbone("InceptionV3", "inception_v3", 75),
        Backbone("MobileNetV3Small", "mobilenet_v3", 32),
        Backbone("MobileNetV3Large", "mobilenet_v3", 32),
        Backbone("DenseNet121", "densenet", 32),
        # The rest of the original service's backbones.
        Backbone("DenseNet169", "densenet", 32),
        Backbone("DenseNet201", "densenet", 32),
        Backbone("InceptionResNetV2", "inception_resnet_v2", 75),
        Backbone("MobileNet", "mobilenet", 32),
        Backbone("NASNetMobile", "nasnet", 32),
        Backbone("VGG16", "vgg16", 32),
        Backbone("VGG19", "vgg19", 32),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"Expected a backbone in {sorted(BACKBONES)}. Received: {name!r}") from None
