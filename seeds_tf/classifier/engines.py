"""Inference engines: what turns a batch of pixels into class probabilities for a loaded run.

`SPECS` is the one table of them, from which the request choices, the export choices and the
messages are derived: adding an engine is one entry. `keras` runs the run's Keras model (the
reference). The others run an export of it made by `seeds-tf export` (seeds_tf.prediction.export):
TensorFlow Lite with XNNPACK (`tflite_fp32`, `tflite_dynamic_int8`, `tflite_int8`), ONNX Runtime
(`onnx_fp32`, and `onnx_int8`: static int8 quantization in QDQ form, whose int8 kernels use AVX2,
AVX-512 and VNNI) or TensorFlow itself on a bfloat16 SavedModel (`savedmodel_bf16`, for CPUs with bf16
units); `savedmodel_fp32` is exported for TensorFlow Serving, not run here. All take float32 RGB
batches of shape (n, size, size, 3) in [0, 255] and give (n, classes) softmax probabilities, and
with them, from the same forward pass, each image's embedding (`Engine.observe`): what the run's
reference specimens are searched with, so that a run whose answers use them is as fast as its engine.
Which one `engine=auto` runs is measured on each CPU: seeds_tf.classifier.engine_choice.

Importing this module imports no runtime (the CLI builds its choices from the table without
TensorFlow); each engine imports its own when it is loaded.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
import platform
import threading
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seeds_tf.core.errors import InputError

if TYPE_CHECKING:
    import keras

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags of bf16 units (AVX512-BF16, AMX), which bf16 engines need to be fast."""

THREADS_ENV = "SEEDS_TF_ENGINE_THREADS"


class Engine(abc.ABC):
    """What runs a run's network on a batch of images: `observe` gives the probabilities and the
    embedding (the pooled features the reference specimens are searched with, see
    seeds_tf.classifier.model.with_features) from one forward pass; calling it gives the
    probabilities alone.

    Attributes:
        name: the engine's name in SPECS.
        embeds: whether `observe` gives the embedding. Exports made before exports carried it give
            the probabilities alone (their embedding is None).
    """

    name: str
    embeds: bool = True

    @abc.abstractmethod
    def observe(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (n, classes), embedding (n, dimension) float32 or None) of a float32
        batch (n, size, size, 3) in [0, 255]."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.observe(batch)[0]


def _outputs(ordered: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, embedding or None) of an export's outputs in their order: the probabilities
    last, after the embedding where the export has it (with_features' order)."""
    return ordered[-1], (ordered[0] if len(ordered) == 2 else None)


class KerasEngine(Engine):
    """The run's Keras model, its batch normalisations folded into the convolutions before them
    (the same function, 1.1-1.2x faster: benchmarks/NOTES.md), in one traced TensorFlow function
    for every batch size: no per-call tf.data pipeline as in `model.predict`, no retracing as batch
    sizes change. A plain forward pass has no Python control flow for AutoGraph to convert, and
    AutoGraph would leave its generated source in the temporary folder of a server that is killed."""

    name = "keras"

    def __init__(self, model: keras.Model):
        import tensorflow as tf

        from seeds_tf.classifier.inference_model import fold_batch_norms
        from seeds_tf.classifier.model import with_features

        joint = with_features(fold_batch_norms(model))
        size = model.input_shape[1]
        signature = [tf.TensorSpec((None, size, size, 3), tf.float32)]
        self._forward = tf.function(
            lambda batch: joint(batch, training=False), input_signature=signature, autograph=False
        )

    def observe(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, probabilities = self._forward(np.asarray(batch, dtype=np.float32))
        return probabilities.numpy(), features.numpy()


class TFLiteEngine(Engine):
    """A TensorFlow Lite model in the LiteRT interpreter, whose default XNNPACK delegate runs the
    float and int8 kernels with this CPU's vector units. One interpreter is not thread-safe: calls
    are serialised, and the input is resized only when the batch size changes."""

    def __init__(self, name: str, path: Path):
        from ai_edge_litert.interpreter import Interpreter

        self.name = name
        self._interpreter = Interpreter(model_path=str(path), num_threads=engine_threads())
        self._input = self._interpreter.get_input_details()[0]["index"]
        # The serving signature's outputs by name (output_0, output_1: the Keras outputs' order);
        # the tensors' own order in the file is the converter's.
        named = self._interpreter.get_signature_runner().get_output_details()
        self._outputs = [named[output]["index"] for output in sorted(named)]
        self.embeds = len(self._outputs) == 2
        self._batch_size = None
        self._lock = threading.Lock()

    def observe(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            if batch.shape[0] != self._batch_size:
                self._interpreter.resize_tensor_input(self._input, batch.shape)
                self._interpreter.allocate_tensors()
                self._batch_size = batch.shape[0]
            self._interpreter.set_tensor(self._input, np.ascontiguousarray(batch, dtype=np.float32))
            self._interpreter.invoke()
            return _outputs([self._interpreter.get_tensor(output).copy() for output in self._outputs])


class SavedModelEngine(Engine):
    """A SavedModel's serving function in TensorFlow (thread-safe), here the bfloat16 copy whose
    convolutions oneDNN runs on AVX512-BF16 and AMX."""

    def __init__(self, name: str, path: Path):
        import tensorflow as tf

        self.name = name
        self._saved_model = tf.saved_model.load(str(path))
        # The serving signature, as TensorFlow Serving calls it: one named input, and the outputs
        # output_0 (and output_1), named in the Keras outputs' order.
        self._serve = self._saved_model.signatures["serving_default"]
        (self._input,) = self._serve.structured_input_signature[1]
        self.embeds = len(self._serve.structured_outputs) == 2
        self._tensor = functools.partial(tf.constant, dtype=tf.float32)

    def observe(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        named = self._serve(**{self._input: self._tensor(batch)})
        return _outputs([named[output].numpy() for output in sorted(named)])


class OnnxEngine(Engine):
    """An ONNX model in ONNX Runtime's CPU execution provider (thread-safe by design); its graph's
    outputs are in the Keras outputs' order."""

    def __init__(self, name: str, path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = engine_threads()
        self.name = name
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.embeds = len(self._session.get_outputs()) == 2

    def observe(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return _outputs(self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)}))


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """One way to run a run's network: its Keras model, or an export of it named
    `<format>_<precision>` and written by seeds_tf.prediction.export.

    Attributes:
        name: what requests, `seeds-tf export` and exports.json call it.
        format: the export's format (tflite, onnx, savedmodel); "keras" for the model itself.
        precision: fp32, dynamic_int8 (int8 weights), int8 (int8 weights and activations) or bf16.
        suffix: the export's file suffix in the run's exports/ folder; "" for a folder.
        loader: runs the export, from (name, path); None where seeds_tf does not run it.
        needs_bf16: fast only on CPUs with bf16 units; a slow emulation elsewhere.
        exported: made by `seeds-tf export`; False for keras, the run's own model.
        calibrated: its int8 activation ranges are set on the run's training images.
    """

    name: str
    format: str
    precision: str = "fp32"
    suffix: str = ""
    loader: Callable[[str, Path], Engine] | None = None
    needs_bf16: bool = False
    exported: bool = True
    calibrated: bool = False

    @property
    def serves(self) -> bool:
        """Whether seeds_tf predicts with it: keras, and every export it has a loader for."""
        return not self.exported or self.loader is not None

    def path(self, exports_dir: Path) -> Path:
        """Where this export lives in a run's `exports_dir`."""
        return exports_dir / f"{self.name}{self.suffix}"

    def runs_natively(self, cpu_flags: Collection[str]) -> bool:
        """Whether a CPU with these flags (see `cpu_flags`) runs it at full speed."""
        return not self.needs_bf16 or not BF16_CPU_FLAGS.isdisjoint(cpu_flags)


SPECS = (
    EngineSpec("keras", "keras", exported=False),
    EngineSpec("tflite_fp32", "tflite", "fp32", ".tflite", TFLiteEngine),
    EngineSpec("tflite_dynamic_int8", "tflite", "dynamic_int8", ".tflite", TFLiteEngine),
    EngineSpec("tflite_int8", "tflite", "int8", ".tflite", TFLiteEngine, calibrated=True),
    EngineSpec("onnx_fp32", "onnx", "fp32", ".onnx", OnnxEngine),
    EngineSpec("onnx_int8", "onnx", "int8", ".onnx", OnnxEngine, calibrated=True),
    EngineSpec("savedmodel_fp32", "savedmodel", "fp32"),  # for TensorFlow Serving: no loader here
    EngineSpec("savedmodel_bf16", "savedmodel", "bf16", "", SavedModelEngine, needs_bf16=True),
)
"""Every engine and export, in the order choices are listed."""

ENGINES = tuple(spec.name for spec in SPECS if spec.serves)
"""The engines a request may name (besides "auto"): etc/config.yaml's `engine` choices, which
tests/test_engines.py holds equal to this."""

EXPORTS = tuple(spec for spec in SPECS if spec.exported)
FORMATS = tuple(dict.fromkeys(spec.format for spec in EXPORTS))
PRECISIONS = tuple(dict.fromkeys(spec.precision for spec in EXPORTS))


def engine_spec(name: str) -> EngineSpec:
    """The engine called `name`.

    Raises:
        InputError: naming `engine`, for a name not in ENGINES.
    """
    for spec in SPECS:
        if spec.name == name and spec.serves:
            return spec
    raise InputError("engine", f"expected one of {list(ENGINES)}. Received: {name!r}")


def export_spec(fmt: str, precision: str = "fp32") -> EngineSpec:
    """The export of format `fmt` in `precision`.

    Raises:
        InputError: naming `format` or `precision`, for a combination not in EXPORTS.
    """
    if fmt not in FORMATS:
        raise InputError("format", f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    precisions = {spec.precision: spec for spec in EXPORTS if spec.format == fmt}
    if precision not in precisions:
        raise InputError("precision", f"{fmt} exports in {list(precisions)}, not {precision!r}")
    return precisions[precision]


def load_engine(name: str, model: keras.Model, exports_dir: Path) -> Engine:
    """The engine called `name` for a run whose Keras model is `model` and exports are in
    `exports_dir`, run once on a blank image so that the first request does not pay for tracing,
    delegate set-up or memory planning.

    Raises:
        InputError: naming `engine`, for a name not in ENGINES.
        FileNotFoundError: when the run has no such export.
    """
    spec = engine_spec(name)
    if spec.exported:
        path = spec.path(exports_dir)
        if not path.exists():
            raise FileNotFoundError(path)
        engine = spec.loader(spec.name, path)
    else:
        engine = KerasEngine(model)
    size = model.input_shape[1]
    engine(np.zeros((1, size, size, 3), np.float32))
    return engine


@functools.cache
def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of this CPU, from /proc/cpuinfo (or the `cpuinfo` text given): x86's
    `flags`, ARM's `Features`; none where it cannot be read. What `EngineSpec.runs_natively` and
    the choice of `engine=auto` go by."""
    lines = _cpuinfo(cpuinfo).splitlines()
    return frozenset(
        flag
        for line in lines
        if line.startswith(("flags", "Features"))
        for flag in line.partition(":")[2].split()
    )


@functools.cache
def cpu_model(cpuinfo: str | None = None) -> str:
    """This CPU's model name from /proc/cpuinfo (or the `cpuinfo` text given); the machine's
    architecture where it names none (ARM lists part numbers only). Read once per process, like
    cpu_flags: every request for engine=auto asks for it."""
    for line in _cpuinfo(cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine() or "unknown"


def engine_threads() -> int:
    """Threads per engine: SEEDS_TF_ENGINE_THREADS, else the CPUs this process may use."""
    configured = os.environ.get(THREADS_ENV, "").strip()
    return int(configured) if configured else len(os.sched_getaffinity(0))


def _cpuinfo(cpuinfo: str | None) -> str:
    """`cpuinfo`, else the text of /proc/cpuinfo; "" where it cannot be read."""
    if cpuinfo is not None:
        return cpuinfo
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
