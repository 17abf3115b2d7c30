"""The table of engines: every list of engine, format and precision names derives from it, and
the CPU flags are read from /proc/cpuinfo's text. Loading each engine from a real run's exports is
in tests/test_export.py, the choice of `auto` in tests/test_engine_choice.py."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from seeds_tf import cli
from seeds_tf.classifier import engines
from seeds_tf.core import config
from seeds_tf.core.errors import InputError
from seeds_tf.prediction import inference


def _export_flags() -> dict[str, tuple[str, ...]]:
    """The choices of `seeds-tf export`'s flags, as its parser has them."""
    commands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: tuple(action.choices or ()) for action in commands.choices["export"]._actions}


def test_every_export_has_a_file_of_its_own():
    paths = [spec.path(Path("exports")) for spec in engines.EXPORTS]
    assert len(set(paths)) == len(engines.EXPORTS)
    for fmt in engines.FORMATS:
        assert len({spec.suffix for spec in engines.EXPORTS if spec.format == fmt}) == 1


@pytest.mark.parametrize("spec", engines.EXPORTS, ids=lambda spec: spec.name)
def test_an_export_is_named_by_its_format_and_precision(spec):
    assert spec.name == f"{spec.format}_{spec.precision}"
    assert engines.export_spec(spec.format, spec.precision) is spec


def test_the_table_is_read_without_tensorflow():
    """The CLI builds its choices from the table at start-up, also for `seeds-tf healthcheck`."""
    script = "import sys, seeds_tf.cli; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_keras_is_the_one_engine_without_an_export():
    assert [spec.name for spec in engines.SPECS if not spec.exported] == ["keras"]
    assert engines.ENGINES[0] == "keras"


def test_the_export_command_choices_are_the_table():
    flags = _export_flags()
    assert flags["format"] == engines.FORMATS
    assert flags["precision"] == engines.PRECISIONS
    offered = {(fmt, precision) for fmt in flags["format"] for precision in flags["precision"]}
    for fmt, precision in offered - {(spec.format, spec.precision) for spec in engines.EXPORTS}:
        with pytest.raises(InputError):
            engines.export_spec(fmt, precision)


def test_every_engine_can_be_asked_for_by_name_in_a_request():
    assert config.option_specs("prediction")["engine"].choices == ("auto", *engines.ENGINES)


def test_an_unknown_engine_is_refused_with_the_table_s_names():
    with pytest.raises(InputError) as unknown:
        engines.engine_spec("coreml_fp16")
    assert unknown.value.field == "engine"
    assert "'coreml_fp16'" in unknown.value.problem
    assert all(f"'{name}'" in unknown.value.problem for name in engines.ENGINES)


def test_an_export_for_other_servers_is_not_an_engine():
    assert not engines.export_spec("savedmodel").serves
    with pytest.raises(InputError, match="expected one of"):
        engines.engine_spec("savedmodel_fp32")


def test_bad_export_requests_are_refused():
    with pytest.raises(InputError, match="onnx exports in"):
        engines.export_spec("onnx", "bf16")
    with pytest.raises(InputError, match="unknown format"):
        engines.export_spec("coreml")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx512f avx512_bf16 amx_tile", True),
        ("fpu avx512f amx_bf16 amx_tile", True),
        ("fpu avx2 fma avx512f avx512_vnni", False),
    ],
)
def test_bf16_support_is_read_from_the_cpu_flags(flags, expected):
    cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert engines.cpu_flags(cpuinfo) == frozenset(flags.split())
    assert engines.engine_spec("savedmodel_bf16").runs_natively(engines.cpu_flags(cpuinfo)) is expected


def test_a_named_export_that_does_not_load_is_refused_naming_it(tmp_path):
    """engine=tflite_fp32 on a run whose export is truncated (here empty) answered 500 with the
    runtime's 'The model is not a valid Flatbuffer buffer'; it is refused, naming the export and
    how to make it again. The export fails before the model is needed: the run has none here."""
    exports = tmp_path / "exports"
    exports.mkdir()
    engines.engine_spec("tflite_fp32").path(exports).touch()
    run = inference.LoadedRun("2026-11-30_000000", "final", None, None, ("a", "b"), None, exports)
    with pytest.raises(InputError) as refused:
        run.engine("tflite_fp32")
    assert refused.value.field == "engine"
    assert "run 2026-11-30_000000's tflite_fp32 export does not load here" in refused.value.problem
    assert "seeds-tf export 2026-11-30_000000 --format tflite --precision fp32" in refused.value.problem
