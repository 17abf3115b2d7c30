"""The config: one YAML source of truth, loaded into frozen, validated objects."""

import dataclasses

import pytest
import yaml

from seeds_tf.classifier.backbones import BACKBONES
from seeds_tf.core import config
from seeds_tf.core.errors import InputError


def test_defaults_match_the_original_service():
    model = config.load(config.ModelConfig)
    training = config.load(config.TrainConfig)
    assert model.modelname == "Xception"
    assert model.image_size == 224
    assert (training.batch_size, training.epochs, training.initial_lr) == (16, 15, 0.001)
    assert config.load(config.PredictConfig).top_k == 5


def test_overrides_make_a_new_object_and_leave_the_defaults_alone():
    custom = config.load(config.PredictConfig, top_k=3, timestamp="2026-01-01_000000")
    assert custom.top_k == 3
    assert config.load(config.PredictConfig).top_k == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        custom.top_k = 7


@pytest.mark.parametrize(
    ("overrides", "field", "problem"),
    [
        ({"top_k": 0}, "top_k", ">= 1"),
        ({"top_k": -1}, "top_k", ">= 1"),
        ({"top_k": 1001}, "top_k", "<= 1000"),
        ({"top_k": "5"}, "top_k", "expected a int"),
        ({"top_k": True}, "top_k", "expected a int"),
        ({"timestamp": 3}, "timestamp", "expected a str"),
        ({"colour": "red"}, "colour", "unknown prediction option"),
    ],
)
def test_bad_prediction_options_are_refused_with_the_field_named(overrides, field, problem):
    with pytest.raises(InputError) as raised:
        config.load(config.PredictConfig, **overrides)
    assert raised.value.field == field
    assert problem in raised.value.problem


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": -3}, "epochs"),
        ({"modelname": "AlexNet"}, "modelname"),
        ({"mode": "slow"}, "mode"),
        ({"initial_lr": 0.0}, "initial_lr"),
        ({"use_validation": "true"}, "use_validation"),
        ({"dropout": 1.5}, "dropout"),
        ({"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_bad_training_options_are_refused(overrides, field):
    with pytest.raises(InputError) as raised:
        config.RunConfig.from_options(**overrides)
    assert raised.value.field == field


def test_ints_are_accepted_for_float_options_and_stored_as_floats():
    training = config.load(config.TrainConfig, initial_lr=1)
    assert training.initial_lr == 1.0
    assert isinstance(training.initial_lr, float)


def test_run_config_round_trips_through_its_dict():
    run = config.RunConfig.from_options(epochs=3, image_size=96, weights="none")
    assert config.RunConfig.from_dict(run.to_dict()) == run


def test_backbone_choices_are_exactly_the_registry():
    assert set(config.option_specs("model")["modelname"].choices) == set(BACKBONES)


def test_every_option_has_help_and_a_valid_default():
    for section in ("model", "training", "prediction"):
        for spec in config.option_specs(section).values():
            assert len(spec.help) > 10, spec.name
            assert spec.check(spec.default) == spec.default


def _write_config(tmp_path, monkeypatch, mutate):
    raw = yaml.safe_load(config.config_path().read_text())
    mutate(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv(config.CONFIG_ENV, str(path))


def test_a_custom_config_file_changes_the_defaults(tmp_path, monkeypatch):
    _write_config(tmp_path, monkeypatch, lambda raw: raw["prediction"]["top_k"].update(value=3))
    assert config.load(config.PredictConfig).top_k == 3


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw["prediction"]["top_k"].update(value=0), "Invalid default"),
        (lambda raw: raw["prediction"]["top_k"].update(type="float"), "expects int"),
        (lambda raw: raw["prediction"]["top_k"].pop("help"), "Expected value, type and help"),
        (lambda raw: raw["prediction"]["top_k"].update(typo=1), "Unknown keys"),
        (lambda raw: raw["prediction"].pop("top_k"), "missing ['top_k']"),
        (lambda raw: raw["training"]["epochs"].update(type="list"), "Expected type"),
        (lambda raw: raw.pop("model"), "Expected a 'model' section"),
    ],
)
def test_a_broken_config_file_is_refused_with_a_clear_message(tmp_path, monkeypatch, mutate, message):
    _write_config(tmp_path, monkeypatch, mutate)
    with pytest.raises(ValueError) as raised:
        config.load(config.PredictConfig)
    assert message in str(raised.value)


def test_demo_overrides_are_valid_options():
    synthetic_args, overrides = config.demo_settings()
    run = config.RunConfig.from_options(**overrides)
    assert run.model.weights == "none"
    assert synthetic_args["images_per_class"] >= 3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_float_option_outside_its_range_is_refused_even_when_not_a_number(value):
    """NaN compares False with every bound; it must not slip through a range check."""
    with pytest.raises(InputError) as raised:
        config.load(config.TrainConfig, val_fraction=value)
    assert raised.value.field == "val_fraction"
