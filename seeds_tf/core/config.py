"""Typed, immutable configuration, loaded from `etc/config.yaml`.

The YAML file is the single source of truth: for every option it gives the default, the type, the help
text and the allowed values. The frozen dataclasses here carry the options through the code; the
DEEPaaS arguments (`seeds_tf.api`) and the CLI flags (`seeds_tf.cli`) are generated from the same
`OptionSpec`s. Overrides always produce a new object, so one request's arguments never leak into another.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from seeds_tf.core.errors import InputError

CONFIG_ENV = "SEEDS_TF_CONFIG"
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
_SPEC_KEYS = {"value", "type", "help", "choices", "min", "max"}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option of config.yaml: its default, type, help and allowed values."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None

    def check(self, value: Any) -> Any:
        """Returns `value` (ints promoted to float for float options) or raises InputError: of the
        option's type, and within its limits (choices, min, max)."""
        value = self.check_type(value)
        if self.choices is not None and value not in self.choices:
            raise InputError(self.name, f"expected one of {list(self.choices)}. Received: {value!r}")
        # Written as "not within" so that NaN, which compares False with everything, is refused.
        if self.min is not None and not value >= self.min:
            raise InputError(self.name, f"expected >= {self.min}. Received: {value!r}")
        if self.max is not None and not value <= self.max:
            raise InputError(self.name, f"expected <= {self.max}. Received: {value!r}")
        return value

    def check_type(self, value: Any) -> Any:
        """Returns `value` (ints promoted to float for float options) or raises InputError: of the
        option's type, whatever its limits."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # bool is a subclass of int: `True` must not pass as an int option.
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise InputError(self.name, f"expected a {self.type.__name__}. Received: {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What defines the network: saved with each run and reloaded for inference."""

    modelname: str
    image_size: int
    weights: str
    dense_units: int
    dropout: float
    l2_reg: float
    batchnorm_momentum: float

    def __post_init__(self):
        _check_fields(self, "model")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a run is trained: data, schedule and regularisation."""

    images_directory: str
    splits_directory: str
    val_fraction: float
    test_fraction: float
    mode: str
    epochs: int
    batch_size: int
    initial_lr: float
    lr_schedule: str
    backbone_lr_factor: float
    use_validation: bool
    use_class_weights: bool
    label_smoothing: float
    use_early_stopping: bool
    early_stopping_patience: int
    ckpt_freq: int
    keep_checkpoints: int
    augment: bool
    mixed_precision: str
    run_eagerly: bool
    resume: str
    seed: int
    upload_to: str
    target_precision: float
    calibration_fraction: float

    def __post_init__(self):
        _check_fields(self, "training")


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """Strength of each random change applied to training images (0 or False turns it off)."""

    flip: bool
    rotation: float
    zoom: float
    contrast: float
    brightness: float
    saturation: float
    noise: float
    blur: float
    cutout: float

    def __post_init__(self):
        _check_fields(self, "augmentation")


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Options of one prediction request."""

    top_k: int
    timestamp: str
    ckpt_name: str
    merge: bool
    tta: str
    engine: str
    neighbours: int
    species_threshold: float
    genus_threshold: float

    def __post_init__(self):
        _check_fields(self, "prediction")


_SECTION_OF = {
    ModelConfig: "model",
    TrainConfig: "training",
    AugmentationConfig: "augmentation",
    PredictConfig: "prediction",
}
_CLASS_OF = {section: config_class for config_class, section in _SECTION_OF.items()}
Config = TypeVar("Config", ModelConfig, TrainConfig, AugmentationConfig, PredictConfig)
RUN_SECTIONS = ("model", "training", "augmentation")
"""The sections of config.yaml that define a training run (and its DEEPaaS train arguments)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; written to `conf/conf.json` of the run."""

    model: ModelConfig
    training: TrainConfig
    augmentation: AugmentationConfig

    @classmethod
    def from_options(cls, **overrides: Any) -> RunConfig:
        """Defaults of config.yaml with flat overrides of model, training and augmentation options."""
        known = {name for section in RUN_SECTIONS for name in option_specs(section)}
        unknown = set(overrides) - known
        if unknown:
            raise InputError(sorted(unknown)[0], "unknown training option")
        sections = {
            section: {k: v for k, v in overrides.items() if k in option_specs(section)}
            for section in RUN_SECTIONS
        }
        return cls(**{section: load(_CLASS_OF[section], **values) for section, values in sections.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {section: dataclasses.asdict(getattr(self, section)) for section in RUN_SECTIONS}

    def check_resume_of(self, own: RunConfig) -> None:
        """Refuses options of a resume (`self`) that the resumed run, which trains with its own
        configuration (`own`), would ignore: `resume=X&epochs=50` trained X's epochs, and the
        answer echoed `epochs: 50`. An option at its default (the Swagger UI sends them all) or at
        the run's own value is no mistake.

        Raises:
            InputError: naming the first option (in config.yaml's order) with another value.
        """
        asked, kept = self.to_dict(), own.to_dict()
        run_id = self.training.resume
        for section in RUN_SECTIONS:
            for name, spec in option_specs(section).items():
                value = asked[section][name]
                if name != "resume" and value not in (spec.default, kept[section][name]):
                    problem = (
                        f"resume={run_id} continues that run with its own {name}, {kept[section][name]!r}: "
                        f"{value!r} would be ignored; leave {name} out, or start a new run"
                    )
                    raise InputError(name, problem)

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> RunConfig:
        """Reads a saved run config; options added since it was saved take their defaults.

        Its values are checked for their types, not against the limits of the configuration file in
        use: those are for new requests, and a run made under other limits stays a run.
        """
        return cls(
            **{section: _saved(_CLASS_OF[section], **data.get(section, {})) for section in RUN_SECTIONS}
        )


def config_path() -> Path:
    """The YAML file in use: `$SEEDS_TF_CONFIG` or the copy shipped in the package."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override)
    return Path(str(importlib.resources.files("seeds_tf.core").joinpath("config.yaml")))


def option_specs(section: str) -> dict[str, OptionSpec]:
    """The options of one section ("model", "training" or "prediction") of the config in use."""
    return _read_specs(config_path())[section]


def load(config_class: type[Config], **overrides: Any) -> Config:
    """An instance of `config_class` with the YAML defaults and the given overrides, validated
    against the limits of the configuration file in use: the options of a new request."""
    specs = option_specs(_SECTION_OF[config_class])
    values = _with_defaults(config_class, overrides)
    return config_class(**{name: specs[name].check(value) for name, value in values.items()})


def demo_settings() -> tuple[dict[str, Any], dict[str, Any]]:
    """The demo run's synthetic-dataset arguments and its option overrides."""
    demo = _read_yaml(config_path())["demo"]
    return dict(demo["synthetic"]), dict(demo["options"])


def _saved(config_class: type[Config], **values: Any) -> Config:
    """A section of a saved run's config: typed, whatever the limits of the configuration in use."""
    return config_class(**_with_defaults(config_class, values))


def _with_defaults(config_class: type[Config], overrides: dict[str, Any]) -> dict[str, Any]:
    """The YAML defaults of `config_class`'s section with `overrides`.

    Raises:
        InputError: naming the first option that the section does not have.
    """
    section = _SECTION_OF[config_class]
    specs = option_specs(section)
    unknown = set(overrides) - set(specs)
    if unknown:
        raise InputError(sorted(unknown)[0], f"unknown {section} option")
    return {name: spec.default for name, spec in specs.items()} | overrides


def _check_fields(config: Any, section: str) -> None:
    """Every instance holds values of its options' types; the limits are checked by `load`."""
    specs = option_specs(section)
    for field in dataclasses.fields(config):
        checked = specs[field.name].check_type(getattr(config, field.name))
        # Frozen: the float promotion of an int has to bypass __setattr__.
        object.__setattr__(config, field.name, checked)


@functools.lru_cache(maxsize=4)
def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as stream:
        return yaml.safe_load(stream)


@functools.lru_cache(maxsize=4)
def _read_specs(path: Path) -> dict[str, dict[str, OptionSpec]]:
    """Parses and cross-checks the option specs against the dataclasses, once per file."""
    raw = _read_yaml(path)
    specs = {}
    for config_class, section in _SECTION_OF.items():
        if section not in raw:
            raise ValueError(f"Expected a '{section}' section in {path}.")
        specs[section] = {name: _parse_spec(name, entry, path) for name, entry in raw[section].items()}
        _check_matches_dataclass(config_class, specs[section], path)
    return specs


def _parse_spec(name: str, entry: Mapping[str, Any], path: Path) -> OptionSpec:
    where = f"option '{name}' of {path}"
    if not isinstance(entry, Mapping) or not {"value", "type", "help"} <= set(entry):
        raise ValueError(f"Expected value, type and help for {where}. Received: {entry!r}")
    if set(entry) - _SPEC_KEYS:
        raise ValueError(f"Unknown keys {sorted(set(entry) - _SPEC_KEYS)} for {where}.")
    if entry["type"] not in _TYPES:
        raise ValueError(f"Expected type in {sorted(_TYPES)} for {where}. Received: {entry['type']!r}")
    spec = OptionSpec(
        name=name,
        type=_TYPES[entry["type"]],
        default=None,
        help=" ".join(str(entry["help"]).split()),
        choices=tuple(entry["choices"]) if "choices" in entry else None,
        min=entry.get("min"),
        max=entry.get("max"),
    )
    try:
        default = spec.check(entry["value"])
    except InputError as error:
        raise ValueError(f"Invalid default for {where}: {error.problem}") from None
    return dataclasses.replace(spec, default=default)


def _check_matches_dataclass(config_class: type, specs: Mapping[str, OptionSpec], path: Path) -> None:
    hints = typing.get_type_hints(config_class)
    if set(hints) != set(specs):
        raise ValueError(
            f"Options of {path} do not match {config_class.__name__}: "
            f"missing {sorted(set(hints) - set(specs))}, unexpected {sorted(set(specs) - set(hints))}."
        )
    for name, spec in specs.items():
        if hints[name] is not spec.type:
            raise ValueError(
                f"Option '{name}' of {path} has type {spec.type.__name__}, "
                f"but {config_class.__name__} expects {hints[name].__name__}."
            )
