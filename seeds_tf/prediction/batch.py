"""Identifying whole collections: a folder, a list or a manifest of images in, one row per image out.

The job (`identify`) lists its inputs, loads the run once, answers the images in large batches and
writes the answers in chunks. Each chunk is a part file beside the output (`OUT.parts/`), written
atomically: a job killed at any moment loses at most the chunk in flight, and the files on disk are
always whole. When every input is answered, the rows of the previous output and of the parts are
merged into the output, again atomically, and the parts are removed. Rerunning the same command
skips the inputs already answered (those of the output and of the parts) and retries the failed
ones: a failure is a row with its `error`, never a crashed job.

One machine answers through a tf.data pipeline (decoding and resizing in parallel, prefetching)
that feeds the run's engine; seeds_tf.prediction.batch_ray answers the same inputs on a Ray cluster.
Both go through `answer`, which reuses the predictions' own ranking and trust.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import fcntl
import itertools
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import tensorflow as tf

from seeds_tf.core import config, files
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import images, pipeline, sources
from seeds_tf.prediction import inference

_LOGGER = logging.getLogger(__name__)

OUTPUT_FORMATS = (".csv", ".jsonl")

MANIFEST_COLUMNS = ("path", "url")
"""Columns of a CSV manifest that name an image (in any case, spaces around allowed); a row takes
its path, else its URL."""

NAMES_ERRORS = "surrogateescape"
"""How names that are not UTF-8 (file names from old archives and cameras) are read and written:
kept byte for byte, as Python's os functions keep them, so each is found, answered and resumed."""

_LOG_EVERY_S = 30.0
_BUDGET_BYTES = 64 * 2**20
"""The most encoded bytes read ahead (see read_all), and crossing into tf.data at once (see _take),
beyond a single image: large batches of small photos, a few scans of hundreds of megabytes at a time."""
_PART_GLOB = "chunk-*"


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a job.

    Attributes:
        input: how the job names it in its output: a path relative to the input folder, or a list's
            or manifest's entry as written.
        source: where it is read from: an absolute path, or an http(s) URL.
    """

    input: str
    source: str

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))


@dataclasses.dataclass(frozen=True)
class IdentifyOptions:
    """How a job answers.

    Attributes:
        timestamp: the run; "" for the service's default run (the promoted one, else the newest).
        engine: an engine of seeds_tf.classifier.engines.ENGINES, or "auto" (the run's own choice).
        top_k: species and genera per row. Defaults to 5.
        batch_size: images per call of the engine. Defaults to 64: large batches keep the engine
            busy, and 64 299-px images are 69 MB of float32.
        chunk_size: rows per part file, the most a kill can lose (rows are made a batch at a time,
            so it loses a batch where batch_size is the larger). Defaults to 1024: a few seconds
            to a minute of work, and a million images make about a thousand part files.
        fetch_threads: URLs downloaded at once. Defaults to 16: downloads wait on the network, not
            on the CPU, and each stays within the limits of `fetch_policy`.
        fetch_policy: the limits of URL fetching. Defaults to sources.FetchPolicy.from_env() of
            the process that makes the options.
        prediction: the prediction options whose decision thresholds judge each row (the run's
            own calibrated ones, unless the configuration file sets others). Defaults to
            config.load(config.PredictConfig) in the process that makes the options.
    The two defaults are read once, by the job's own process: the workers of a Ray job, whose
    environment is their node's, fetch and judge as it says.
    """

    timestamp: str = ""
    engine: str = "auto"
    top_k: int = 5
    batch_size: int = 64
    chunk_size: int = 1024
    fetch_threads: int = 16
    fetch_policy: sources.FetchPolicy = dataclasses.field(default_factory=sources.FetchPolicy.from_env)
    prediction: config.PredictConfig = dataclasses.field(
        default_factory=lambda: config.load(config.PredictConfig)
    )

    def __post_init__(self):
        for name in ("top_k", "batch_size", "chunk_size", "fetch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(name, f"expected a positive integer. Received: {value!r}")


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a job did: `done` answered and `failed` (a row with its error) now, `skipped` answered
    by an earlier run of the same job, in `seconds` of answering."""

    output: str
    run_id: str
    engine: str
    total: int
    done: int
    skipped: int
    failed: int
    seconds: float

    @property
    def answered_none(self) -> bool:
        """Every image failed and none was answered before: the output holds no answer."""
        return self.failed > 0 and not (self.done or self.skipped)

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images_per_s": round(self.images_per_s, 2)}


Answerer = Callable[[inference.LoadedRun, str, Sequence[Item], IdentifyOptions], Iterator[dict[str, Any]]]
"""Answers `items` with a run and engine name: one row per item (see `answer`), in their order."""


def list_inputs(source: Path) -> list[Item]:
    """The images a job answers, in a stable order.

    `source` is a folder (its image files, recursively: see _folder_photos), a CSV manifest
    (suffix .csv, a header with a `path` and/or `url` column) or a list file (one path or URL a
    line; blank lines and lines starting with # are skipped, as rsync's --files-from skips them),
    each entry once. Relative paths in a list or manifest are relative to the file's folder.

    Raises:
        InputError: naming `input`, for a source that does not exist, an image file, a file of
            binary data, a manifest without a path or url column, or no image at all.
    """
    if source.is_dir():
        found = _folder_photos(source)
        items = [Item(path.relative_to(source).as_posix(), str(path.resolve())) for path in found]
    elif source.is_file():
        if images.is_image_name(source):
            raise InputError(
                "input", f"{str(source)!r} is an image: give its folder, or a list or CSV manifest naming it"
            )
        entries = _manifest_entries(source) if source.suffix.lower() == ".csv" else _list_entries(source)
        if any("\x00" in entry for entry in entries):  # no path or URL holds one
            raise InputError(
                "input", f"{str(source)!r} holds binary data: not a list of paths or URLs, nor a CSV manifest"
            )
        # An entry listed twice (a manifest's duplicate rows) is one image, answered once: its
        # output has one row per input, and the summary counts what the output holds.
        items = list(dict.fromkeys(_item(entry, source.parent) for entry in entries))
    else:
        raise InputError("input", f"{str(source)!r} is neither a folder nor a file")
    if not items:
        raise InputError("input", f"no image in {str(source)!r}")
    return items


def _folder_photos(folder: Path) -> list[Path]:
    """The image files under `folder`, sorted: images.files_under, through symbolic links to folders
    (a collection gathered from several disks by links); hidden files left out, answered they would
    double the failures (a Mac's `._IMG_0001.jpg`) or add photos thrown away (`.Trash-1000/`)."""
    paths = list(images.files_under(folder, follow_links=True))
    others = images.not_images(paths)
    if others:
        _LOGGER.warning(
            "Left out %d files of %s that are %s",
            sum(others.values()),
            folder,
            images.not_images_text(others),
        )
    return sorted(path for path in paths if images.is_image_name(path) and path.is_file())


def _list_entries(path: Path) -> list[str]:
    # A comment (`# photos of 2024`) answered would be a failed row; a photo whose name starts
    # with # is listed as ./#name.
    return [line for line in files.read_lines(path, errors=NAMES_ERRORS) if not line.startswith("#")]


def _manifest_entries(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", errors=NAMES_ERRORS, newline="") as stream:
        reader = csv.DictReader(stream)
        # A spreadsheet's headers: "Path", "URL", " url" after a comma and a space.
        named = {(name or "").strip().lower(): name for name in reader.fieldnames or ()}
        columns = [named[name] for name in MANIFEST_COLUMNS if name in named]
        if not columns:
            raise InputError(
                "input", f"{str(path)!r} has no {' or '.join(MANIFEST_COLUMNS)} column: {reader.fieldnames}"
            )
        entries = (next((row[c].strip() for c in columns if (row[c] or "").strip()), "") for row in reader)
        return [entry for entry in entries if entry]


def _item(entry: str, base: Path) -> Item:
    if entry.startswith(("http://", "https://")):
        return Item(entry, entry)
    return Item(entry, str((base / entry).resolve()))


def identify(
    roots: Roots,
    source: Path,
    output: Path,
    options: IdentifyOptions = IdentifyOptions(),
    answerer: Answerer | None = None,
) -> Summary:
    """Answers every image of `source` (see `list_inputs`) into `output`, resuming an earlier run.

    Args:
        roots: where the runs are.
        source: a folder, a list file or a CSV manifest.
        output: a .csv (one column per species, genus and probability) or .jsonl file.
        options: the run, engine, top_k and batch sizes.
        answerer: what answers the images; None for this machine's tf.data pipeline (`answer_locally`).

    Raises:
        InputError: for a bad source or output, an unknown run or engine, or an output written by
            another run, engine or top_k, or from other photos named alike.
    """
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InputError(
            "output", f"expected a file ending in {' or '.join(OUTPUT_FORMATS)}. Received: {str(output)!r}"
        )
    if output.is_dir():
        raise InputError("output", f"{str(output)!r} is a folder: name a file in it, e.g. answers{suffix}")
    items = list_inputs(source)
    run = inference.choose_run(roots, inference.RunCache(), options.timestamp)
    engine = run.engine(options.engine).name
    writer = (
        _CsvRows(options.top_k, trust_fields(run, options.prediction))
        if suffix == ".csv"
        else _JsonRows(min(options.top_k, len(run.classes)))
    )
    with _Job(output, writer) as job:
        answered = job.answered(run.run_id, engine, {item.input: item.source for item in items})
        pending = [item for item in items if item.input not in answered]
        _LOGGER.info(
            "Identifying %d images with run %s (%s); %d answered before",
            len(pending),
            run.run_id,
            engine,
            len(items) - len(pending),
        )
        counts = collections.Counter()
        started = time.perf_counter()
        with _progress(len(pending)) as progress:

            def tally(row: dict[str, Any]) -> dict[str, Any]:
                counts["failed" if row["error"] else "done"] += 1
                progress(1)
                return row

            rows = map(tally, (answerer or answer_locally)(run, engine, pending, options) if pending else ())
            while chunk := list(itertools.islice(rows, options.chunk_size)):
                job.commit(chunk)
        seconds = time.perf_counter() - started
        job.merge()
    summary = Summary(
        str(output),
        run.run_id,
        engine,
        len(items),
        counts["done"],
        len(items) - len(pending),
        counts["failed"],
        round(seconds, 3),
    )
    _LOGGER.info(
        "Identified %d images (%d skipped, %d failed) in %.1f s: %.1f images/s into %s",
        summary.done,
        summary.skipped,
        summary.failed,
        summary.seconds,
        summary.images_per_s,
        output,
    )
    return summary


def answer_locally(
    run: inference.LoadedRun, engine: str, items: Sequence[Item], options: IdentifyOptions
) -> Iterator[dict[str, Any]]:
    """Answers `items` on this machine: a tf.data pipeline reads (URLs in a bounded pool of
    threads), decodes and resizes images in parallel and prefetches whole batches, so the engine
    is never left waiting for pixels."""
    data = image_batches(items, run.config.image_size, options)
    start = 0
    for pixels, errors in data.as_numpy_iterator():
        batch = items[start : start + len(errors)]
        start += len(errors)
        decoded = [(image, _text(error)) for image, error in zip(pixels, errors, strict=True)]
        yield from answer(run, engine, batch, decoded, options)


def image_batches(items: Sequence[Item], image_size: int, options: IdentifyOptions) -> tf.data.Dataset:
    """Batches of (float32 images, error messages), in the order of `items`; an image that cannot be
    read has a blank in place of its pixels and its message."""
    signature = (tf.TensorSpec((None,), tf.string),) * 3

    def chunks() -> Iterator[tuple[np.ndarray, ...]]:
        """The reads in columns of up to a batch: from_generator costs a Python call per element
        it yields, more than decoding a small JPEG, so whole chunks cross into TensorFlow."""
        reads = read_all(items, options.fetch_policy, options.fetch_threads)
        while chunk := _take(reads, options.batch_size, _BUDGET_BYTES):
            names, encoded, errors = zip(*chunk, strict=True)
            yield tuple(np.array(column, dtype=object) for column in (_bytes(names), encoded, _bytes(errors)))

    data = tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch()

    @tf.autograph.experimental.do_not_convert  # no Python control flow to convert
    def load(name, encoded, error):
        pixels, error = tf.numpy_function(
            _decode, [name, encoded, error], (tf.uint8, tf.string), stateful=False
        )
        pixels.set_shape([None, None, 3])
        return pipeline.resize(pixels, image_size), error

    data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return data.batch(options.batch_size).prefetch(tf.data.AUTOTUNE)


def _take(reads: Iterator[tuple[str, bytes, str]], count: int, budget: int) -> list[tuple[str, bytes, str]]:
    """The next reads, up to `count` and no more encoded bytes than `budget` (at least one read):
    a chunk of a batch of 100-MB TIFF scans would hold gigabytes, and TensorFlow copies it again."""
    chunk, size = [], 0
    for read in reads:
        chunk.append(read)
        size += len(read[1])
        if len(chunk) >= count or size >= budget:
            break
    return chunk


def read_all(
    items: Iterable[Item], policy: sources.FetchPolicy, threads: int
) -> Iterator[tuple[str, bytes, str]]:
    """(input, encoded bytes, error) of each item in order, read in a pool of `threads` with at
    most twice as many reads in flight, and files of no more than _BUDGET_BYTES beyond the first:
    a slow URL holds up no more than the window behind it, and memory stays bounded whatever the
    number and size of the items (a URL's size is bounded by `policy`). The bytes are empty where
    the error says why."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        window: collections.deque[tuple[concurrent.futures.Future, int]] = collections.deque()
        in_flight = 0
        for item in items:
            size = _file_size(item)
            while window and (len(window) >= 2 * threads or in_flight + size > _BUDGET_BYTES):
                future, done = window.popleft()
                in_flight -= done
                yield future.result()
            window.append((pool.submit(_read, item, policy), size))
            in_flight += size
        while window:
            yield window.popleft()[0].result()


def _file_size(item: Item) -> int:
    """The bytes `item` will read: 0 for a URL or a file that cannot be read (its read says why)."""
    try:
        return 0 if item.is_url else Path(item.source).stat().st_size
    except OSError:
        return 0


def _read(item: Item, policy: sources.FetchPolicy) -> tuple[str, bytes, str]:
    try:
        if item.is_url:
            return item.input, sources.fetch_image_bytes(item.source, policy, "input"), ""
        return item.input, Path(item.source).read_bytes(), ""
    except InputError as error:
        return item.input, b"", error.problem
    except OSError as error:
        # Where it was looked for: a list's relative paths are relative to the list's folder, not
        # to where the command runs.
        where = f" ({item.source})" if item.source != item.input else ""
        return item.input, b"", f"cannot read {item.input!r}{where}: {error.strerror or error}"


_BLANK = np.zeros((images.MIN_SIDE, images.MIN_SIDE, 3), np.uint8)


def decode(name: str, encoded: bytes, error: str) -> tuple[np.ndarray, str]:
    """The RGB pixels of an image read by `read_all` (as seeds_tf.data.images decodes uploads, a
    JPEG over the API's limit of pixels reduced to fit) and "", or a blank image and why there are
    no pixels."""
    if error:
        return _BLANK, error
    try:
        return images.decode_image(encoded, "input", name, reduce_jpeg=True), ""
    except InputError as failure:
        return _BLANK, failure.problem


def _decode(name: bytes, encoded: bytes, error: bytes) -> tuple[np.ndarray, bytes]:
    pixels, problem = decode(_text(name), encoded, _text(error))
    return pixels, problem.encode("utf-8", NAMES_ERRORS)


def _bytes(texts: Sequence[str]) -> list[bytes]:
    """`texts` as TensorFlow strings: TensorFlow refuses str that is not valid UTF-8."""
    return [text.encode("utf-8", NAMES_ERRORS) for text in texts]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", NAMES_ERRORS)


def answer(
    run: inference.LoadedRun,
    engine: str,
    items: Sequence[Item],
    decoded: Sequence[tuple[np.ndarray, str]],
    options: IdentifyOptions,
) -> list[dict[str, Any]]:
    """One row per item: its input and source, top_k species and genera with their probabilities,
    the decision and OOD score (seeds_tf.prediction.inference's ranking and trust, with the reference
    specimens' evidence where the run has them, as the API answers), the run and engine; or its error.
    `decoded` holds (pixels, error) of each item, the pixels resized to the run's image size (so
    inference.observe sends them to the engine as they are) and ignored where there is an error."""
    good = [index for index, (_, error) in enumerate(decoded) if not error]
    answers: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
    if good:
        pixels = [decoded[index][0] for index in good]
        judged = inference.judged(run, pixels, engine, options.prediction)
        answers = dict(zip(good, zip(*judged, strict=True), strict=True))
    rows = []
    for index, item in enumerate(items):
        row: dict[str, Any] = {
            "input": item.input,
            "source": item.source,
            "run_id": run.run_id,
            "engine": engine,
        }
        if index in answers:
            probabilities, trusted = answers[index]
            ranking = inference.ranked(run, probabilities, options.top_k)
            row["species"] = [
                {"label": s["label"], "probability": s["probability"]} for s in ranking["species"]
            ]
            row["genera"] = ranking["genera"]
            row.update(trusted)
            row["error"] = ""
        else:
            row.update(species=[], genera=[], **dict.fromkeys(trust_fields(run, options.prediction)))
            row["error"] = decoded[index][1]
        rows.append(row)
    return rows


def trust_fields(run: inference.LoadedRun, prediction: config.PredictConfig) -> tuple[str, ...]:
    """The fields inference.trust gives each answer of `run` judged with `prediction` (decision, OOD
    score, ...): blank in a row with an error, and columns of a CSV output."""
    uniform = np.full(len(run.classes), 1 / len(run.classes))
    return tuple(inference.trust(run, uniform, prediction))


_ROW_KEYS = frozenset({"input", "run_id", "engine", "error"})
"""What every row has, answered or not (see answer): what resuming reads."""


class _JsonRows:
    """Rows as JSON Lines, as `answer` makes them, each answer with `ranks` species (top_k, or
    every class of a run with fewer)."""

    suffix = ".jsonl"

    def __init__(self, ranks: int):
        self.ranks = ranks

    def write(self, stream: TextIO, rows: Iterable[dict[str, Any]]) -> None:
        stream.writelines(json.dumps(row) + "\n" for row in rows)

    def read(self, stream: TextIO) -> Iterator[dict[str, Any]]:
        """The rows of an output or part file.

        Raises:
            InputError: naming `output`, for a line that is not a row of this job's answers (a file
                that is not an output of `seeds-tf identify`, or an answer of another top_k).
        """
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not _ROW_KEYS.issubset(row):
                raise InputError(
                    "output",
                    f"{stream.name!r} line {number} is not an answer of seeds-tf identify (a JSON object "
                    f"with {', '.join(sorted(_ROW_KEYS))}): name another output",
                )
            if row.get("species") and len(row["species"]) != self.ranks:  # a row with an error has none
                raise InputError(
                    "output",
                    f"{stream.name!r} has answers of {len(row['species'])} species, not {self.ranks} "
                    "(another top_k?)",
                )
            yield row


class _CsvRows:
    """Rows as CSV: one column per species, genus and probability, up to top_k (blank beyond a
    row's own), then the trust, source, run and engine columns; rows read back as text."""

    suffix = ".csv"

    def __init__(self, top_k: int, trust: Sequence[str]):
        ranks = range(1, top_k + 1)
        self.columns = [
            "input",
            *itertools.chain.from_iterable((f"species_{k}", f"species_{k}_probability") for k in ranks),
            *itertools.chain.from_iterable((f"genus_{k}", f"genus_{k}_probability") for k in ranks),
            *trust,
            "source",
            "run_id",
            "engine",
            "error",
        ]

    def write(self, stream: TextIO, rows: Iterable[dict[str, Any]]) -> None:
        writer = csv.DictWriter(stream, self.columns, restval="")
        writer.writeheader()
        writer.writerows(row if "species" not in row else self._flat(row) for row in rows)

    def read(self, stream: TextIO) -> Iterator[dict[str, Any]]:
        reader = csv.DictReader(stream)
        if reader.fieldnames is not None and reader.fieldnames != self.columns:
            raise InputError(
                "output", f"{stream.name!r} has other columns (another top_k?): {reader.fieldnames}"
            )
        return iter(reader)

    @staticmethod
    def _flat(row: dict[str, Any]) -> dict[str, Any]:
        flat = {key: value for key, value in row.items() if key not in ("species", "genera")}
        for k, species in enumerate(row["species"], 1):
            flat[f"species_{k}"], flat[f"species_{k}_probability"] = species["label"], species["probability"]
        for k, genus in enumerate(row["genera"], 1):
            flat[f"genus_{k}"], flat[f"genus_{k}_probability"] = genus["genus"], genus["probability"]
        return {key: "" if value is None else value for key, value in flat.items()}


class _Job:
    """The output of one job and its part files, held by one process at a time (a lock file)."""

    def __init__(self, output: Path, rows: _JsonRows | _CsvRows):
        self.output = output
        self.parts = output.with_name(output.name + ".parts")
        self._retired = output.with_name(f".{output.name}.merged")  # the parts, merged (see merge)
        self._rows = rows
        self._lock: TextIO | None = None
        self._next = 0

    def __enter__(self) -> _Job:
        """Takes the job's lock.

        Raises:
            InputError: naming `output`, when another job holds it, or its folder cannot be
                written (a file in the way, a read-only disk): before any image is answered.
        """
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.parts / "lock", "w")  # held until __exit__
        except OSError as error:
            raise InputError("output", f"cannot write {str(self.output)!r}: {error.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise InputError("output", f"another job is writing {str(self.output)!r}") from None
        # A kill during an atomic write leaves its hidden temporary behind, and a kill after a merge
        # the parts it retired (see merge): never a part, and no use.
        retired = [self._retired] if self._retired.exists() else []
        for stale in itertools.chain(self.parts.glob(".*"), files.leftover_temporaries(self.output), retired):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.close()

    def _sources(self) -> list[Path]:
        """The files holding rows, oldest first: the output of an earlier run, then the parts."""
        return [path for path in [self.output, *sorted(self.parts.glob(_PART_GLOB))] if path.is_file()]

    def _records(self, path: Path) -> Iterator[dict[str, Any]]:
        with open(path, encoding="utf-8", errors=NAMES_ERRORS, newline="") as stream:
            yield from self._rows.read(stream)

    def answered(self, run_id: str, engine: str, sources: dict[str, str]) -> set[str]:
        """The inputs answered without error so far, of the job whose inputs are read from `sources`
        (source by input).

        Raises:
            InputError: naming `output`, when those rows come from another run or engine, or answer
                an input of this job from another source: an output of another folder or list,
                whose photos are named alike (IMG_0001.jpg), would pass its answers off as theirs.
        """
        answered = set()
        for path in self._sources():
            for record in self._records(path):
                if (record["run_id"], record["engine"]) != (run_id, engine):
                    raise InputError(
                        "output",
                        f"{str(self.output)!r} holds answers of run {record['run_id']} ({record['engine']}), "
                        f"not {run_id} ({engine}): name that run (--run, --engine) or another output",
                    )
                self._check_source(record, sources)
                if not record["error"]:
                    answered.add(record["input"])
        parts = sorted(self.parts.glob(_PART_GLOB))
        self._next = int(parts[-1].name.split("-")[1].split(".")[0]) + 1 if parts else 0
        return answered

    def _check_source(self, record: dict[str, Any], sources: dict[str, str]) -> None:
        """Refuses `record` when it answers an input of this job from another source (see answered);
        a row without a source (JSON Lines of an earlier version) is taken as this job's."""
        expected = sources.get(record["input"], record.get("source"))
        if record.get("source", expected) != expected:
            raise InputError(
                "output",
                f"{str(self.output)!r} answers {record['input']!r} from {record['source']!r}, not "
                f"{expected!r}: it is the output of other photos, or of these photos in their former place "
                "(mount them there again to resume); name another output",
            )

    def commit(self, rows: Sequence[dict[str, Any]]) -> None:
        """Writes one chunk of rows as the next part file, atomically."""
        self._write(self.parts / f"chunk-{self._next:06d}{self._rows.suffix}", rows)
        self._next += 1

    def _write(self, path: Path, rows: Iterable[dict[str, Any]]) -> None:
        with (
            files.atomic_path(path) as temporary,
            open(temporary, "w", encoding="utf-8", errors=NAMES_ERRORS, newline="") as stream,
        ):
            self._rows.write(stream, rows)

    def merge(self) -> None:
        """Writes the output from the earlier output and the parts, atomically, one row per input
        (the latest: a retried failure replaces its row), then removes the parts. Streams: two passes
        over the files, holding only the inputs in memory."""
        sources = self._sources()
        latest = {
            record["input"]: (number, position)
            for number, path in enumerate(sources)
            for position, record in enumerate(self._records(path))
        }

        def rows() -> Iterator[dict[str, Any]]:
            for number, path in enumerate(sources):
                for position, record in enumerate(self._records(path)):
                    if latest[record["input"]] == (number, position):
                        yield record

        if sources != [self.output]:
            self._write(self.output, rows())
        # Retired in one rename, then deleted: parts left by a kill half-way through deleting them
        # would hold older rows that a rerun takes for newer than the output's.
        self.parts.rename(self._retired)
        shutil.rmtree(self._retired)


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """A function to call with the number of images just answered: it moves a tqdm bar (rate and
    ETA) on a terminal, and otherwise logs a line every _LOG_EVERY_S seconds (a log file or a job
    scheduler's output would fill up with a bar's redraws)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, unit="img", desc="identify", dynamic_ncols=True) as bar:
            yield bar.update
        return
    started = last = time.monotonic()
    count = 0

    def update(n: int) -> None:
        nonlocal count, last
        count += n
        now = time.monotonic()
        if now - last >= _LOG_EVERY_S or count == total:
            last = now
            rate = count / max(now - started, 1e-9)
            _LOGGER.info(
                "identify: %d/%d images (%.0f%%), %.1f images/s, %.0f s left",
                count,
                total,
                100 * count / max(total, 1),
                rate,
                (total - count) / rate if rate else 0,
            )

    yield update
