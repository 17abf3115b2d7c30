"""The shared classifier: built by name, saved and loaded exactly, safe to load."""

import dataclasses

import keras
import numpy as np
import pytest

from seeds_tf.classifier.backbones import BACKBONES
from seeds_tf.classifier.model import (
    BackboneScaledAdam,
    backbone_layers,
    build_classifier,
    load_classifier,
    save_classifier,
)
from seeds_tf.core import config

TINY = config.load(config.ModelConfig, image_size=71, dense_units=16, weights="none")
IMAGES = np.random.default_rng(0).uniform(0, 255, (3, 71, 71, 3)).astype("float32")


def test_save_and_load_give_identical_outputs(tmp_path):
    model = build_classifier(TINY, num_classes=5)
    expected = model.predict_on_batch(IMAGES)
    save_classifier(model, tmp_path / "ckpts" / "final.keras")
    loaded = load_classifier(tmp_path / "ckpts" / "final.keras")
    np.testing.assert_array_equal(loaded.predict_on_batch(IMAGES), expected)
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == ["final.keras"]
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-5)


def test_a_checkpoint_of_a_trained_model_holds_no_optimizer_state(tmp_path):
    model = build_classifier(TINY, num_classes=5)
    # One step, eagerly: tracing Xception's training graph would cost 20 s.
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    model.fit(IMAGES, np.arange(3), epochs=1, verbose=0)
    assert model.optimizer.variables  # Adam's moments: twice the weights
    save_classifier(model, tmp_path / "final.keras")

    weights_bytes = sum(weight.nbytes for weight in model.get_weights())
    assert (tmp_path / "final.keras").stat().st_size < 1.1 * weights_bytes
    loaded = load_classifier(tmp_path / "final.keras")
    assert loaded.name == model.name
    assert (loaded.input.shape, loaded.output.shape) == ((None, 71, 71, 3), (None, 5))
    # Through the same (traced) path as the loaded model: the eager one may round differently.
    trained = keras.Model(model.input, model.output)
    np.testing.assert_array_equal(loaded.predict_on_batch(IMAGES), trained.predict_on_batch(IMAGES))


def test_the_model_carries_the_backbone_preprocessing():
    model = build_classifier(TINY, num_classes=3)
    preprocessed = model.get_layer("preprocessing")(IMAGES)
    expected = keras.applications.xception.preprocess_input(IMAGES.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(preprocessed), expected, atol=1e-6)


def test_the_head_is_the_original_seeds_head():
    model = build_classifier(dataclasses.replace(TINY, dense_units=1024), num_classes=7)
    assert model.get_layer("head_dense").units == 1024
    assert model.get_layer("head_dense").activation.__name__ == "relu"
    assert model.get_layer("predictions").units == 7
    assert isinstance(model.get_layer("avg_pool"), keras.layers.GlobalAveragePooling2D)
    assert model.get_layer("head_dense").kernel_regularizer.l2 == pytest.approx(TINY.l2_reg)


def test_batchnorm_momentum_is_applied_to_every_batchnorm_layer():
    model = build_classifier(dataclasses.replace(TINY, batchnorm_momentum=0.8), num_classes=3)
    momenta = {layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.8}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_builds_a_classifier(name):
    size = max(BACKBONES[name].min_size, 32)
    model_config = config.load(
        config.ModelConfig, modelname=name, image_size=size, dense_units=8, weights="none"
    )
    model = build_classifier(model_config, num_classes=4)
    assert model.output_shape == (None, 4)
    assert backbone_layers(model), name
    # Called eagerly: tracing a graph per backbone would cost seconds each.
    probabilities = keras.ops.convert_to_numpy(model(np.full((1, size, size, 3), 128.0, dtype="float32")))
    np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-5)


def test_too_small_an_input_for_the_backbone_is_refused():
    with pytest.raises(ValueError, match="image_size >= 71"):
        build_classifier(dataclasses.replace(TINY, image_size=64), num_classes=3)


def test_the_backbone_learns_at_a_fraction_of_the_head_rate():
    """Adam's first step moves every weight by about the learning rate, so the largest change of a
    backbone weight shows the rate it was updated with."""
    keras.utils.set_random_seed(0)
    model = build_classifier(TINY, num_classes=2)
    model.compile(
        optimizer=BackboneScaledAdam(backbone_lr_factor=0.1, learning_rate=1e-3),
        loss="sparse_categorical_crossentropy",
        run_eagerly=True,  # one step: tracing Xception's training graph would cost 20 s
    )
    before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.trainable_variables}
    model.train_on_batch(IMAGES[:2], np.array([0, 1]))
    change = {
        v.path: np.abs(keras.ops.convert_to_numpy(v) - before[v.path]).max()
        for v in model.trainable_variables
    }
    assert change["block1_conv1/kernel"] == pytest.approx(1e-4, rel=0.05)
    assert change["block14_sepconv2/pointwise_kernel"] == pytest.approx(1e-4, rel=0.05)
    assert change["predictions/kernel"] == pytest.approx(1e-3, rel=0.05)
    assert change["head_dense/kernel"] == pytest.approx(1e-3, rel=0.05)


def test_loading_refuses_a_model_that_would_run_code(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "evil.keras")
    with pytest.raises(ValueError, match="unsafe"):
        load_classifier(tmp_path / "evil.keras")
