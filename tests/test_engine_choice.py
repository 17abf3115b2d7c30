"""The engine `engine=auto` runs: measured among keras and the run's agreeing exports on the CPU
that serves, cached per CPU signature. The exports here are fake engines handed to the measurement
through its loader (one that sleeps, one that answers at once) beside the real keras engine of a
small model, so that the test shows the timing decides, not the table."""

import time

import numpy as np
import pytest

from seeds_tf.classifier import engine_choice, engines
from seeds_tf.classifier.model import build_classifier
from seeds_tf.core import config, runs
from seeds_tf.prediction import export

SIZE = 32
AVX2_CPU = frozenset({"fpu", "avx2", "fma"})
BF16_CPU = frozenset({"fpu", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})


class _FakeExport:
    """An export that answers after `delay` seconds (uniform probabilities)."""

    def __init__(self, name: str, delay: float):
        self.name = name
        self._delay = delay

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self._delay)
        return np.full((len(batch), 8), 1 / 8, np.float32)


@pytest.fixture(scope="module")
def keras_engine() -> engines.Engine:
    """The real keras engine of a small model, loaded once: each measurement gets it from its loader."""
    options = {"modelname": "MobileNetV3Small", "image_size": SIZE, "dense_units": 8, "weights": "none"}
    return engines.load_engine("keras", build_classifier(config.load(config.ModelConfig, **options), 8), None)


def _exports(tmp_path, agreements: dict[str, float]) -> runs.RunLayout:
    """A run's exports/ folder whose exports.json records these agreements, with (empty) export files."""
    layout = runs.RunLayout(tmp_path / "2026-11-30_000000")
    for name, agreement in agreements.items():
        path = engines.engine_spec(name).path(layout.exports_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.suffix == "" else path.touch()
        export.record_export(layout, name, {"agreement_top1": agreement})
    return layout


class _Loader:
    """The real keras engine and fake exports answering after these delays, by name; counts what it loads."""

    def __init__(self, keras_engine: engines.Engine, delays: dict[str, float]):
        self._keras = keras_engine
        self._delays = delays
        self.loaded: list[str] = []

    def __call__(self, name: str) -> engines.Engine:
        self.loaded.append(name)
        return self._keras if name == "keras" else _FakeExport(name, self._delays[name])


@pytest.mark.parametrize(("delay", "expected"), [(0.05, "keras"), (0.0, "tflite_fp32")])
def test_the_measurement_decides(tmp_path, keras_engine, delay, expected):
    layout = _exports(tmp_path, {"tflite_fp32": 1.0})
    load = _Loader(keras_engine, {"tflite_fp32": delay})
    choice = engine_choice.choose_engine(layout.exports_dir, load, SIZE, flags=AVX2_CPU, signature="a")
    assert choice.engine == expected
    assert choice.reason == "measured"
    assert choice.candidates == ("keras", "tflite_fp32")
    assert set(choice.ms) == {"keras", "tflite_fp32"}
    assert min(choice.ms, key=lambda name: choice.ms[name]["batch_1"]) == expected  # the fastest
    if delay:
        assert choice.ms["tflite_fp32"]["batch_1"] >= 1000 * delay


def test_an_export_that_does_not_load_is_left_out(tmp_path, keras_engine, caplog):
    """A truncated export (here an empty file, loaded by the real TFLite loader) made every request
    for engine=auto fail ('The model is not a valid Flatbuffer buffer'): keras serves instead."""
    layout = _exports(tmp_path, {"tflite_fp32": 1.0})

    def load(name: str) -> engines.Engine:
        return keras_engine if name == "keras" else engines.load_engine(name, None, layout.exports_dir)

    choice = engine_choice.choose_engine(
        layout.exports_dir, load, SIZE, flags=AVX2_CPU, signature="a", rounds=1
    )
    assert (choice.engine, choice.candidates, set(choice.ms)) == (
        "keras",
        ("keras", "tflite_fp32"),
        {"keras"},
    )
    assert "engine=auto leaves out tflite_fp32" in caplog.text


def test_the_choice_is_cached_per_cpu_signature(tmp_path, keras_engine):
    layout = _exports(tmp_path, {"tflite_fp32": 1.0})
    load = _Loader(keras_engine, {"tflite_fp32": 0.0})
    choose = {"load": load, "image_size": SIZE, "flags": AVX2_CPU, "rounds": 1}
    first = engine_choice.choose_engine(layout.exports_dir, signature="a", **choose)
    assert load.loaded == ["keras", "tflite_fp32"]
    again = engine_choice.choose_engine(layout.exports_dir, signature="a", **choose)
    assert load.loaded == ["keras", "tflite_fp32"]  # not measured again
    assert again == first
    engine_choice.choose_engine(layout.exports_dir, signature="b", **choose)
    assert load.loaded == ["keras", "tflite_fp32"] * 2  # another kind of machine measures
    cached = engine_choice._read_choices(layout.exports_dir)
    assert set(cached) == {"a", "b"}
    assert cached["a"]["engine"] == first.engine

    export.record_export(layout, "onnx_fp32", {"agreement_top1": 1.0})
    engines.engine_spec("onnx_fp32").path(layout.exports_dir).touch()
    assert engine_choice.recorded_choice(layout.exports_dir, AVX2_CPU, "a") is None  # a new candidate
    load = _Loader(keras_engine, {"tflite_fp32": 0.0, "onnx_fp32": 0.05})
    choose["load"] = load
    renewed = engine_choice.choose_engine(layout.exports_dir, **choose, signature="a")
    assert load.loaded == ["keras", "tflite_fp32", "onnx_fp32"]
    assert renewed.candidates == ("keras", "tflite_fp32", "onnx_fp32")
    remeasured = engine_choice.choose_engine(layout.exports_dir, **choose, signature="a", remeasure=True)
    assert load.loaded == ["keras", "tflite_fp32", "onnx_fp32"] * 2  # seeds-tf export --serve
    assert remeasured.engine == "tflite_fp32"


def test_a_choice_that_cannot_be_recorded_is_measured_once_per_process(tmp_path, keras_engine):
    """A read-only models volume: the process that measured keeps its choice (`remembered`) while
    its CPU signature and candidates are the run's, instead of measuring at every request."""
    layout = _exports(tmp_path, {"tflite_fp32": 1.0})
    (layout.exports_dir / engine_choice.CHOICE_FILE).mkdir()  # not writable as a file, even by root
    load = _Loader(keras_engine, {"tflite_fp32": 0.0})
    choose = {"load": load, "image_size": SIZE, "flags": AVX2_CPU, "rounds": 1}
    first = engine_choice.choose_engine(layout.exports_dir, signature="a", **choose)
    assert engine_choice.recorded_choice(layout.exports_dir, AVX2_CPU, "a") is None  # not recorded
    again = engine_choice.choose_engine(layout.exports_dir, signature="a", remembered=first, **choose)
    assert again == first
    assert load.loaded == ["keras", "tflite_fp32"]  # not measured again
    engine_choice.choose_engine(layout.exports_dir, signature="b", remembered=first, **choose)
    assert load.loaded == ["keras", "tflite_fp32"] * 2  # not on another kind of machine

    export.record_export(layout, "onnx_fp32", {"agreement_top1": 1.0})
    engines.engine_spec("onnx_fp32").path(layout.exports_dir).touch()
    load = _Loader(keras_engine, {"tflite_fp32": 0.0, "onnx_fp32": 0.0})
    renewed = engine_choice.choose_engine(
        layout.exports_dir, signature="a", remembered=first, **choose | {"load": load}
    )
    assert load.loaded == ["keras", "tflite_fp32", "onnx_fp32"]  # a new candidate is measured
    assert renewed.candidates == ("keras", "tflite_fp32", "onnx_fp32")


def test_only_keras_is_not_measured(tmp_path, keras_engine):
    layout = _exports(tmp_path, {"tflite_int8": 0.975})  # below the bar
    load = _Loader(keras_engine, {})
    choice = engine_choice.choose_engine(layout.exports_dir, load, SIZE, flags=AVX2_CPU, signature="a")
    assert (choice.engine, choice.reason, choice.candidates, load.loaded) == (
        "keras",
        "only keras",
        ("keras",),
        [],
    )
    assert not (layout.exports_dir / engine_choice.CHOICE_FILE).exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX2_CPU, ("keras", "tflite_dynamic_int8", "onnx_int8")),
        (BF16_CPU, ("keras", "tflite_dynamic_int8", "onnx_int8", "savedmodel_bf16")),
    ],
    ids=["avx2", "bf16"],
)
def test_the_cpu_flags_filter_the_candidates(tmp_path, flags, expected):
    """bf16 without bf16 units would be a slow emulation: never timed there. An export below the
    agreement bar, or recorded but no longer on disk, is never a candidate either."""
    agreements = {
        "tflite_dynamic_int8": 0.995,
        "tflite_int8": 0.975,
        "onnx_int8": 1.0,
        "savedmodel_bf16": 0.99,
    }
    layout = _exports(tmp_path, {**agreements, "onnx_fp32": 1.0})
    engines.engine_spec("onnx_fp32").path(layout.exports_dir).unlink()
    assert engine_choice.candidates(layout.exports_dir, flags) == expected


@pytest.mark.parametrize(
    ("ms", "expected"),
    [
        ({"keras": {"batch_1": 100, "batch_8": 800}, "a": {"batch_1": 30, "batch_8": 900}}, "keras"),
        ({"keras": {"batch_1": 100, "batch_8": 800}, "a": {"batch_1": 97, "batch_8": 780}}, "keras"),
        (
            {
                "keras": {"batch_1": 100, "batch_8": 800},
                "a": {"batch_1": 50, "batch_8": 700},
                "b": {"batch_1": 60, "batch_8": 400},
            },
            "b",
        ),
    ],
    ids=["slower-at-batch-8", "within-noise", "best-of-both"],
)
def test_an_export_must_be_faster_at_every_batch_size(ms, expected):
    assert engine_choice.fastest(ms) == expected


def test_the_cpu_signature_reads_model_relevant_flags_and_threads():
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f\n"
    signature = engine_choice.cpu_signature(cpuinfo, threads=2)
    assert signature == engine_choice.cpu_signature(cpuinfo.replace("fpu", "fpu vme"), threads=2)
    assert signature != engine_choice.cpu_signature(cpuinfo.replace("fma", "fma avx512_bf16"), threads=2)
    assert signature != engine_choice.cpu_signature(cpuinfo.replace("AMD EPYC", "Intel Xeon"), threads=2)
    assert signature != engine_choice.cpu_signature(cpuinfo, threads=16)
    assert engines.cpu_model(cpuinfo) == "AMD EPYC"
