"""Does `seeds-tf identify` keep its engine busy, and does its memory stay flat? Side by side in one process.

Throughput: images per second of `batch.identify` on a folder of JPEG photos (reading, decoding,
resizing, the engine, ranking, writing the CSV) against answering the same images already decoded
and resized (`batch.answer`: the engine, and for a run with reference specimens the embeddings and
the index search its decisions use), in batches of the same size: the ratio is what matters (goal
>= 0.9). Both are timed warm: the job's rate is counted from its first batch on, and its start-up
(loading the run, filling the pipeline, tracing the engine) and whole-job rate are reported beside
it. The decoding and resizing alone (the job's tf.data pipeline without the engine) and the
bare engine alone are reported separately (ratio_to_bare_engine: the job against the engine alone).
For two networks: the run of the models folder (the demo run of `make bench`:
Xception at 71 px, whose forward pass is cheap enough for decoding to matter), and the original seeds
model's shape (Xception, 299 px, 743 classes, random weights: speed does not depend on the weights),
with keras and with its onnx_int8 export (calibrated on the benchmark's photos), the fastest engine
there.

Memory: peak RSS of this process after 1,000 and after 10,000 small images of one job (a small
network: the job's own memory is what is measured, not the engine's). Writes benchmarks/results.json
under "identify".

    .venv/bin/python benchmarks/identify.py [--photos 512] [--photo-size 299] [--batch-size 64] [--quick]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
from bench_run import make_benchmark_run, seed_jpeg
from results import record

from seeds_tf.classifier import engines
from seeds_tf.core import runs
from seeds_tf.core.paths import Roots
from seeds_tf.data import images, pipeline
from seeds_tf.prediction import batch, export, inference

MEMORY_IMAGES = (1_000, 10_000)


def write_photos(folder: Path, count: int, size: int) -> Path:
    """`count` JPEG photos of synthetic seeds, `size` pixels square, in `folder` (16 distinct ones
    written over and over: decoding costs the same)."""
    folder.mkdir(parents=True)
    distinct = [seed_jpeg(size, species=i, seed=i) for i in range(16)]
    for index in range(count):
        (folder / f"{index:06d}.jpg").write_bytes(distinct[index % len(distinct)])
    return folder


def throughput(
    roots: Roots,
    timestamp: str,
    photos: Path,
    *,
    photo_size: int,
    batch_size: int,
    rounds: int,
    engine_name: str = "auto",
) -> dict:
    """Identify against the bare engine on one run, alternated `rounds` times, with the engine
    called `engine_name` (the run's own choice by default)."""
    run = inference.choose_run(roots, inference.RunCache(), timestamp)
    engine = run.engine(engine_name)
    items = batch.list_inputs(photos)
    size = run.config.image_size
    decoded = [
        pipeline.resize(images.read_image(Path(item.source)), size).numpy() for item in items[:batch_size]
    ]
    ready = np.stack([decoded[i % len(decoded)] for i in range(len(items))])
    options = batch.IdentifyOptions(timestamp=run.run_id, engine=engine.name, batch_size=batch_size)

    def bare() -> float:
        started = time.perf_counter()
        for start in range(0, len(ready), batch_size):
            engine(ready[start : start + batch_size])
        return len(ready) / (time.perf_counter() - started)

    def answering() -> float:  # what the job does with decoded batches: the engine, the specimens' evidence
        started = time.perf_counter()
        for start in range(0, len(ready), batch_size):
            chunk = ready[start : start + batch_size]
            batch.answer(
                run, engine.name, items[start : start + batch_size], [(p, "") for p in chunk], options
            )
        return len(ready) / (time.perf_counter() - started)

    def job() -> tuple[float, float, float]:
        """The job's rate after its first batch, its whole rate, and the seconds to its first batch.
        The first batch pays the job's start-up (filling the pipeline, tracing the engine of the
        run the job loads), which the warmed engine above has behind it: after it, the job runs
        as the references do."""
        first_batch_at: list[float] = []

        def timed(*args) -> Iterator[dict]:
            for count, row in enumerate(batch.answer_locally(*args), 1):
                if count == batch_size:
                    first_batch_at.append(time.perf_counter())
                yield row

        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            summary = batch.identify(roots, photos, Path(folder) / "answers.csv", options, timed)
            ended = time.perf_counter()
        steady = (summary.total - batch_size) / (ended - first_batch_at[0])
        return steady, summary.images_per_s, first_batch_at[0] - started

    def decoding() -> float:
        started = time.perf_counter()
        for _ in batch.image_batches(items, size, options):  # the job's own pipeline, without the engine
            pass
        return len(items) / (time.perf_counter() - started)

    engine(ready[:batch_size])  # warm
    # Alternated, best of `rounds` each: on a shared machine, both see the same neighbours.
    rates = [(bare(), answering(), *job(), decoding()) for _ in range(rounds)]
    columns = list(zip(*rates, strict=True))
    bare_rate, answer_rate, job_rate, whole_job_rate, _, pipeline_rate = (max(column) for column in columns)
    first_batch_s = min(columns[4])
    return {
        "run": run.run_id,
        "network": f"{run.config.modelname}, {size} px, {len(run.classes)} classes",
        "engine": engine.name,
        "photos": len(items),
        "photo_size": photo_size,
        "batch_size": batch_size,
        "rounds": rounds,
        "specimens": run.specimens() is not None,
        "bare_engine_images_per_s": round(bare_rate, 1),
        "answer_decoded_images_per_s": round(answer_rate, 1),
        "identify_images_per_s": round(job_rate, 1),
        "ratio": round(job_rate / answer_rate, 3),
        "goal": ">= 0.9",
        "ratio_to_bare_engine": round(job_rate / bare_rate, 3),
        "identify_whole_job_images_per_s": round(whole_job_rate, 1),
        "whole_job_ratio": round(whole_job_rate / answer_rate, 3),
        "start_up_s": round(first_batch_s, 2),
        "decode_resize_images_per_s": round(pipeline_rate, 1),
        "decode_resize_ms_per_image": round(1000 / pipeline_rate, 2),
        "engine_ms_per_image": round(1000 / bare_rate, 2),
    }


def memory(base: Path, batch_size: int) -> dict:
    """Peak RSS after MEMORY_IMAGES of one job on small photos and a small network."""
    roots = Roots(data=base / "data", models=base / "models")
    layout = make_benchmark_run(
        roots.models, modelname="MobileNetV3Small", image_size=32, num_classes=16, dense_units=8
    )
    photos = write_photos(roots.data / "small", MEMORY_IMAGES[-1], 64)
    process = psutil.Process()
    peaks: dict[int, int] = {}
    peak = [0]
    stop = threading.Event()

    def sample() -> None:  # the peak between two rows too, not only at the marks
        while not stop.wait(0.05):
            peak[0] = max(peak[0], process.memory_info().rss)

    def measured(*args) -> Iterator[dict]:
        for count, row in enumerate(batch.answer_locally(*args), 1):
            if count in MEMORY_IMAGES:
                peaks[count] = max(peak[0], process.memory_info().rss)
            yield row

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        options = batch.IdentifyOptions(timestamp=layout.run_id, batch_size=batch_size)
        summary = batch.identify(roots, photos, base / "answers.csv", options, measured)
    finally:
        stop.set()
        sampler.join()
    first, last = (peaks[count] / 2**20 for count in MEMORY_IMAGES)
    return {
        "images": summary.total,
        "images_per_s": round(summary.images_per_s, 1),
        "peak_rss_mib_after_1000": round(first, 1),
        "peak_rss_mib_after_10000": round(last, 1),
        "growth_mib": round(last - first, 1),
        "process_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=512)
    parser.add_argument("--photo-size", type=int, default=299, help="side of the JPEG photos, pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="skip the original model's shape (minutes)")
    args = parser.parse_args()

    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        photos = write_photos(base / "photos", args.photos, args.photo_size)
        roots = Roots.from_env()
        if runs.list_runs(roots.models).working:
            figures["demo_run"] = throughput(
                roots, "", photos, photo_size=args.photo_size, batch_size=args.batch_size, rounds=3
            )
        if not args.quick:
            original = Roots(data=base / "data", models=base / "models")
            layout = make_benchmark_run(original.models)
            # 10 images/s: 4 batches, so that the rate after the first batch spans 3 of them.
            few = write_photos(base / "few", args.photos // 2, args.photo_size)
            shape = {"photo_size": args.photo_size, "batch_size": args.batch_size, "rounds": 2}
            figures["original_shape"] = throughput(original, layout.run_id, few, **shape, engine_name="keras")
            int8 = engines.export_spec("onnx", "int8")
            export.export_checkpoint(layout, int8, calibration=sorted(few.iterdir())[:16])  # the 16 distinct
            figures["original_shape_int8"] = throughput(
                original, layout.run_id, few, **shape, engine_name=int8.name
            )
        figures["memory"] = memory(base / "memory", args.batch_size)
    record("identify", figures)


if __name__ == "__main__":
    main()
