"""Inference engines: what turns a batch of pixels into class probabilities for a loaded run.

`keras` runs the run's Keras model (the reference). The others run an export of it made by
`seeds-tf export` (seeds_tf.prediction.export): TensorFlow Lite with XNNPACK (`tflite_fp32`,
`tflite_dynamic_int8`, `tflite_int8`), ONNX Runtime (`onnx_fp32`) or TensorFlow itself on a
bfloat16 SavedModel (`savedmodel_bf16`, for CPUs with bf16 units). All take float32 RGB batches
of shape (n, size, size, 3) in [0, 255] and return (n, classes) softmax probabilities.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Protocol

import keras
import numpy as np
import tensorflow as tf

from seeds_tf.classifier.inference_model import fold_batch_norms

ENGINES = ("keras", "tflite_fp32", "tflite_dynamic_int8", "tflite_int8", "onnx_fp32", "savedmodel_bf16")

BF16_ENGINES = ("savedmodel_bf16",)
"""Engines that are fast only on CPUs with bf16 instructions, and slow emulations elsewhere."""

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

THREADS_ENV = "SEEDS_TF_ENGINE_THREADS"


class Engine(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class KerasEngine:
    """The run's Keras model, its batch normalisations folded into the convolutions before them
    (the same function, 1.1-1.2x faster: benchmarks/NOTES.md), in one traced TensorFlow function
    for every batch size: no per-call tf.data pipeline as in `model.predict`, no retracing as batch
    sizes change. A plain forward pass has no Python control flow for AutoGraph to convert, and
    AutoGraph would leave its generated source in the temporary folder of a server that is killed."""

    name = "keras"

    def __init__(self, model: keras.Model):
        folded = fold_batch_norms(model)
        size = model.input_shape[1]
        signature = [tf.TensorSpec((None, size, size, 3), tf.float32)]
        self._forward = tf.function(
            lambda batch: folded(batch, training=False), input_signature=signature, autograph=False
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(np.asarray(batch, dtype=np.float32)).numpy()


class TFLiteEngine:
    """A TensorFlow Lite model in the LiteRT interpreter, whose default XNNPACK delegate runs the
    float and int8 kernels with this CPU's vector units. One interpreter is not thread-safe: calls
    are serialised, and the input is resized only when the batch size changes."""

    def __init__(self, name: str, path: Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.name = name
        self._interpreter = Interpreter(model_path=str(path), num_threads=threads or _threads())
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch_size = None
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            if batch.shape[0] != self._batch_size:
                self._interpreter.resize_tensor_input(self._input, batch.shape)
                self._interpreter.allocate_tensors()
                self._batch_size = batch.shape[0]
            self._interpreter.set_tensor(self._input, np.ascontiguousarray(batch, dtype=np.float32))
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output).copy()


class SavedModelEngine:
    """A SavedModel's serving function in TensorFlow (thread-safe), here the bfloat16 copy whose
    convolutions oneDNN runs on AVX512-BF16 and AMX."""

    def __init__(self, name: str, path: Path):
        self.name = name
        self._saved_model = tf.saved_model.load(str(path))
        # The serving signature, as TensorFlow Serving calls it: one named input, one output.
        self._serve = self._saved_model.signatures["serving_default"]
        (self._input,) = self._serve.structured_input_signature[1]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (output,) = self._serve(**{self._input: tf.constant(batch, dtype=tf.float32)}).values()
        return output.numpy()


class OnnxEngine:
    """An ONNX model in ONNX Runtime's CPU execution provider (thread-safe by design)."""

    def __init__(self, name: str, path: Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or _threads()
        self.name = name
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def load_engine(name: str, model: keras.Model, exports_dir: Path) -> Engine:
    """The engine called `name` for a run whose Keras model is `model` and exports are in
    `exports_dir`, run once on a blank image so that the first request does not pay for tracing,
    delegate set-up or memory planning.

    Raises:
        FileNotFoundError: when the run has no such export.
    """
    if name == "keras":
        engine = KerasEngine(model)
    else:
        path = export_path(exports_dir, name)
        if not path.exists():
            raise FileNotFoundError(path)
        engine = _LOADERS[name.split("_", 1)[0]](name, path)
    size = model.input_shape[1]
    engine(np.zeros((1, size, size, 3), np.float32))
    return engine


@functools.cache
def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def export_path(exports_dir: Path, name: str) -> Path:
    """Where the export called `name` (format_precision, e.g. tflite_int8) lives in a run."""
    return exports_dir / f"{name}{_SUFFIXES[name.split('_', 1)[0]]}"


_SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx", "savedmodel": ""}
_LOADERS = {"tflite": TFLiteEngine, "onnx": OnnxEngine, "savedmodel": SavedModelEngine}


def _threads() -> int:
    """Threads per engine: SEEDS_TF_ENGINE_THREADS, else the CPUs this process may use."""
    configured = os.environ.get(THREADS_ENV, "").strip()
    return int(configured) if configured else len(os.sched_getaffinity(0))
