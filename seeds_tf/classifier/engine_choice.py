"""The engine `engine=auto` runs, chosen by measuring the run's engines on the CPU that serves it.

Which engine is fastest depends on the CPU more than on the network: bf16 wins on AMX, TFLite's
int8 on one machine, ONNX Runtime's fp32 on another (benchmarks/NOTES.md). So the choice is made
where the run is served: every export that agrees with the Keras model closely enough
(`MIN_AGREEMENT`, the figures exports.json keeps) and that this CPU runs natively (its flags are a
filter, never the decision), and `keras` itself, are timed side by side on a blank batch of 1 and
of 8 images in a short, bounded measurement; the fastest is kept. The choice is cached in the run's
exports/ folder per CPU signature (model name, the flags engines use, the threads they get), so one
run folder serves a mixed fleet at each machine's best and each kind of machine measures once.

Importing this module imports no runtime: the server reads a recorded choice for the model's
metadata without TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from seeds_tf.classifier import engines
from seeds_tf.core import files, runs

_LOGGER = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99
"""Agreement with the Keras model an export needs before `engine=auto` may serve with it."""
AGREEMENTS = ("agreement_top1", "agreement_decision")
"""What must agree, in exports.json's figures (seeds_tf.prediction.export.compare_with_keras): the
top-1 species; and for a run whose answers use its reference specimens, also the decision, which
the embedding's nearest references take part in."""
CHOICE_FILE = "engine_choice.json"
"""In exports/: the engine chosen for each CPU signature, with the timings it was chosen by."""
BATCHES = (1, 8)
"""Batch sizes timed: one photo, and several (a request with many images or test-time augmentation)."""
ROUNDS = 3
"""Timed rounds; each times every engine at every batch size once, interleaved, and the median is kept."""
BUDGET_S = 30.0
"""Seconds after which no further round starts (one always runs). A round of seven engines on an
Xception at 299 px takes about 15 s on 2 cores (most of it the batches of 8), so the measurement
takes 30-45 s there, and under 10 s at the demo run's 71 px: paid once per kind of machine, by the
first worker that loads the run (the others wait for it and read its choice)."""
MARGIN = 1.05
"""How much faster than `keras` an export must be at every batch size to replace it: a tie within
a neighbour's noise keeps the reference."""
RELEVANT_FLAGS = frozenset(
    {
        *("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl"),
        *("avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"),
        *("asimd", "asimddp", "asimdhp", "sve", "sve2", "bf16", "i8mm"),  # ARM's Features
    }
)
"""The CPU flags that decide which kernels the engines' runtimes pick: part of the CPU signature."""


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    """The engine `auto` runs on one kind of CPU, and why.

    Attributes:
        engine: the engine's name (seeds_tf.classifier.engines.ENGINES).
        reason: "measured" (the fastest of `ms`), or "only keras" (no export qualifies, nothing timed).
        cpu: the CPU's model name.
        signature: the CPU signature the choice is cached under (see `cpu_signature`).
        candidates: the engines that qualified: keras and the agreeing, natively run exports.
        ms: milliseconds per call of each candidate at each batch size ("batch_1", "batch_8").
        measured_at: when (UTC, ISO 8601); "" when nothing was measured.
    """

    engine: str
    reason: str
    cpu: str
    signature: str
    candidates: tuple[str, ...]
    ms: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    measured_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """As JSON: what engine_choice.json and the model's metadata hold."""
        return {**dataclasses.asdict(self), "candidates": list(self.candidates)}


def cpu_signature(cpuinfo: str | None = None, threads: int | None = None) -> str:
    """A short hash of what makes engines rank differently: the CPU model, its `RELEVANT_FLAGS`, and
    the threads an engine gets (seeds_tf.classifier.engines.engine_threads, by default), from
    /proc/cpuinfo or the `cpuinfo` text given."""
    flags = sorted(RELEVANT_FLAGS & engines.cpu_flags(cpuinfo))
    described = f"{engines.cpu_model(cpuinfo)}|{','.join(flags)}|{threads or engines.engine_threads()}"
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def shortfall(figures: Mapping[str, Any], embeds: bool = False) -> str | None:
    """The first of the agreements (`AGREEMENTS`) an export's figures in exports.json miss, below
    MIN_AGREEMENT or not measured: the top-1 species, and with `embeds` (a run whose answers use its
    reference specimens; default False) the decision too. None for an export `auto` may choose."""
    required = AGREEMENTS if embeds else AGREEMENTS[:1]
    return next((key for key in required if figures.get(key, 0.0) < MIN_AGREEMENT), None)


def candidates(exports_dir: Path, flags: Collection[str], embeds: bool = False) -> tuple[str, ...]:
    """The engines `auto` may choose from: `keras`, and each export of the run in exports.json
    that agreed with Keras on at least MIN_AGREEMENT of the test images, is still there, and runs
    natively on a CPU with these `flags` (seeds_tf.classifier.engines.cpu_flags). With `embeds`
    (a run whose answers use its reference specimens; default False), an export also needs that
    agreement on the decisions (`shortfall`), which only exports giving the embedding have."""
    index = exports_dir / runs.EXPORTS_INDEX
    figures = files.read_json(index).get("exports", {}) if index.is_file() else {}
    agreeing = [
        spec
        for spec in engines.EXPORTS
        if spec.serves and shortfall(figures.get(spec.name, {}), embeds) is None
    ]
    return (
        "keras",
        *(spec.name for spec in agreeing if spec.runs_natively(flags) and spec.path(exports_dir).exists()),
    )


def recorded_choice(
    exports_dir: Path,
    flags: Collection[str] | None = None,
    signature: str | None = None,
    embeds: bool = False,
    remembered: EngineChoice | None = None,
) -> EngineChoice | None:
    """The choice for this CPU (`flags` and `signature` default to this machine's) among the
    `candidates` (with `embeds`, default False) without measuring: "only keras" when no export
    qualifies, the cached one (or else `remembered`, one this process measured but could not
    cache; default None) while the candidates it was measured among are still the run's, else None
    (a new export, or a CPU not measured yet)."""
    flags = engines.cpu_flags() if flags is None else flags
    signature = signature or cpu_signature()
    offered = candidates(exports_dir, flags, embeds)
    if offered == ("keras",):
        return EngineChoice("keras", "only keras", engines.cpu_model(), signature, offered)
    cached = _read_choices(exports_dir).get(signature)
    if cached is not None and tuple(cached.get("candidates", ())) == offered:
        return EngineChoice(**{**cached, "candidates": offered})
    if remembered is not None and (remembered.signature, remembered.candidates) == (signature, offered):
        return remembered
    return None


def choose_engine(
    exports_dir: Path,
    load: Callable[[str], engines.Engine],
    image_size: int,
    *,
    flags: Collection[str] | None = None,
    signature: str | None = None,
    remeasure: bool = False,
    embeds: bool = False,
    remembered: EngineChoice | None = None,
    rounds: int = ROUNDS,
    budget_s: float = BUDGET_S,
) -> EngineChoice:
    """The engine `auto` runs on this CPU: the recorded choice, or else one measured now and cached.

    Args:
        exports_dir: the run's exports/ folder, where the choice is cached.
        load: the engine of a name, loaded and warmed up (seeds_tf.classifier.engines.load_engine
            for a run); all are dropped once measured.
        image_size: the network's input side, for the blank batches.
        flags: the CPU flags that filter the candidates; this CPU's by default.
        signature: the CPU signature the choice is cached under; this CPU's by default.
        remeasure: measure even if a choice is recorded (`seeds-tf export --serve`).
        embeds: choose among the exports that qualify for a run whose answers use its reference
            specimens (see `candidates`). Defaults to False.
        remembered: the choice this process measured last time (None by default); it stands while
            its CPU signature and candidates are still the run's, so that a run folder where the
            choice cannot be recorded (a read-only models volume) is measured once per process,
            not at every request.
        rounds: timed rounds (ROUNDS by default).
        budget_s: no round starts after this many seconds (BUDGET_S by default).
    """
    flags = engines.cpu_flags() if flags is None else flags
    signature = signature or cpu_signature()

    def settled() -> EngineChoice | None:
        known = recorded_choice(exports_dir, flags, signature, embeds, remembered)
        return known if known is not None and (known.reason == "only keras" or not remeasure) else None

    if known := settled():
        return known
    with exclusive(exports_dir / f".{CHOICE_FILE}.lock"):
        # A second worker starting beside the first waits here, then finds its choice.
        if known := settled():
            return known
        offered = candidates(exports_dir, flags, embeds)
        ms = measure({name: functools.partial(load, name) for name in offered}, image_size, rounds, budget_s)
        choice = EngineChoice(
            fastest(ms),
            "measured",
            engines.cpu_model(),
            signature,
            offered,
            ms,
            datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        _record(exports_dir, choice)
    _LOGGER.info("engine=auto runs %s on this CPU (%s), measured: %s", choice.engine, choice.cpu, ms)
    return choice


def measure(
    loaders: Mapping[str, Callable[[], engines.Engine]],
    image_size: int,
    rounds: int = ROUNDS,
    budget_s: float = BUDGET_S,
) -> dict[str, dict[str, float]]:
    """Milliseconds per call of each engine at each of BATCHES, on blank batches: engines are
    loaded one after the other and called once per batch size to warm up, then timed in `rounds`
    interleaved rounds (a busy neighbour slows every engine alike), the median kept. No round
    starts after `budget_s` seconds, but one always runs. An export that does not load or run
    (a truncated copy, a runtime that refuses it) is left out with a warning: it failed every
    request that said "auto" instead; keras, the reference, is never left out."""
    blank = {batch: np.zeros((batch, image_size, image_size, 3), np.float32) for batch in BATCHES}
    started = time.monotonic()
    loaded = {}
    for name, load in loaders.items():
        try:
            engine = load()
            for batch in blank.values():
                engine(batch)
        except Exception as error:
            if name == "keras":
                raise
            _LOGGER.warning("engine=auto leaves out %s, which does not run here: %s", name, error)
            continue
        loaded[name] = engine
    times: dict[str, dict[int, list[float]]] = {name: {batch: [] for batch in BATCHES} for name in loaded}
    for done in range(rounds):
        if done and time.monotonic() - started > budget_s:
            _LOGGER.info("Engine measurement stopped after %d of %d rounds (%.0f s)", done, rounds, budget_s)
            break
        for name, engine in loaded.items():
            for batch, pixels in blank.items():
                begun = time.perf_counter()
                engine(pixels)
                times[name][batch].append(time.perf_counter() - begun)
    return {
        name: {
            f"batch_{batch}": round(1000 * statistics.median(spent), 2) for batch, spent in by_batch.items()
        }
        for name, by_batch in times.items()
    }


def fastest(ms: Mapping[str, Mapping[str, float]]) -> str:
    """The engine of `ms` (per engine, milliseconds per call per batch size; keras among them) with
    the highest geometric mean speed-up over keras, among those at least MARGIN times as fast as
    keras at every batch size; keras when there is none: `auto` is never slower than keras."""
    reference = ms["keras"]

    def speedups(name: str) -> list[float]:
        return [reference[batch] / ms[name][batch] for batch in reference]

    faster = [name for name in ms if name != "keras" and min(speedups(name)) >= MARGIN]
    return max(faster, key=lambda name: math.prod(speedups(name)), default="keras")


def _read_choices(exports_dir: Path) -> dict[str, dict[str, Any]]:
    path = exports_dir / CHOICE_FILE
    return files.read_json(path) if path.is_file() else {}


def _record(exports_dir: Path, choice: EngineChoice) -> None:
    """Adds `choice` to engine_choice.json under its signature; in a read-only run folder, only the
    process that measured it keeps it (choose_engine's `remembered`)."""
    try:
        files.write_json(
            exports_dir / CHOICE_FILE, {**_read_choices(exports_dir), choice.signature: choice.to_dict()}
        )
    except OSError as error:
        _LOGGER.warning("Could not cache the engine choice in %s: %s", exports_dir, error)


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Holds an exclusive lock on the file `lock` for the block: the workers of one server (and the
    servers sharing a run folder) measure one at a time, and exports made side by side record their
    figures one at a time (seeds_tf.prediction.export.record_export). Without a writable folder, no
    lock."""
    try:
        handle = open(lock, "a")  # noqa: SIM115 - closed below, after the lock is released
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
