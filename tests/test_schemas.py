"""seeds_tf.service.schemas: the DEEPaaS arguments generated from etc/config.yaml, as marshmallow
fields and as the OpenAPI spec the real DEEPaaS app serves to the Swagger UI."""

import re

import marshmallow
import pytest

from seeds_tf.core.config import RUN_SECTIONS, OptionSpec, option_specs
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from seeds_tf.service import schemas
from tests.deepaas_harness import MODEL_URL, InProcessDeepaas

PREDICTION = option_specs("prediction")
RUN_OPTIONS = {name: spec for section in RUN_SECTIONS for name, spec in option_specs(section).items()}
LIMITED = [spec for spec in {**PREDICTION, **RUN_OPTIONS}.values() if spec.min is not None]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """The OpenAPI spec of the real DEEPaaS app (no run needed to describe the arguments)."""
    base = tmp_path_factory.mktemp("spec")
    with pytest.MonkeyPatch.context() as patch:
        for name in (DATA_ENV, MODELS_ENV):
            (base / name).mkdir()
            patch.setenv(name, str(base / name))
        app = InProcessDeepaas()
        try:
            yield app.request("GET", "/swagger.json").json()
        finally:
            app.close()


def _parameters(spec: dict, operation: str) -> dict[str, dict]:
    return {p["name"]: p for p in spec["paths"][f"{MODEL_URL}/{operation}/"]["post"]["parameters"]}


def _load(arguments: dict, **sent):
    return marshmallow.Schema.from_dict(arguments)().load(sent)


def test_the_prediction_fields_are_the_uploads_the_sources_the_config_options_and_accept():
    names = list(schemas.predict_arguments())
    assert names == [*schemas.UPLOAD_FIELDS, "urls", "data", *PREDICTION, "accept"]


def test_the_training_fields_are_every_run_option_of_the_config_in_its_order():
    assert list(schemas.train_arguments()) == list(RUN_OPTIONS)


@pytest.mark.parametrize(
    ("arguments", "specs"),
    [(schemas.predict_arguments, PREDICTION), (schemas.train_arguments, RUN_OPTIONS)],
    ids=["predict", "train"],
)
def test_an_empty_request_loads_the_config_defaults_as_plain_values(arguments, specs):
    """Plain values, not the unlisted-default str subclass: they are echoed and pickled."""
    loaded = _load(arguments())
    for name, option in specs.items():
        assert loaded[name] == option.default, name
        assert type(loaded[name]) is option.type, name


def test_an_empty_prediction_request_has_no_file_no_url_and_asks_for_json():
    loaded = _load(schemas.predict_arguments())
    assert [loaded[name] for name in (*schemas.UPLOAD_FIELDS, "urls", "data")] == [""] * 6
    assert loaded["accept"] == "application/json"
    assert type(loaded["accept"]) is str


@pytest.mark.parametrize("option", LIMITED, ids=lambda option: option.name)
def test_a_limit_is_enforced_and_spelt_out_in_the_description(option):
    field = schemas.option_field(option)
    number = int if option.type is int else float
    assert field.deserialize(number(option.min)) == option.min
    with pytest.raises(marshmallow.ValidationError):
        field.deserialize(number(option.min) - (1 if option.type is int else 1e-9))
    if option.max is not None:
        assert field.deserialize(number(option.max)) == option.max
        with pytest.raises(marshmallow.ValidationError):
            field.deserialize(number(option.max) + 1)
    assert re.search(r" (From \S+ to \S+|At least \S+)\.$", field.metadata["description"])


@pytest.mark.parametrize(
    ("name", "limits"),
    [
        ("top_k", "From 1 to 1000."),
        ("initial_lr", "From 1e-07 to 1."),
        ("dropout", "From 0 to 0.9."),
        ("seed", "From 0 to 2147483647."),
    ],
)
def test_the_limits_read_as_numbers_a_user_types(name, limits):
    option = {**PREDICTION, **RUN_OPTIONS}[name]
    assert schemas.option_field(option).metadata["description"] == f"{option.help} {limits}"


@pytest.mark.parametrize(
    ("help_text", "rendered"),
    [
        ("Accepts */* as JSON.", r"Accepts \*/\* as JSON."),
        ("A _private_ name, val_fraction as it is.", r"A \_private\_ name, val_fraction as it is."),
        (r"A back\slash.", r"A back\\slash."),
        ("Run `seeds-tf export --serve` (*/*).", r"Run `seeds-tf export --serve` (\*/\*)."),
    ],
)
def test_markdown_characters_of_a_help_text_are_escaped_outside_code(help_text, rendered):
    """The Swagger UI renders descriptions as Markdown: `*/*` showed as an italic "/"."""
    option = OptionSpec(name="x", type=str, default="a", help=help_text)
    assert schemas.option_field(option).metadata["description"] == rendered


def test_a_choice_outside_the_list_is_refused():
    with pytest.raises(marshmallow.ValidationError, match="Must be one of: none, flip, ten_crop"):
        schemas.option_field(PREDICTION["tta"]).deserialize("sideways")


def test_no_argument_shows_an_empty_or_null_default_in_the_spec(spec):
    """The Swagger UI showed "Default value :" with nothing after it, and "null" under each file."""
    for operation in ("predict", "train"):
        for parameter in _parameters(spec, operation).values():
            assert parameter.get("default", "listed") not in ("", None), parameter


def test_the_spec_lists_the_config_defaults_limits_and_choices(spec):
    predict, train = _parameters(spec, "predict"), _parameters(spec, "train")
    assert predict["top_k"]["default"] == 5
    assert (predict["top_k"]["minimum"], predict["top_k"]["maximum"]) == (1, 1000)
    assert predict["top_k"]["description"].endswith("From 1 to 1000.")
    assert predict["tta"]["enum"] == list(PREDICTION["tta"].choices)
    assert "default" not in predict["timestamp"]
    assert train["epochs"]["type"] == "integer"
    assert train["mode"]["enum"] == ["normal", "fast"]
    assert "default" not in train["resume"]
    assert {p["in"] for name, p in predict.items() if name in schemas.UPLOAD_FIELDS} == {"formData"}


def test_the_photos_urls_and_data_uris_go_in_the_form_body(spec):
    """In the query string, the Swagger UI sent a data URI in the URL, and one over aiohttp's 8 KB
    limit got a plain-text 400 before seeds_tf could answer."""
    predict = _parameters(spec, "predict")
    assert {predict[name]["in"] for name in (*schemas.UPLOAD_FIELDS, "urls", "data")} == {"formData"}


def test_the_accept_field_leaves_the_answer_type_to_the_ui_selector_unless_chosen(spec):
    """With a listed default, the field was always sent and the "Response content type" selector
    did nothing; `*/*`, which DEEPaaS adds, stays in the selector (produces) and out of the list."""
    accept = _parameters(spec, "predict")["accept"]
    assert accept["in"] == "header"
    assert "default" not in accept
    assert accept["enum"] == ["application/json", "image/png"]
    assert "Response content type" in accept["description"]
    assert '`{"message": "<field>: <problem>", "field": "<field>"}`' in accept["description"]
    produces = spec["paths"][f"{MODEL_URL}/predict/"]["post"]["produces"]
    assert produces == ["application/json", "image/png", "*/*"]


def test_deepaas_cli_gets_plain_string_defaults():
    """deepaas-cli passes a field's default on as it is (without calling it)."""
    for name, field in schemas.predict_arguments().items():
        if name in (*schemas.UPLOAD_FIELDS, "urls", "data", "timestamp"):
            assert isinstance(field.load_default, str) and field.load_default == "", name
