"""Exports of a run's model to lighter inference runtimes, written into the run's exports/ folder.

The Keras model stays the reference. TensorFlow Lite runs it with XNNPACK, in fp32 or with int8
weights (dynamic range) or int8 weights and activations calibrated on the run's own training
images; ONNX Runtime runs an fp32 export and a static int8 one (QDQ, weights per channel,
activations calibrated on the training images); a SavedModel serves TensorFlow Serving and friends, and
its bf16 precision (batch norms folded into the convolutions, bfloat16 up to the float32 softmax)
is an engine for CPUs with AVX512-BF16 or AMX.
Every export takes the same input as the Keras model (float32 RGB in [0, 255], the backbone's
preprocessing is inside) and gives the same two outputs as the keras engine (the embedding, then the
softmax), so an engine can replace the other, for a run whose answers use its reference specimens too.
What can be exported is seeds_tf.classifier.engines' table; `export_run` is the whole use case
(export, compare with Keras, record, and with `serve` measure which engine `auto` runs here),
behind `seeds-tf export` and the benchmarks.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from seeds_tf.classifier import engine_choice, engines
from seeds_tf.classifier.inference_model import bfloat16_copy, fold_batch_norms
from seeds_tf.classifier.model import FEATURES_LAYER, HEAD_LAYERS, load_classifier, with_features
from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import images, pipeline
from seeds_tf.data.splits import Split, parse_split_file, read_split
from seeds_tf.prediction import inference

_LOGGER = logging.getLogger(__name__)

CALIBRATION_IMAGES = 64
"""Training images that calibrate int8 activations: enough to cover the classes' colour ranges."""
ONNX_OPSET = 17
ONNX_INPUT = "image"
"""The name of the ONNX exports' input."""
ONNX_CALIBRATION = "MinMax"
"""How ONNX Runtime's static quantization sets the int8 activation ranges (one of
onnxruntime.quantization.CalibrationMethod). On the demo run's 180 test images, with 64 calibration
images, all three kept >= 99% agreement with Keras: Percentile 100%, MinMax and Entropy 99.44%
(benchmarks/NOTES.md). MinMax is kept: it keeps only each tensor's minimum and maximum per image,
where the histogram methods hold every activation of every calibration image at once (15 GB for 32
images of an Xception at 299 px), and Percentile failed outright on the benchmark's untrained
Xception (a tensor of near-constant values: "Too many bins for data range")."""


def export_run(roots: Roots, run_id: str, spec: engines.EngineSpec, serve: bool = False) -> dict:
    """Exports a complete run's final model as `spec` (from `engines.export_spec`), calibrated on
    the run's training images where the export needs it; for an engine seeds_tf runs, compares it
    with the Keras model on the run's test split and records the figures in exports.json.

    Args:
        roots: the data and models folders.
        run_id: the run to export.
        spec: what to export.
        serve: check that the export agrees closely enough with the Keras model to serve
            requests that say "auto" (engine_choice.MIN_AGREEMENT), and measure which of the run's
            agreeing engines is the fastest on this CPU, so that the first load here does not.

    Returns:
        The export's path, and for an engine its figures (see `compare_with_keras`); with `serve`,
        the engine "auto" runs on this CPU (`serve`, see inference.LoadedRun.engine) and the
        timings of the run's engines it was chosen by (`measured_ms`).

    Raises:
        InputError: naming `serve`, with `serve`, for an export seeds_tf does not run (before
            exporting anything), an export that agrees too little or a run without a labelled test
            split to compare on (see `record_export`).
    """
    if serve and not spec.serves:
        # Nothing to check nor measure: refused before the export, not silently ignored after it.
        raise InputError(
            "serve",
            f"{spec.name} is exported for TensorFlow Serving, not run by seeds_tf: engine=auto never "
            "runs it, so there is nothing to check or measure; export it without --serve",
        )
    layout = runs.resolve_run(roots.models, run_id, field="run")
    training = layout.config().training
    images_dir = roots.data_path(training.images_directory, "images_directory")
    calibration = calibration_images(layout, images_dir) if spec.calibrated else ()
    # The figures of an earlier export would vouch for the new file until it is compared, and for
    # good if the comparison fails: auto chooses no export without figures.
    if (layout.exports_dir / runs.EXPORTS_INDEX).is_file():
        _update_index(layout, lambda exports: {k: v for k, v in exports.items() if k != spec.name})
    path = export_checkpoint(layout, spec, calibration)
    if not spec.serves:
        return {"export": str(path)}
    run = inference.load_run(layout)
    test_file = layout.dataset_dir / "test.txt"  # optional in a dataset, so in a run too
    test = read_split(test_file, "test", images_dir, len(run.classes), "run") if test_file.is_file() else None
    figures = compare_with_keras(run, spec.name, test) if test is not None and test.labels else {}
    embeds = run.specimens() is not None
    record_export(layout, spec.name, figures, serve, embeds)
    if not serve:
        return {"export": str(path), **figures}
    choice = inference.default_engine(layout.exports_dir, run.model, remeasure=True, embeds=embeds)
    return {"export": str(path), **figures, "serve": choice.engine, "measured_ms": choice.ms}


def export_checkpoint(
    layout: runs.RunLayout, spec: engines.EngineSpec, calibration: Sequence[Path] = ()
) -> Path:
    """Writes one export of a run's final model into its exports/ folder (the engines serve the
    final model's exports only) and returns its path.

    Args:
        layout: a complete run.
        spec: what to export.
        calibration: image files whose activations set the int8 ranges (only for calibrated exports).
    """
    model = load_classifier(runs.resolve_checkpoint(layout, "final"))
    destination = export_model(model, spec, spec.path(layout.exports_dir), calibration)
    _LOGGER.info("Exported run %s as %s", layout.run_id, destination)
    return destination


def export_model(
    model: keras.Model,
    spec: engines.EngineSpec,
    destination: Path,
    calibration: Sequence[Path] = (),
    onnx_calibration: str = ONNX_CALIBRATION,
    *,
    converted_from: Path | None = None,
) -> Path:
    """Writes `model` in the format and precision of `spec` to `destination`, atomically; an ONNX
    int8 export sets its activation ranges on `calibration` by `onnx_calibration` (ONNX_CALIBRATION
    by default; the benchmarks try the others).

    `converted_from` is `model`'s fp32 export that this one converts from, when it is already
    written (see export_models): a savedmodel_fp32 folder for TensorFlow Lite, an onnx_fp32 file
    for ONNX int8. Defaults to None: written here, in a scratch folder.

    Raises:
        InputError: naming `precision`, for a calibrated export without calibration images.
        ValueError: for `converted_from` with an export that converts from nothing.
    """
    if spec.calibrated and not calibration:
        raise InputError(
            "precision", f"{spec.precision} needs calibration images; the run's train split has none"
        )
    if converted_from is not None and _converts_from(spec) is None:
        raise ValueError(f"Expected no converted_from for {spec.name}, which converts from nothing.")
    if spec.precision == "bf16":
        model = bfloat16_copy(fold_batch_norms(model))
    model = with_features(model)  # the embedding with the probabilities, as the keras engine gives them
    if spec.format == "onnx":
        with files.atomic_path(destination) as temporary:
            if spec.precision == "int8":
                _onnx_int8(model, temporary, calibration, onnx_calibration, converted_from)
            else:
                _onnx(model, temporary)
        return destination
    # TensorFlow Lite converts from a SavedModel, the other format: the same one, in both cases.
    with tempfile.TemporaryDirectory(prefix="seeds_tf_export_") as scratch:
        saved_model = converted_from or Path(scratch) / "savedmodel"
        if converted_from is None:
            model.export(str(saved_model), format="tf_saved_model", verbose=False)
        if spec.format == "savedmodel":
            _replace_folder(saved_model, destination)
        else:
            blob = _tflite(saved_model, spec.precision, model.input_shape[1], calibration)
            with files.atomic_path(destination) as temporary:
                temporary.write_bytes(blob)
    return destination


def export_models(
    model: keras.Model,
    specs: Sequence[engines.EngineSpec],
    exports_dir: Path,
    calibration: Sequence[Path] = (),
) -> dict[str, Path]:
    """Writes every export of `specs` into `exports_dir` (see export_model), those the others
    convert from first (the fp32 SavedModel and ONNX ones, when asked for), so that the others read
    them instead of writing them again (a SavedModel of the network takes seconds). Returns each
    export's path by name."""
    sources = {_converts_from(spec) for spec in specs}
    made: dict[str, Path] = {}
    for spec in sorted(specs, key=lambda spec: spec.name not in sources):
        source = made.get(_converts_from(spec) or "")
        made[spec.name] = export_model(
            model, spec, spec.path(exports_dir), calibration if spec.calibrated else (), converted_from=source
        )
    return made


def _converts_from(spec: engines.EngineSpec) -> str | None:
    """The export that `spec`'s export is converted from, if any."""
    if spec.format == "tflite":
        return "savedmodel_fp32"
    return "onnx_fp32" if spec.format == "onnx" and spec.precision == "int8" else None


def compare_with_keras(run: inference.LoadedRun, engine: str, split: Split, batch_size: int = 16) -> dict:
    """How far an export's answers are from the Keras model's on a labelled split: the share of
    images whose top-1 species is the same, and both top-1 accuracies. For a run whose answers use
    its reference specimens and an export that gives the embedding, also the share of images whose
    decision (species, genus or unknown: inference.trust with the specimens' evidence) is the same."""
    specimens = run.specimens() is not None and run.engine(engine).embeds
    thresholds = config.load(config.PredictConfig)  # the run's own calibrated thresholds
    top1: dict[str, list[np.ndarray]] = {name: [] for name in ("keras", engine)}
    decisions: dict[str, list[str]] = {name: [] for name in top1}
    for start in range(0, len(split.paths), batch_size):
        pixels = [images.read_image(path) for path in split.paths[start : start + batch_size]]
        for name, answers in top1.items():
            if specimens:
                probabilities, trusted = inference.judged(run, pixels, name, thresholds)
                decisions[name].extend(judgement["decision"] for judgement in trusted)
            else:
                probabilities = inference.class_probabilities(run, pixels, engine=name)
            answers.append(probabilities.argmax(axis=1))
    reference, exported = (np.concatenate(top1[name]) for name in ("keras", engine))
    labels = np.asarray(split.labels)
    keras_top1, export_top1 = float(np.mean(reference == labels)), float(np.mean(exported == labels))
    figures = {
        "split": split.name,
        "images": len(labels),
        "agreement_top1": round(float(np.mean(exported == reference)), 4),
        "keras_top1": round(keras_top1, 4),
        "top1": round(export_top1, 4),
        "top1_change": round(export_top1 - keras_top1, 4),
    }
    if specimens:
        same = np.asarray(decisions["keras"]) == np.asarray(decisions[engine])
        figures["agreement_decision"] = round(float(np.mean(same)), 4)
    return figures


def record_export(
    layout: runs.RunLayout, engine: str, figures: dict, serve: bool = False, embeds: bool = False
) -> dict:
    """Adds an export's figures (see `compare_with_keras`) to the run's exports.json, where
    seeds_tf.classifier.engine_choice finds the exports `engine=auto` may choose from; returns the
    index. With `serve` (default False), refuses an export that agrees too little to be chosen for
    the run: by `engine_choice.shortfall`, with `embeds` (default False) for a run whose answers
    use its reference specimens.

    Raises:
        InputError: naming `serve`, with `serve`, when the export agrees with the Keras model on
            less than engine_choice.MIN_AGREEMENT of the images, on the top-1 species or, with
            `embeds`, the decision, or was compared on no images (its figures are recorded).
    """
    recorded = _update_index(layout, lambda exports: {**exports, engine: figures})
    if serve and not figures:
        raise InputError(
            "serve",
            f"run {layout.run_id} has no labelled test split to compare {engine} with the Keras model "
            "on: engine=auto will not run it",
        )
    if serve and (key := engine_choice.shortfall(figures, embeds)) is not None:
        raise InputError(
            "serve",
            f"{engine} agrees with the Keras model on {figures.get(key)} of the test images "
            f"({key}), below {engine_choice.MIN_AGREEMENT}: engine=auto will not run it",
        )
    return recorded


def _update_index(layout: runs.RunLayout, change: Callable[[dict], dict]) -> dict:
    """Rewrites the run's exports.json with `change` applied to its figures by export; returns it.
    Read, changed and written under a lock: two exports of the run made side by side kept one's."""
    index = layout.exports_dir / runs.EXPORTS_INDEX
    with engine_choice.exclusive(index.with_name(f".{index.name}.lock")):
        recorded = files.read_json(index) if index.is_file() else {}
        recorded = {"exports": change(recorded.get("exports", {}))}
        files.write_json(index, recorded)
    return recorded


def calibration_images(
    layout: runs.RunLayout, images_dir: Path, count: int = CALIBRATION_IMAGES
) -> list[Path]:
    """Up to `count` images of the run's train split, spread over it (the split is class-ordered)."""
    entries = parse_split_file(layout.dataset_dir / "train.txt")
    return [images_dir / relative for relative, _ in entries[:: max(1, len(entries) // count)][:count]]


def _tflite(saved_model: Path, precision: str, image_size: int, calibration: Sequence[Path]) -> bytes:
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if precision != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "int8":
        # int8 kernels inside, float32 at the edges: callers feed the same pixels as to Keras.
        converter.representative_dataset = lambda: _representative(calibration, image_size)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _representative(calibration: Sequence[Path], image_size: int) -> Iterator[list[np.ndarray]]:
    for path in calibration:
        pixels = pipeline.resize(images.read_image(path), image_size)
        yield [np.asarray(pixels, dtype=np.float32)[None]]


def _onnx(model: keras.Model, destination: Path) -> None:
    import tf2onnx

    size = model.input_shape[1]
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name=ONNX_INPUT)]
    forward = tf.function(lambda image: model(image, training=False), input_signature=signature)
    tf2onnx.convert.from_function(
        forward, input_signature=signature, opset=ONNX_OPSET, output_path=str(destination)
    )


def _onnx_int8(
    model: keras.Model,
    destination: Path,
    calibration: Sequence[Path],
    method: str = ONNX_CALIBRATION,
    fp32: Path | None = None,
) -> None:
    """ONNX Runtime's static quantization of the fp32 export, in QDQ form (its CPU kernels fuse
    each QuantizeLinear/DequantizeLinear pair around a convolution into an int8 convolution):
    weights int8 per output channel, activations uint8 with ranges set by `method` on the
    `calibration` images, the input and _FLOAT_LAYERS left in float. Weights use 7 bits
    (reduce_range): CPUs without VNNI (AVX2) multiply uint8 by int8 pairs into saturating int16,
    which 7-bit weights cannot overflow, so the export answers the same on every x86 CPU. `fp32`:
    the model's onnx_fp32 export, when written already."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="seeds_tf_export_") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        if fp32 is None:
            fp32 = Path(scratch) / "fp32.onnx"
            _onnx(model, fp32)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # as ORT advises
        quantize_static(
            str(prepared),
            str(destination),
            _CalibrationImages(calibration, model.input_shape[1]),
            quant_format=QuantFormat.QDQ,
            nodes_to_exclude=_float32_nodes(prepared),
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[method],
        )


_FLOAT_LAYERS = (FEATURES_LAYER, *HEAD_LAYERS)
"""Left in float by the int8 export. Quantized, the probabilities came out in steps of 1/255 (a
class under 0.2% as 0, rows not summing to 1) and the embedding rounded alike, while the OOD score
and the specimens' evidence are fitted on float ones; the head's dense layer too, as quantizing its
input quantized the embedding it reads. The head is a few thousandths of the network's work."""


def _float32_nodes(graph: Path) -> list[str]:
    """The nodes of an ONNX graph converted by tf2onnx that belong to _FLOAT_LAYERS: tf2onnx names
    a node `<model>/<layer>_<n>/<op>`."""
    import onnx

    layer = re.compile(rf"/({'|'.join(map(re.escape, _FLOAT_LAYERS))})(_\d+)?/")
    return [node.name for node in onnx.load(str(graph)).graph.node if layer.search(node.name)]


class _CalibrationImages:
    """The calibration images one at a time, as ONNX Runtime's quantizer reads them (the
    `get_next` of its CalibrationDataReader: the input by name, None at the end)."""

    def __init__(self, calibration: Sequence[Path], image_size: int):
        self._batches = _representative(calibration, image_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {ONNX_INPUT: batch[0]}


def _replace_folder(source: Path, destination: Path) -> None:
    """Puts a finished folder in place by renames: a reader never sees a half-copied folder."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staged = destination.with_name(f".{destination.name}.new")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged)
    old = destination.with_name(f".{destination.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by an export killed between the two renames
    if destination.exists():
        destination.rename(old)
    staged.rename(destination)
    shutil.rmtree(old, ignore_errors=True)
