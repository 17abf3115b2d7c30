"""The Markdown table of `make bench`: every figure of benchmarks/results.json beside its goal.

    .venv/bin/python benchmarks/table.py

A benchmark that did not run shows as "not measured"; see benchmarks/NOTES.md for what each figure
means and why some miss their goal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from results import RESULTS

from seeds_tf.classifier.engine_choice import AGREEMENTS

Row = tuple[str, Callable[[dict], str], str, Callable[[dict], bool | None]]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _ratios(results: dict, engine: str, against: str = "vs_keras_as_trained") -> list[float]:
    """An engine's throughput against Keras at batch 1 and 8."""
    return [results["engines"]["speed"][f"batch_{b}"][engine][against] for b in (1, 8)]


def _agreement(figures: dict) -> float:
    """An export's agreement with Keras: the lower of its top-1 agreement and, for a run whose
    answers use its reference specimens, its decisions' (engine_choice.AGREEMENTS)."""
    return min(figures[key] for key in AGREEMENTS if key in figures)


def _best_engine(results: dict) -> tuple[str, dict]:
    """The export with >= 99% agreement with Keras whose slower batch size (1 or 8) is the fastest."""
    speed, agreement = results["engines"]["speed"]["batch_1"], results["engines"]["agreement"]
    agreeing = [name for name in agreement if name in speed and _agreement(agreement[name]) >= 0.99]
    name = max(agreeing, key=lambda engine: min(_ratios(results, engine)))
    return name, agreement[name]


def _auto(results: dict) -> str:
    """The engine `engine=auto` chose by its own measurement in the benchmark."""
    return results["engines"]["auto"]["engine"]


def _auto_never_slower(results: dict) -> bool:
    """Whether the chosen engine took no longer than keras at every batch size, in its measurement."""
    ms = results["engines"]["auto"]["ms"]
    return all(ms[_auto(results)][batch] <= ms["keras"][batch] for batch in ms["keras"])


def _overhead_row(photo: str, title: str) -> Row:
    """Row 1 for one kind of photo: the predict path's overhead at batch 1 and 16."""

    def overheads(results: dict) -> list[float]:
        measured = results["inference"]["predict_overhead"]
        return [measured[f"{photo}_batch_{batch}"]["overhead"] for batch in (1, 16)]

    return (
        title,
        lambda r: " / ".join(_pct(overhead) for overhead in overheads(r)),
        "< 5%",
        lambda r: all(overhead < 0.05 for overhead in overheads(r)),
    )


ROWS: list[Row] = [
    _overhead_row(
        "299px_jpeg", "1. predict overhead vs bare forward, Xception 299 px, 299-px JPEG, batch 1 / 16"
    ),
    _overhead_row(
        "1200x900_jpeg", "1. the same with 1200x900 phone photos (decode and resize included), batch 1 / 16"
    ),
    (
        "2. compute efficiency: Xception MAC/s at the best batch vs fp32 peak",
        lambda r: (
            f"{_pct(r['inference']['compute_efficiency']['best_of_peak'])} of "
            f"{r['inference']['cpu']['peak_gmac_per_s']} GMAC/s; a 2048^2 fp32 matmul reaches "
            f"{_pct(r['inference']['compute_efficiency']['gemm_ceiling']['of_peak'])}, the network "
            f"{_pct(r['inference']['compute_efficiency']['best_of_gemm_ceiling'])} of that"
        ),
        ">= 70%",
        lambda r: r["inference"]["compute_efficiency"]["best_of_peak"] >= 0.7,
    ),
    (
        "3. HTTP (deepaas-run) vs in-process predict, p50 / p99",
        lambda r: f"{_x(r['serving']['http']['ratio_p50'])} / {_x(r['serving']['http']['ratio_p99'])}",
        "< 1.2x",
        lambda r: max(r["serving"]["http"]["ratio_p50"], r["serving"]["http"]["ratio_p99"]) < 1.2,
    ),
    (
        "4. input pipeline: images/s delivered vs consumed by a train step",
        lambda r: _x(r["pipeline"]["ratio"]),
        ">= 3x",
        lambda r: r["pipeline"]["ratio"] >= 3,
    ),
    (
        "5. fast mode: epoch 2 time vs epoch 1 (features cached)",
        lambda r: _pct(r["serving"]["fast"]["epoch2_over_epoch1"]),
        "< 5%",
        lambda r: r["serving"]["fast"]["epoch2_over_epoch1"] < 0.05,
    ),
    (
        "6. memory: deepaas-run RSS with the 743-class Xception, growth over 500 predictions",
        lambda r: (
            f"{r['serving']['memory']['rss_mib_after_1st']:.0f} MiB, "
            f"+{r['serving']['memory']['growth_mib']} MiB ({r['serving']['memory']['growth_pct']}%)"
        ),
        "no growth beyond noise",
        lambda r: r["serving"]["memory"]["growth_pct"] < 1,
    ),
    (
        "7. scaling of predict over 1 / 8 / 64 / 512 images: per image, fixed cost, worst miss of the line "
        "for n >= 8",
        lambda r: _scaling(r["serving"]["scaling"]["predict"]),
        "linear",
        lambda r: max(r["serving"]["scaling"]["predict"]["relative_deviation"][1:]) < 0.1,
    ),
    (
        "7. scaling of a training epoch (Xception 96 px), same",
        lambda r: _scaling(r["serving"]["scaling"]["train_epoch"]),
        "linear",
        lambda r: max(r["serving"]["scaling"]["train_epoch"]["relative_deviation"][1:]) < 0.1,
    ),
    (
        "tuning: seeds_tf's keras engine (batch norms folded) vs Keras as trained, batch 1 / 8",
        lambda r: " / ".join(
            _x(r["engines"]["speed"][f"batch_{b}"]["keras"]["vs_keras_as_trained"]) for b in (1, 8)
        ),
        "faster",
        lambda r: all(
            r["engines"]["speed"][f"batch_{b}"]["keras"]["vs_keras_as_trained"] > 1 for b in (1, 8)
        ),
    ),
    (
        "tuning: TensorFlow settings vs defaults, batch 1 / 8: oneDNN off; 1 intra-op; 1 inter-op thread",
        lambda r: "; ".join(
            " / ".join(
                _x(r["inference"]["settings"][name][f"batch_{b}"]["speed_vs_defaults"]) for b in (1, 8)
            )
            for name in ("onednn_off", "intra_op_threads_1", "inter_op_threads_1")
        ),
        "keep the best",
        lambda r: all(
            r["inference"]["settings"][name][f"batch_{b}"]["speed_vs_defaults"] <= 1.03
            for name in ("onednn_off", "intra_op_threads_1", "inter_op_threads_1")
            for b in (1, 8)
        ),
    ),
    (
        "machine: the CPU the engines ran on, and its fp32 peak",
        lambda r: (
            f"{r['engines']['machine']['model']} ({', '.join(r['engines']['machine']['flags'])}): "
            f"{r['engines']['machine']['peak']} = {r['engines']['machine']['peak_gmac_per_s']} GMAC/s"
        ),
        "-",
        lambda r: None,
    ),
    (
        "engine: fastest export with >= 99% agreement (top-1, and decisions for a run with specimens), "
        "throughput vs Keras fp32 as trained (and vs seeds_tf's folded keras engine), batch 1 / 8",
        lambda r: (
            f"{_best_engine(r)[0]}: {' / '.join(_x(x) for x in _ratios(r, _best_engine(r)[0]))} "
            f"({' / '.join(_x(x) for x in _ratios(r, _best_engine(r)[0], 'vs_keras'))})"
        ),
        ">= 2x",
        lambda r: min(_ratios(r, _best_engine(r)[0])) >= 2,
    ),
    (
        "engine: its agreement with Keras and accuracy change (demo run's test images)",
        lambda r: (
            f"{_pct(_agreement(_best_engine(r)[1]))}, "
            f"{100 * _best_engine(r)[1].get('top1_change', 0.0):+.1f} points"
        ),
        ">= 99%",
        lambda r: _agreement(_best_engine(r)[1]) >= 0.99,
    ),
    (
        "engine=auto: the engine its own measurement chose here, its throughput vs Keras as trained, "
        "batch 1 / 8",
        lambda r: f"{_auto(r)}: {' / '.join(_x(x) for x in _ratios(r, _auto(r)))}",
        "never slower than keras",
        _auto_never_slower,
    ),
    (
        "engine: onnx_int8 (ONNX Runtime static int8, QDQ) vs Keras as trained, batch 1 / 8, and agreement",
        lambda r: (
            " / ".join(_x(x) for x in _ratios(r, "onnx_int8"))
            + f", {_pct(_agreement(r['engines']['agreement']['onnx_int8']))}"
        ),
        ">= 2x, >= 99%",
        lambda r: (
            min(_ratios(r, "onnx_int8")) >= 2 and _agreement(r["engines"]["agreement"]["onnx_int8"]) >= 0.99
        ),
    ),
    (
        "engine: savedmodel_bf16 (AMX / AVX512-BF16) vs Keras as trained, batch 1 / 8, and agreement",
        lambda r: (
            " / ".join(
                _x(r["engines"]["speed"][f"batch_{b}"]["savedmodel_bf16"]["vs_keras_as_trained"])
                for b in (1, 8)
            )
            + f", {_pct(_agreement(r['engines']['agreement']['savedmodel_bf16']))}"
        ),
        ">= 2x, >= 99%",
        lambda r: (
            r["engines"]["speed"]["batch_1"]["savedmodel_bf16"]["vs_keras_as_trained"] >= 2
            and _agreement(r["engines"]["agreement"]["savedmodel_bf16"]) >= 0.99
        ),
    ),
    (
        "engine: tflite_int8 (full integer) throughput vs Keras as trained / agreement",
        lambda r: (
            f"{_x(r['engines']['speed']['batch_1']['tflite_int8']['vs_keras_as_trained'])} / "
            f"{_pct(_agreement(r['engines']['agreement']['tflite_int8']))}"
        ),
        ">= 2x / >= 99%",
        lambda r: _agreement(r["engines"]["agreement"]["tflite_int8"]) >= 0.99,
    ),
    (
        "reference specimens: top-5 search of 30,000 float16 references (dimension 2048) vs the forward "
        "pass, batch 1 / 8",
        lambda r: (
            " / ".join(_pct(r["retrieval"][f"batch_{b}"]["search_over_forward"]) for b in (1, 8))
            + " ("
            + " / ".join(f"{r['retrieval'][f'batch_{b}']['search_ms']:.0f} ms" for b in (1, 8))
            + ")"
        ),
        "< 50%",
        lambda r: all(r["retrieval"][f"batch_{b}"]["search_over_forward"] < 0.5 for b in (1, 8)),
    ),
    (
        "identify: a folder of JPEGs vs answering the same images decoded, batch 64, after the job's "
        "first batch (whole job with its start-up): demo run / original model's shape (Xception 299 px, "
        "743 classes) with keras / the same with onnx_int8",
        lambda r: " / ".join(_identified(r["identify"][network]) for network in IDENTIFY_NETWORKS),
        ">= 0.9",
        lambda r: all(r["identify"][network]["ratio"] >= 0.9 for network in IDENTIFY_NETWORKS),
    ),
    (
        "identify: peak RSS of one job after 1,000 and 10,000 photos",
        lambda r: (
            f"{r['identify']['memory']['peak_rss_mib_after_1000']:.0f} MiB, "
            f"{r['identify']['memory']['peak_rss_mib_after_10000']:.0f} MiB "
            f"({r['identify']['memory']['growth_mib']:+.1f} MiB)"
        ),
        "flat",
        lambda r: (
            r["identify"]["memory"]["growth_mib"] <= 0.01 * r["identify"]["memory"]["peak_rss_mib_after_1000"]
        ),
    ),
    (
        "load: requests held / sent, 1 and 2 workers, 8 clients",
        lambda r: " and ".join(
            f"{r['load'][f'workers_{w}']['held']}/{r['load'][f'workers_{w}']['sent']}" for w in (1, 2)
        ),
        "0 failures",
        lambda r: all(r["load"][f"workers_{w}"]["failures"] == 0 for w in (1, 2)),
    ),
]


IDENTIFY_NETWORKS = ("demo_run", "original_shape", "original_shape_int8")
"""benchmarks/identify.py's networks, in the order the table shows them."""


def _identified(figures: dict) -> str:
    """One network's identify ratio, engine and rates (steady, and whole job with its start-up)."""
    return (
        f"{figures['ratio']:.2f} ({figures['engine']}, {figures['identify_images_per_s']:.1f} vs "
        f"{figures['answer_decoded_images_per_s']:.1f} img/s; whole job {figures['whole_job_ratio']:.2f}, "
        f"{figures['start_up_s']:.1f} s start-up)"
    )


def _scaling(fit: dict) -> str:
    worst = max(fit["relative_deviation"][1:])
    return f"{fit['b_s_per_image'] * 1000:.0f} ms/image, {fit['a_fixed_s']:+.2f} s fixed, {_pct(worst)}"


def table(results: dict[str, Any]) -> str:
    lines = ["| figure | measured | goal | met |", "|---|---|---|---|"]
    for label, measured, goal, met in ROWS:
        try:
            value, verdict = measured(results), met(results)
        except (KeyError, TypeError, ValueError):
            value, verdict = "not measured", None
        mark = {True: "yes", False: "**no**", None: "-"}[verdict]
        lines.append(f"| {label} | {value} | {goal} | {mark} |")
    return "\n".join(lines)


def main() -> None:
    print(table(json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}))


if __name__ == "__main__":
    main()
