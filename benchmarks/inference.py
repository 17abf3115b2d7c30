"""Inference speed, side by side in one process: the seeds_tf predict path against a bare Keras
forward pass, the forward pass against this CPU's fp32 peak, and the exported engines against Keras;
and TensorFlow's start-up settings (oneDNN, thread pools), each in a fresh process.

    .venv/bin/python benchmarks/inference.py [--size 299] [--classes 743] [--run RUN_ID] [--quick]

Speed is measured on an Xception at 299 px with 743 classes (the original seeds model's shape) with
random weights: speed does not depend on the weights. Agreement of the exports with Keras needs a
trained model: it is measured on a complete run (the newest, by default the demo run) on its test
split. Writes benchmarks/results.json under "inference" and "engines".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
from results import record, recorded

from seeds_tf.classifier import engine_choice, engines
from seeds_tf.classifier.model import build_classifier
from seeds_tf.core import config, runs
from seeds_tf.core.paths import Roots
from seeds_tf.data import images
from seeds_tf.data.splits import read_split
from seeds_tf.prediction import export, inference

XCEPTION_GMAC = 8.4
"""Multiply-accumulates of one Xception forward pass at 299 px, in billions (Keras' model, 1000 classes;
the 743-class head changes it by under 0.1%)."""

FMA_UNITS_PER_CORE = 2
"""Vector FMA units per core: 2 on the server cores this runs on (Intel Xeon Sapphire Rapids ports 0
and 5; AMD Zen 4 pipes FP0 and FP1), each one vector of fp32 multiply-adds per cycle."""


ENGINE_EXPORTS = tuple(spec for spec in engines.EXPORTS if spec.serves)


def cpu_peak() -> dict:
    """This CPU's model, flags and fp32 peak in multiply-accumulates per second: cores x fp32 lanes
    of its widest vectors x FMA units x clock, read from /proc/cpuinfo. The clock is its `cpu MHz`:
    the nominal clock in a virtual machine, which does not report turbo. AMD's Zen 4 (family 25)
    runs AVX-512 as two 256-bit halves: 8 lanes per FMA unit per cycle there, as with AVX2."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = engines.cpu_flags()
    zen4 = re.search(r"^vendor_id\s*:\s*AuthenticAMD$.*?^cpu family\s*:\s*25$", cpuinfo, re.M | re.S)
    lanes = 16 if "avx512f" in flags and not zen4 else 8 if "avx2" in flags else 4
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M).group(1))
    cores = len(os.sched_getaffinity(0))
    peak = cores * lanes * FMA_UNITS_PER_CORE * mhz * 1e6
    return {
        "model": engines.cpu_model(),
        "cores": cores,
        "fp32_lanes": lanes,
        "fma_units_per_core": FMA_UNITS_PER_CORE,
        "clock_ghz": round(mhz / 1000, 2),
        "clock_assumed": "cpu MHz of /proc/cpuinfo (nominal; no turbo)",
        "peak_gmac_per_s": round(peak / 1e9, 1),
        "peak": f"{cores} cores x {lanes} fp32 lanes x {FMA_UNITS_PER_CORE} FMA x {mhz / 1000:.2f} GHz",
        "flags": sorted(engine_choice.RELEVANT_FLAGS & flags),
        "signature": engine_choice.cpu_signature(),
    }


def seconds_per_call(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of `call` after two warm-up calls (median: robust to a noisy neighbour)."""
    call()
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def photos(count: int, shape: tuple[int, int], seed: int = 0) -> list[tuple[str, bytes]]:
    """JPEG photos (height, width), as the predict path receives them."""
    rng = np.random.default_rng(seed)
    made = []
    for index in range(count):
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        made.append((f"seed{index}.jpg", buffer.getvalue()))
    return made


def predict_overhead(run: inference.LoadedRun, repeats: int) -> dict:
    """The full predict path (decode, resize, forward, rank and format) against the bare forward pass
    of the same model on the same images already decoded and resized, at batch 1 and batch 16, for
    JPEGs at the model's size (what a client that resizes sends) and phone photos (1200x900).
    The two are timed alternately and the median of the per-pair ratios is kept, so that a noisy
    neighbour slows both sides of a pair alike."""
    figures = {}
    keras_engine = run.engine("keras")
    size = run.config.image_size
    for label, shape in ((f"{size}px_jpeg", (size, size)), ("1200x900_jpeg", (900, 1200))):
        for batch in (1, 16):
            uploads = photos(batch, shape)

            def full_path(uploads=uploads):
                pixels = images.decode_images(uploads)
                probabilities = inference.class_probabilities(run, pixels)
                return [inference.ranked(run, row, 5) for row in probabilities]

            pixels = images.decode_images(uploads)
            ready = np.concatenate([inference.tta_views(image, size, "none") for image in pixels])
            pairs = [
                (seconds_per_call(full_path, 1), seconds_per_call(lambda ready=ready: keras_engine(ready), 1))
                for _ in range(max(5, 2 * repeats // batch))
            ]
            full, bare = (statistics.median(side) for side in zip(*pairs, strict=True))
            figures[f"{label}_batch_{batch}"] = {
                "full_ms": round(1000 * full, 1),
                "bare_forward_ms": round(1000 * bare, 1),
                "overhead": round(statistics.median(f / b for f, b in pairs) - 1, 4),
            }
    return figures


def compute_efficiency(run: inference.LoadedRun, peak: dict, repeats: int) -> dict:
    """Achieved multiply-accumulates per second of the Keras forward pass at several batch sizes,
    as a share of the fp32 peak."""
    size = run.config.image_size
    gmac = XCEPTION_GMAC * (size / 299) ** 2
    keras_engine = run.engine("keras")
    figures = {}
    for batch in (1, 4, 16, 32):
        ready = np.random.default_rng(batch).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
        seconds = seconds_per_call(lambda ready=ready: keras_engine(ready), max(2, repeats // batch))
        achieved = batch * gmac / seconds
        figures[f"batch_{batch}"] = {
            "images_per_s": round(batch / seconds, 2),
            "gmac_per_s": round(achieved, 1),
            "of_peak": round(achieved / peak["peak_gmac_per_s"], 3),
        }
    best = max(figures.values(), key=lambda entry: entry["of_peak"])
    ceiling = gemm_ceiling(repeats)
    return {
        "gmac_per_image": round(gmac, 2),
        **figures,
        "best_of_peak": best["of_peak"],
        "gemm_ceiling": {**ceiling, "of_peak": round(ceiling["gmac_per_s"] / peak["peak_gmac_per_s"], 3)},
        "best_of_gemm_ceiling": round(best["gmac_per_s"] / ceiling["gmac_per_s"], 3),
    }


def gemm_ceiling(repeats: int, side: int = 2048) -> dict:
    """What this machine really sustains: one large fp32 matrix product through TensorFlow (oneDNN),
    the most compute-dense operation there is. A network can at best approach it."""
    import tensorflow as tf

    a, b = (tf.constant(np.random.default_rng(i).standard_normal((side, side)), tf.float32) for i in (0, 1))
    product = tf.function(lambda: tf.matmul(a, b), autograph=False)
    seconds = seconds_per_call(lambda: product().numpy(), repeats)
    return {"matmul": f"{side}x{side} fp32", "gmac_per_s": round(side**3 / seconds / 1e9, 1)}


def tuning(model, size: int, repeats: int) -> dict:
    """The choices behind the Keras path, each against its alternative in the same run: how the
    forward pass is called (model.predict_on_batch, one traced function, the same under XLA), what
    the first call costs without a warm-up, and one batch of 8 against 8 single calls."""
    import tensorflow as tf

    one = np.random.default_rng(1).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    eight = np.random.default_rng(8).uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32)]
    xla = tf.function(lambda batch: model(batch, training=False), input_signature=signature, jit_compile=True)
    traced = engines.KerasEngine(model)
    started = time.perf_counter()
    traced(one)  # what the first request would pay without the warm-up at load
    first_call = time.perf_counter() - started
    calls = {
        "predict_on_batch": lambda: model.predict_on_batch(one),
        "traced_function": lambda: traced(one),
        "traced_function_xla": lambda: xla(one).numpy(),
    }
    batch_1_ms = {name: round(1000 * seconds_per_call(call, repeats), 1) for name, call in calls.items()}
    one_batch = seconds_per_call(lambda: traced(eight), max(3, repeats // 8))
    single_calls = seconds_per_call(
        lambda: [traced(eight[i : i + 1]) for i in range(8)], max(3, repeats // 8)
    )
    return {
        "batch_1_ms": batch_1_ms,
        "first_call_ms_without_warm_up": round(1000 * first_call, 1),
        "eight_images_one_batch_ms": round(1000 * one_batch, 1),
        "eight_images_single_calls_ms": round(1000 * single_calls, 1),
    }


def engine_speed(model, size: int, calibration: list[Path], scratch: Path, repeats: int) -> dict:
    """Images per second of every engine at batch 1 and 8 in the same run, in interleaved rounds
    (medians), each against Keras fp32 two ways: the model as trained (`keras_as_trained`, one
    traced function, batch norms as they are) and seeds_tf's `keras` engine (batch norms folded
    into the convolutions)."""
    import tensorflow as tf

    signature = [tf.TensorSpec((None, size, size, 3), tf.float32)]
    as_trained = tf.function(
        lambda batch: model(batch, training=False), input_signature=signature, autograph=False
    )
    made = {
        "keras_as_trained": lambda batch: as_trained(batch).numpy(),
        "keras": engines.load_engine("keras", model, scratch),
    }
    for spec in ENGINE_EXPORTS:
        started = time.perf_counter()
        export.export_model(model, spec, spec.path(scratch / "exports"), calibration)
        print(f"exported {spec.name} in {time.perf_counter() - started:.0f} s", flush=True)
        made[spec.name] = engines.load_engine(spec.name, model, scratch / "exports")
    # Interleaved rounds (engine_choice.measure, what engine=auto itself runs): a neighbour whose
    # load changes during the benchmark slows every engine alike instead of the ones timed then.
    loaders = {name: lambda engine=engine: engine for name, engine in made.items()}
    ms = engine_choice.measure(loaders, size, rounds=max(3, repeats // 3), budget_s=math.inf)
    figures = {}
    for batch in engine_choice.BATCHES:
        rates = {name: 1000 * batch / timings[f"batch_{batch}"] for name, timings in ms.items()}
        figures[f"batch_{batch}"] = {
            name: {
                "images_per_s": round(rate, 2),
                "vs_keras_as_trained": round(rate / rates["keras_as_trained"], 2),
                "vs_keras": round(rate / rates["keras"], 2),
            }
            for name, rate in rates.items()
        }
    return figures


SETTINGS = {
    "defaults": ({}, []),
    "onednn_off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, []),
    "intra_op_threads_1": ({}, ["--intra-op-threads", "1"]),
    "inter_op_threads_1": ({}, ["--inter-op-threads", "1"]),
}
"""TensorFlow settings fixed at process start-up, each against TensorFlow's defaults here (oneDNN
on, as many intra-op and inter-op threads as cores): environment and arguments of a fresh process."""


def settings(size: int, classes: int, rounds: int = 2) -> dict:
    """The keras engine's time per image at batch 1 and 8 under each of SETTINGS, each in a fresh
    process, in interleaved rounds (a noisy neighbour then hits every setting alike)."""
    times: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, (env, arguments) in SETTINGS.items():
            done = subprocess.run(
                [
                    *(sys.executable, __file__, "--forward-only"),
                    *("--size", str(size), "--classes", str(classes)),
                    *arguments,
                ],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            times[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {
        name: {
            batch: statistics.median(entry[batch] for entry in measured) for batch in ("batch_1", "batch_8")
        }
        for name, measured in times.items()
    }
    return {
        name: {
            batch: {
                "ms_per_image": round(ms, 1),
                "speed_vs_defaults": round(medians["defaults"][batch] / ms, 3),
            }
            for batch, ms in by_batch.items()
        }
        for name, by_batch in medians.items()
    }


def forward_times(size: int, classes: int, repeats: int) -> dict:
    """Milliseconds per image of the keras engine at batch 1 and 8, in this process's settings."""
    model = build_classifier(config.load(config.ModelConfig, image_size=size, weights="none"), classes)
    engine = engines.load_engine("keras", model, Path("."))
    pixels = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    return {
        f"batch_{batch}": 1000 * seconds_per_call(lambda batch=batch: engine(pixels[:batch]), repeats) / batch
        for batch in (1, 8)
    }


def auto_choice(model, agreement: dict, scratch: Path) -> dict:
    """What `engine=auto` chooses on this machine for the benchmark's network, by its own short
    measurement (seeds_tf.classifier.engine_choice), given the exports made by `engine_speed` in
    `scratch`/exports and the agreement the same exports of the trained run reached: among those
    whose decisions agreed too where the trained run's answers use its reference specimens."""
    layout = runs.RunLayout(scratch)
    exported = {name: figures for name, figures in agreement.items() if name != "run_id"}
    for name, figures in exported.items():
        export.record_export(layout, name, figures)
    embeds = any("agreement_decision" in figures for figures in exported.values())
    load = functools.partial(engines.load_engine, model=model, exports_dir=layout.exports_dir)
    size = model.input_shape[1]
    choice = engine_choice.choose_engine(layout.exports_dir, load, size, remeasure=True, embeds=embeds)
    return choice.to_dict()


def engine_agreement(roots: Roots, run_id: str) -> dict:
    """Top-1 agreement with Keras and top-1 accuracy change of each export of a trained run, on its
    test split (the exports are made here, into the run, as `seeds-tf export` makes them)."""
    figures = {"run_id": run_id}
    for spec in ENGINE_EXPORTS:
        done = export.export_run(roots, run_id, spec)
        figures[spec.name] = {key: value for key, value in done.items() if key not in {"export", "serve"}}
    return figures


ONNX_CALIBRATIONS = ("MinMax", "Entropy", "Percentile")
"""ONNX Runtime's calibration methods for static int8 (onnxruntime.quantization.CalibrationMethod)."""


def onnx_calibration(roots: Roots, run_id: str) -> dict:
    """Top-1 agreement with Keras and accuracy change of the ONNX static int8 export of a trained
    run calibrated by each of ONNX_CALIBRATIONS, on its test split: what export.ONNX_CALIBRATION
    was chosen by."""
    layout = runs.resolve_run(roots.models, run_id)
    images_dir = roots.data_path(layout.config().training.images_directory, "images_directory")
    run = inference.load_run(layout)
    test = read_split(layout.dataset_dir / "test.txt", "test", images_dir, len(run.classes), "run")
    calibration = export.calibration_images(layout, images_dir)
    spec = engines.engine_spec("onnx_int8")
    figures = {"run_id": run_id, "calibration_images": len(calibration)}
    with tempfile.TemporaryDirectory(prefix="seeds_tf_bench_") as scratch:
        for method in ONNX_CALIBRATIONS:
            exports_dir = Path(scratch) / method
            started = time.perf_counter()
            export.export_model(run.model, spec, spec.path(exports_dir), calibration, onnx_calibration=method)
            calibrated = dataclasses.replace(run, exports_dir=exports_dir, _engines={})
            figures[method] = {
                **export.compare_with_keras(calibrated, spec.name, test),
                "export_s": round(time.perf_counter() - started, 1),
            }
            print(method, figures[method], flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--classes", type=int, default=743)
    parser.add_argument("--run", default="", help="trained run for the agreement figures; newest by default")
    parser.add_argument("--quick", action="store_true", help="few repeats and a small model: a smoke check")
    parser.add_argument(
        "--parts",
        default="overhead,efficiency,tuning,settings,engines",
        help="comma-separated; 'calibration' (with engines) tries ONNX Runtime's int8 calibrations",
    )
    parser.add_argument("--forward-only", action="store_true", help="print forward_times as JSON (settings)")
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="with --forward-only; 0: TF's default"
    )
    parser.add_argument(
        "--inter-op-threads", type=int, default=0, help="with --forward-only; 0: TF's default"
    )
    args = parser.parse_args()
    repeats = 3 if args.quick else 15
    size = 96 if args.quick else args.size
    if args.forward_only:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
        print(json.dumps(forward_times(size, args.classes, max(3, repeats // 3))))
        return

    model_config = config.load(config.ModelConfig, image_size=size, weights="none")
    model = build_classifier(model_config, args.classes)
    classes = tuple(f"Genus{i // 2} species{i}" for i in range(args.classes))
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="seeds_tf_bench_") as scratch:
        run = inference.LoadedRun("bench", "final", model, model_config, classes, None, Path(scratch))
        peak = cpu_peak()
        figures = {
            **recorded("inference"),
            "model": f"Xception {size} px, {args.classes} classes",
            "cpu": peak,
        }
        if "overhead" in parts:
            figures["predict_overhead"] = predict_overhead(run, repeats)
        if "efficiency" in parts:
            figures["compute_efficiency"] = compute_efficiency(run, peak, repeats)
        if "tuning" in parts:
            figures["tuning"] = tuning(model, size, repeats)
        if "settings" in parts:
            figures["settings"] = settings(size, args.classes)
        record("inference", figures)
        if "engines" not in parts:
            return
        roots = Roots.from_env()
        layout = runs.resolve_run(roots.models, args.run)
        if "calibration" in parts:
            record("onnx_calibration", onnx_calibration(roots, layout.run_id))
        training = layout.config().training
        images_dir = roots.data_path(training.images_directory, "images_directory")
        calibration = export.calibration_images(layout, images_dir, count=16 if args.quick else 32)
        agreement = engine_agreement(roots, layout.run_id)
        speed = engine_speed(model, size, calibration, Path(scratch), repeats)
        auto = auto_choice(model, agreement, Path(scratch))
    record("engines", {"machine": peak, "speed": speed, "agreement": agreement, "auto": auto})


if __name__ == "__main__":
    main()
