"""Serving and training costs that matter in production, each a ratio or count measured side by side.

Parts (`--parts`, all by default), on a run of the original model's size: Xception at 299 px over 743
classes, randomly initialised (bench_run.py), in a temporary models folder:

  http     One 299-px JPEG predicted through a real `deepaas-run` (127.0.0.1, one worker) against
           `seeds_tf.prediction.inference.predict` in this process, same bytes, run and options, interleaved
           (the order alternates); p50 and p99 latency of each and their ratios. Goal: < 1.2x.
  memory   Resident memory of the server and its workers (load.tree_rss_mib) at rest after the
           1st and after the 500th prediction over HTTP (the http part's requests count among them).
  fast     A run trained through seeds_tf.learning.training.train with mode=fast, augment=false, Xception at
           96 px, 2 epochs, on a synthetic dataset (16 classes x 20 images), twice: epoch-2 seconds over
           epoch-1 seconds from the run's stats.json. Goal: < 0.05 (features cached after epoch 1).
           mode=fast refuses weights=none (a frozen random backbone is useless), so the backbone's
           random initial weights are given as a weights file in the data folder instead.
  scaling  Seconds to predict 1, 8, 64 and 512 images (inference.class_probabilities on the
           benchmark run, batches of 16) and for one training epoch of 1, 8, 64 and 512 images
           (normal mode, Xception 96 px, random weights, the training pipeline with augmentation):
           least-squares line t = a + b*n, and the largest relative deviation of a point from it
           (counts up to 64 are timed again after the larger ones, the faster kept).

    .venv/bin/python benchmarks/serving.py [--parts http,memory,fast,scaling] [--quick]

About 4 minutes on 2 cores (6 with a busy neighbour); `--quick` (a smoke check of every part, figures
not recorded) about 1.5.
Writes its figures into benchmarks/results.json under "serving", merged part by part.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests
from bench_run import make_benchmark_run, seed_jpeg
from load import MODEL_URL, serving, tree_rss_mib, uploads_left
from results import RESULTS, record

from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from seeds_tf.data import images, synthetic
from seeds_tf.learning import training
from seeds_tf.prediction import inference

PARTS = ("http", "memory", "fast", "scaling")
TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each part does: the full benchmark or the quick smoke check."""

    pairs: int = 30
    warmup: int = 3
    memory_predictions: int = 500
    memory_checkpoints: tuple[int, ...] = (1, 100, 250, 500)
    images_per_class: int = 20
    fast_epochs: int = 2
    fast_runs: int = 2
    predict_counts: tuple[int, ...] = (1, 8, 64, 512)
    train_counts: tuple[int, ...] = (1, 8, 64, 512)


QUICK = Sizes(
    pairs=5,
    warmup=1,
    memory_predictions=20,
    memory_checkpoints=(1, 10, 20),
    images_per_class=6,
    fast_runs=1,
    predict_counts=(1, 4, 16),
    train_counts=(1, 8, 32),
)


def quantile_ms(seconds: Sequence[float], q: int) -> float:
    """The q-th percentile (inclusive method) of `seconds`, in milliseconds."""
    cuts = statistics.quantiles([1000 * s for s in seconds], n=100, method="inclusive")
    return round(cuts[q - 1], 1)


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


# ---------------------------------------------------------------------------------------------- http


class Client:
    """One keep-alive HTTP client posting the JPEG to deepaas-run's predict."""

    def __init__(self, url: str, run_id: str, photo: bytes):
        self._session = requests.Session()
        self._url = f"{url}{MODEL_URL}/predict/"
        self._form = {"top_k": str(TOP_K), "timestamp": run_id}
        self._photo = photo

    def predict(self) -> dict[str, Any]:
        response = self._session.post(
            self._url, files={"image": ("seed.jpg", self._photo, "image/jpeg")}, data=self._form, timeout=300
        )
        if response.status_code != 200:
            raise RuntimeError(f"predict answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def close(self) -> None:
        self._session.close()


def agreement(over_http: dict[str, Any], in_process: dict[str, Any]) -> dict[str, Any]:
    """Whether both ways answered the same: same run, same species in the same order, same
    probabilities (to 1e-5)."""
    a, b = over_http["results"][0]["species"], in_process["results"][0]["species"]
    same_species = [s["label"] for s in a] == [s["label"] for s in b] and len(a) == TOP_K
    gap = max(abs(x["probability"] - y["probability"]) for x, y in zip(a, b, strict=True))
    return {
        "same_run": over_http["run_id"] == in_process["run_id"],
        "same_top_species": same_species,
        "max_probability_gap": float(f"{gap:.2e}"),
    }


def http_and_memory(
    roots: Roots, layout: runs.RunLayout, photo: bytes, *, parts: set[str], sizes: Sizes, folder: Path
) -> tuple[dict[str, Any], inference.RunCache]:
    """Parts http and memory, against one deepaas-run. The predictions of the http part count
    among the memory part's, which starts at the server's first prediction."""
    uploads = folder / "uploads"
    uploads.mkdir()
    env = {DATA_ENV: str(roots.data), MODELS_ENV: str(roots.models), "TMPDIR": str(uploads)}
    log = folder / "server.log"
    cache = inference.RunCache()
    options = config.load(config.PredictConfig, top_k=TOP_K, timestamp=layout.run_id)
    upload = [("seed.jpg", photo)]

    def local() -> dict[str, Any]:
        return inference.predict(roots, cache, options, upload)

    figures: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        with serving(env, log, 1) as (url, pid):
            up_s = time.perf_counter() - started
            client = Client(url, layout.run_id, photo)
            try:
                rss = {0: tree_rss_mib(pid)}
                first_http_s, first_http = timed(client.predict)
                sent = 1
                rss[1] = tree_rss_mib(pid)
                if "http" in parts:
                    figures["http"] = latency_pairs(client, local, sizes)
                    figures["http"]["first_http_predict_s"] = round(first_http_s, 2)
                    figures["http"]["server_up_s"] = round(up_s, 1)
                    figures["http"]["answers"] = agreement(first_http, local())
                    sent += sizes.warmup + sizes.pairs
                if "memory" in parts:
                    figures["memory"] = memory_growth(client, pid, rss, sent, sizes)
                    figures["memory"]["uploads_left"] = len(uploads_left(uploads))
            finally:
                client.close()
    except Exception:
        print("--- end of the server log:", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
        raise
    return figures, cache


def latency_pairs(client: Client, local: Callable[[], dict[str, Any]], sizes: Sizes) -> dict[str, Any]:
    """p50 and p99 of the HTTP and the in-process (`local`) predict, each request of one kind followed
    by one of the other, the order alternating, after `sizes.warmup` of each."""
    load_s, _ = timed(local)  # loads the run and traces the model
    for _ in range(sizes.warmup):
        client.predict()
        local()
    over_http, in_process = [], []
    for index in range(sizes.pairs):
        http_first = index % 2 == 0
        for kind in ("http", "local") if http_first else ("local", "http"):
            if kind == "http":
                over_http.append(timed(client.predict)[0])
            else:
                in_process.append(timed(local)[0])
    figures = {
        "requests_each": sizes.pairs,
        "first_inprocess_predict_s": round(load_s, 2),
        "http_p50_ms": quantile_ms(over_http, 50),
        "http_p99_ms": quantile_ms(over_http, 99),
        "inprocess_p50_ms": quantile_ms(in_process, 50),
        "inprocess_p99_ms": quantile_ms(in_process, 99),
    }
    figures["ratio_p50"] = round(figures["http_p50_ms"] / figures["inprocess_p50_ms"], 3)
    figures["ratio_p99"] = round(figures["http_p99_ms"] / figures["inprocess_p99_ms"], 3)
    figures["http_overhead_p50_ms"] = round(figures["http_p50_ms"] - figures["inprocess_p50_ms"], 1)
    figures["goal"] = "ratio_p50 and ratio_p99 < 1.2"
    return figures


def memory_growth(client: Client, pid: int, rss: dict[int, float], sent: int, sizes: Sizes) -> dict[str, Any]:
    """Sends predictions up to `sizes.memory_predictions` in all, reading the server tree's RSS at
    rest at each checkpoint."""
    total = sizes.memory_predictions
    started = time.perf_counter()
    for count in range(sent + 1, total + 1):
        client.predict()
        if count in sizes.memory_checkpoints:
            rss[count] = tree_rss_mib(pid)
    rss[total] = tree_rss_mib(pid)
    seconds = time.perf_counter() - started
    figures: dict[str, Any] = {
        "predictions": total,
        "rss_mib_at_rest_after_start": rss[0],
        "rss_mib_after_1st": rss[1],
        f"rss_mib_after_{total}": rss[total],
        "growth_mib": round(rss[total] - rss[1], 1),
        "growth_pct": round(100 * (rss[total] - rss[1]) / rss[1], 2),
        "rss_mib_by_prediction": {str(n): mib for n, mib in sorted(rss.items())},
        "requests_per_s": round((total - sent) / seconds, 2) if total > sent else None,
    }
    middle = [n for n in sorted(rss) if 1 < n < total]
    if middle:
        # Growth per 100 predictions once settled: a leak shows as a slope that stays.
        first = middle[0]
        figures[f"growth_mib_per_100_after_{first}"] = round(
            100 * (rss[total] - rss[first]) / (total - first), 2
        )
    return figures


# ---------------------------------------------------------------------------------------------- fast


def random_backbone_weights(path: Path, modelname: str, image_size: int) -> None:
    """The backbone's random initial weights, as a file `weights=` accepts: built exactly as
    build_classifier builds it (same layer names), so they load into it."""
    import keras

    from seeds_tf.classifier.backbones import get_backbone
    from seeds_tf.classifier.model import BackbonePreprocessing

    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = BackbonePreprocessing(modelname, name="preprocessing")(inputs)
    get_backbone(modelname).build(features, None).save_weights(path)


def fast_mode(roots: Roots, data_folder: str, sizes: Sizes) -> dict[str, Any]:
    """Trains fast-mode runs (backbone frozen, features cached after epoch 1) and reads the seconds
    of each epoch from their stats.json. Epoch 2 varies from run to run (0.2 s to several seconds
    for 224 images): it can pay for tearing down epoch 1's feature-extraction pipeline, so the
    worst of the runs is the figure."""
    options = {
        "mode": "fast",
        "augment": False,
        "modelname": "Xception",
        "image_size": 96,
        "epochs": sizes.fast_epochs,
        "images_directory": f"{data_folder}/images",
        "splits_directory": f"{data_folder}/dataset_files",
    }
    try:
        training.train(config.RunConfig.from_options(weights="none", **options), roots)
        refusal = None
    except InputError as error:
        refusal = str(error)
    weights = "xception_96_random.weights.h5"
    random_backbone_weights(roots.data / weights, "Xception", 96)
    trained = []
    for _ in range(sizes.fast_runs):
        wall_s, result = timed(
            lambda: training.train(config.RunConfig.from_options(weights=weights, **options), roots)
        )
        stats = files.read_json(runs.RunLayout(roots.models / result.run_id).stats_file)
        seconds = [epoch["seconds"] for epoch in stats["epochs"]]
        trained.append({"epoch_seconds": seconds, "epoch2_over_epoch1": round(seconds[1] / seconds[0], 4)})
        trained[-1] |= {"training_time_s": stats["training_time_s"], "train_call_wall_s": round(wall_s, 1)}
    return {
        "options": {**options, "weights": "random backbone weights file"},
        "weights_none_refused_with": refusal,
        "train_images": _lines(roots.data / data_folder / "dataset_files" / "train.txt"),
        "runs": trained,
        "epoch_seconds": [run["epoch_seconds"] for run in trained],
        "epoch2_over_epoch1": max(run["epoch2_over_epoch1"] for run in trained),
        "goal": "epoch2_over_epoch1 (the worst of the runs) < 0.05",
    }


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# ------------------------------------------------------------------------------------------- scaling


REPEATS_UP_TO = 64
"""Counts up to this are timed twice, before and after the larger ones (1, 8, 64, 512, 64, 8, 1), and
the faster time kept: a neighbour on this shared machine only ever adds time. The ratio of the two
timings of the largest repeated count shows whether the machine changed speed in between."""


def timed_counts(measure: Callable[[int], float], counts: Sequence[int]) -> tuple[list[float], float | None]:
    """Seconds of `measure(n)` for each count, and the drift (second timing over the first)."""
    first = {n: measure(n) for n in counts}
    small = [n for n in counts if n <= REPEATS_UP_TO]
    second = {n: measure(n) for n in reversed(small)}
    seconds = [min(first[n], second.get(n, first[n])) for n in counts]
    drift = round(second[small[-1]] / first[small[-1]], 3) if small else None
    return seconds, drift


def line_fit(counts: Sequence[int], seconds: Sequence[float]) -> dict[str, Any]:
    """Least-squares t = a + b*n, and how far the points stray from it."""
    n, t = np.asarray(counts, dtype=float), np.asarray(seconds, dtype=float)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], axis=1), t, rcond=None)
    deviation = np.abs(t - (a + b * n)) / t
    return {
        "images": list(counts),
        "seconds": [round(s, 3) for s in seconds],
        "b_s_per_image": round(float(b), 4),
        "a_fixed_s": round(float(a), 3),
        "max_relative_deviation": round(float(deviation.max()), 3),
        "relative_deviation": [round(float(d), 3) for d in deviation],
    }


def predict_scaling(run: inference.LoadedRun, counts: Sequence[int], batch: int = 16) -> dict[str, Any]:
    """Seconds for class_probabilities over `n` images in batches of `batch`, for each n."""
    photos = [
        images.decode_image(seed_jpeg(299, species=i, seed=i), "image", f"{i}.jpg") for i in range(batch)
    ]
    for size in sorted({min(n, batch) for n in counts} | {batch}):  # every batch shape traced once
        inference.class_probabilities(run, photos[:size])

    def measure(n: int) -> float:
        pixels = [photos[i % len(photos)] for i in range(n)]
        started = time.perf_counter()
        for start in range(0, n, batch):
            inference.class_probabilities(run, pixels[start : start + batch])
        return time.perf_counter() - started

    seconds, drift = timed_counts(measure, counts)
    return {"batch_size": batch, **line_fit(counts, seconds), "drift": drift}


def train_scaling(dataset_root: Path, counts: Sequence[int], seed: int = 42) -> dict[str, Any]:
    """Seconds of one training epoch (model.fit, epochs=1) over n images, for each n: normal mode,
    Xception 96 px, random weights, the training input pipeline with its augmentation. The model is
    built and compiled once; every batch shape is traced before timing."""
    import keras

    from seeds_tf.classifier.model import build_classifier
    from seeds_tf.data.pipeline import augmentation, make_dataset
    from seeds_tf.data.splits import Split, read_dataset

    run_config = config.RunConfig.from_options(weights="none", image_size=96, mode="normal")
    dataset = read_dataset(dataset_root / "dataset_files", dataset_root / "images")
    every = [split for split in dataset.splits.values() if split.labels is not None]
    paths = [path for split in every for path in split.paths]
    labels = [label for split in every for label in split.labels]
    num_classes = len(dataset.classes)
    batch = run_config.training.batch_size

    def data(n: int):
        split = Split(
            "train",
            tuple(paths[i % len(paths)] for i in range(n)),
            tuple(labels[i % len(labels)] for i in range(n)),
        )
        augment = augmentation(run_config.augmentation, seed) if run_config.training.augment else None
        return make_dataset(split, 96, batch, num_classes, shuffle=True, augment=augment, seed=seed)

    keras.utils.set_random_seed(seed)
    model = build_classifier(run_config.model, num_classes)
    training.compile_classifier(model, run_config, num_classes)
    for n in sorted({min(n, batch) for n in counts} | {2 * batch}):
        model.fit(data(n), epochs=1, verbose=0)  # trace each batch shape

    def measure(n: int) -> float:
        prepared = data(n)
        started = time.perf_counter()
        model.fit(prepared, epochs=1, verbose=0)
        return time.perf_counter() - started

    seconds, drift = timed_counts(measure, counts)
    return {
        "batch_size": batch,
        "augment": run_config.training.augment,
        "note": "the pipeline drops a partial last batch only when a split holds more than batch_size "
        "images: 1 image trains as one batch of 1, 8 as one batch of 8",
        **line_fit(counts, seconds),
        "drift": drift,
    }


# ---------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def benchmark_roots() -> Iterator[tuple[Roots, Path]]:
    with tempfile.TemporaryDirectory(prefix="seeds_tf_serving_") as folder:
        root = Path(folder)
        (root / "data").mkdir()
        yield Roots(data=(root / "data").resolve(), models=(root / "models").resolve()), root


def summary(figures: dict[str, Any]) -> str:
    lines = []
    if "http" in figures:
        h = figures["http"]
        lines.append(
            f"http     p50 {h['http_p50_ms']} vs {h['inprocess_p50_ms']} ms in-process: {h['ratio_p50']}x; "
            f"p99 {h['http_p99_ms']} vs {h['inprocess_p99_ms']} ms: {h['ratio_p99']}x "
            f"({h['requests_each']} each; goal < 1.2x)"
        )
    if "memory" in figures:
        m = figures["memory"]
        total = m["predictions"]
        lines.append(
            f"memory   RSS {m['rss_mib_after_1st']} MiB after 1st, {m[f'rss_mib_after_{total}']} MiB after "
            f"{total}: growth {m['growth_mib']} MiB ({m['growth_pct']}%)"
        )
    if "fast" in figures:
        f = figures["fast"]
        lines.append(
            f"fast     epoch seconds {f['epoch_seconds']}: epoch 2 / epoch 1 = "
            f"{[run['epoch2_over_epoch1'] for run in f['runs']]}, worst {f['epoch2_over_epoch1']} "
            "(goal < 0.05)"
        )
    for kind in ("predict", "train_epoch"):
        if kind in figures.get("scaling", {}):
            s = figures["scaling"][kind]
            lines.append(
                f"scaling  {kind:11s} n={s['images']} t={s['seconds']} s: b={s['b_s_per_image']} s/image, "
                f"a={s['a_fixed_s']} s, max deviation {s['max_relative_deviation']:.1%} (drift {s['drift']})"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke check: few requests and images; records nothing"
    )
    args = parser.parse_args()
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if not parts or parts - set(PARTS):
        parser.error(f"--parts takes some of {', '.join(PARTS)}")
    sizes = QUICK if args.quick else Sizes()

    load_before = round(os.getloadavg()[0], 2)  # a busy neighbour on this shared machine shows here
    started = time.perf_counter()
    figures: dict[str, Any] = {}
    with benchmark_roots() as (roots, folder):
        cache = inference.RunCache()
        layout = None
        if parts & {"http", "memory", "scaling"}:
            build_s, layout = timed(lambda: make_benchmark_run(roots.models))
            print(
                f"benchmark run {layout.run_id} (Xception 299 px, 743 classes) made in {build_s:.1f} s",
                flush=True,
            )
        if parts & {"http", "memory"}:
            served, cache = http_and_memory(
                roots, layout, seed_jpeg(299), parts=parts, sizes=sizes, folder=folder
            )
            figures.update(served)
        if parts & {"fast", "scaling"}:
            synthetic.generate_dataset(
                roots.data / "synthetic", images_per_class=sizes.images_per_class, image_size=128, seed=0
            )
        if "scaling" in parts:
            run = cache.get(layout)
            figures["scaling"] = {
                "predict": predict_scaling(run, sizes.predict_counts),
                "train_epoch": train_scaling(roots.data / "synthetic", sizes.train_counts),
            }
        if "fast" in parts:
            figures["fast"] = fast_mode(roots, "synthetic", sizes)
    wall_s = round(time.perf_counter() - started, 1)

    command = " ".join(["benchmarks/serving.py", *sys.argv[1:]])
    if args.quick:
        print(json.dumps(figures, indent=2))
    else:
        stamp = {
            "command": command,
            "wall_s": wall_s,
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
        }
        previous = json.loads(RESULTS.read_text()).get("serving", {}) if RESULTS.is_file() else {}
        record("serving", {**previous, **{part: {**value, **stamp} for part, value in figures.items()}})
    print(summary(figures))
    print(f"wall time {wall_s} s ({command})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
