"""Prediction with a trained run: loading it once per process and naming the species in images."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from seeds_tf.classifier import engine_choice
from seeds_tf.classifier.engines import EXPORTS, Engine, engine_spec, load_engine
from seeds_tf.classifier.model import load_classifier
from seeds_tf.core import runs
from seeds_tf.core.config import ModelConfig, PredictConfig
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import images, pipeline
from seeds_tf.prediction import calibration as calibrating
from seeds_tf.prediction import neighbours as references

_LOGGER = logging.getLogger(__name__)

TEN_CROP_FRACTION = 0.875
"""Side of each ten-crop view as a fraction of the enlarged image, as in the classic ImageNet recipe."""


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run ready to predict: a checkpoint's model with the config and classes it was trained with,
    and the engines that run it, loaded on first use."""

    run_id: str
    checkpoint: str
    model: keras.Model
    config: ModelConfig
    classes: tuple[str, ...]
    info: tuple[str, ...] | None
    exports_dir: Path
    calibration: calibrating.Calibration | None = None
    index_dir: Path | None = None
    _engines: dict[str, Engine] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _lazy: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, compare=False, repr=False)

    def required_index(self) -> references.ReferenceIndex:
        """`reference_index`, for a request that asks for the reference specimens.

        Raises:
            InputError: naming `neighbours`, for a run without an index, or a checkpoint other than
                the final one (the index holds embeddings of the final model).
        """
        index = self.reference_index()
        if index is None and self.checkpoint != "final":
            raise InputError(
                "neighbours",
                f"the reference specimens are embedded by the final model: ask for ckpt_name final, "
                f"not {self.checkpoint}",
            )
        if index is None:
            raise InputError(
                "neighbours",
                f"run {self.run_id} has no index of its training images; "
                f"make it with: seeds-tf index {self.run_id}",
            )
        return index

    def reference_index(self) -> references.ReferenceIndex | None:
        """The index of the run's training images, loaded on first use; None for a run without."""
        with self._lock:
            if "index" not in self._lazy:
                gone = "gone"
                try:
                    self._lazy["index"] = references.load_index(self.index_dir) if self.index_dir else None
                except (OSError, EOFError, ValueError) as error:  # damaged since: was a 500 per request
                    self._lazy["index"], gone = None, f"damaged ({error})"
                if self._lazy["index"] is None and self.calibration and self.calibration.specimens:
                    _LOGGER.warning(
                        "Run %s was calibrated with its index, which is %s: its decisions go without "
                        "the reference specimens, less precise than its target, until `seeds-tf index %s`",
                        self.run_id,
                        gone,
                        self.run_id,
                    )
            return self._lazy["index"]

    def specimens(self) -> tuple[calibrating.Specimens, references.ReferenceIndex] | None:
        """What the decisions use of the reference specimens, with the index: None for a run
        without a calibration with specimens, or without its index."""
        specimens = self.calibration.specimens if self.calibration else None
        index = self.reference_index() if specimens else None
        return (specimens, index) if index is not None else None

    def engine(self, name: str = "auto") -> Engine:
        """The engine called `name` (seeds_tf.classifier.engines.ENGINES); "auto" is the fastest of
        the run's agreeing exports and keras on this CPU (`default_engine`), and keras for a
        checkpoint other than final. For a run whose answers use its reference specimens, the
        exports that agree count only if they give the embedding and their decisions agreed too.
        An export auto chose that does not load here is left for keras, with a warning.

        Raises:
            InputError: naming `engine`, for a name not in ENGINES or an export this run does not
                have; exports are made of the final model only.
        """
        automatic = name == "auto"
        embeds = automatic and self.specimens() is not None
        with self._lock:
            if automatic and self.checkpoint != "final":
                name = "keras"
            elif automatic:
                remembered = self._lazy.get("auto_choice")  # stands while its candidates do
                choice = default_engine(self.exports_dir, self.model, embeds=embeds, remembered=remembered)
                self._lazy["auto_choice"] = choice
                name = "keras" if choice.engine in self._lazy.get("unloadable", ()) else choice.engine
            if name not in self._engines:
                if name != "keras" and self.checkpoint != "final":
                    raise InputError(
                        "engine", f"exports are made of the final model, not {self.checkpoint!r}"
                    )
                try:
                    self._engines[name] = load_engine(name, self.model, self.exports_dir)
                except FileNotFoundError:
                    made = [
                        spec.name for spec in EXPORTS if spec.serves and spec.path(self.exports_dir).exists()
                    ]
                    raise InputError(
                        "engine",
                        f"run {self.run_id} has no {name} export (made: {made or 'none'}); "
                        f"make it with: {self._export_command(name)}",
                    ) from None
                except InputError:
                    raise
                except Exception as error:
                    if name == "keras":
                        raise
                    problem = (
                        f"run {self.run_id}'s {name} export does not load here ({error}); "
                        f"make it again with: {self._export_command(name)}"
                    )
                    if not automatic:
                        # A truncated or foreign export failed the request with a 500: the caller
                        # named it, and may name another, as for a broken run.
                        raise InputError("engine", problem) from None
                    # The choice recorded before the file broke (or on a runtime that read it) made
                    # every request that named no engine fail: keras answers them, as it did before.
                    _LOGGER.warning("Run %s answers with keras, not auto's choice: %s", self.run_id, problem)
                    self._lazy.setdefault("unloadable", set()).add(name)
                    name = "keras"
                    if name not in self._engines:
                        self._engines[name] = load_engine(name, self.model, self.exports_dir)
            return self._engines[name]

    def _export_command(self, name: str) -> str:
        """The command that makes the export called `name` of this run."""
        spec = engine_spec(name)
        return f"seeds-tf export {self.run_id} --format {spec.format} --precision {spec.precision}"


def default_engine(
    exports_dir: Path,
    model: keras.Model,
    remeasure: bool = False,
    *,
    embeds: bool = False,
    remembered: engine_choice.EngineChoice | None = None,
) -> engine_choice.EngineChoice:
    """The engine a run whose final model is `model` serves with when a request says "auto", and
    why: the choice recorded for this CPU in `exports_dir` (or `remembered`, the one this process
    measured; default None), else (or with `remeasure`, default False) measured now, a short,
    bounded timing of keras and each agreeing export this CPU runs natively, and recorded; see
    seeds_tf.classifier.engine_choice. With `embeds` (a run whose answers use its reference
    specimens; default False), only exports that give the embedding and whose decisions agreed are
    candidates. One run folder serves every node of a mixed fleet with its fastest engine, and
    never one slower than keras."""
    return engine_choice.choose_engine(
        exports_dir,
        functools.partial(load_engine, model=model, exports_dir=exports_dir),
        model.input_shape[1],
        remeasure=remeasure,
        embeds=embeds,
        remembered=remembered,
    )


def load_run(
    layout: runs.RunLayout, checkpoint: str = "final", model: keras.Model | None = None
) -> LoadedRun:
    """Loads a checkpoint of a complete run, with its class names and model config.

    Args:
        layout: the run.
        checkpoint: "final", "best" or a periodic checkpoint's name. Defaults to "final".
        model: the checkpoint's model already in memory (a training's just-saved final model), used
            instead of reading the file again. Defaults to None (read from the run).
    """
    model_file = runs.resolve_checkpoint(layout, checkpoint)
    config = layout.config().model
    classes = layout.classes()
    info = layout.info()
    model = load_classifier(model_file) if model is None else model
    if model.output_shape[-1] != len(classes):
        raise ValueError(
            f"Run {layout.run_id}: the model has {model.output_shape[-1]} outputs for {len(classes)} classes"
        )
    # The temperature and thresholds were fitted to the final model: another checkpoint answers uncalibrated.
    calibration = calibrating.load_calibration(layout) if checkpoint == "final" else None
    _LOGGER.info(
        "Loaded run %s/%s (%s, %d px, %s)",
        layout.run_id,
        checkpoint,
        config.modelname,
        config.image_size,
        f"temperature {calibration.temperature:.3f}" if calibration else "not calibrated",
    )
    return LoadedRun(
        layout.run_id,
        checkpoint,
        model,
        config,
        classes,
        info,
        layout.exports_dir,
        calibration,
        layout.index_dir if checkpoint == "final" else None,
    )


class BrokenRunError(InputError):
    """A run or checkpoint whose files do not load (corrupt weights, a model that does not fit its
    classes): the caller named it, so it is the caller's to choose another."""


class RunCache:
    """The checkpoints loaded in this process, the least recently used dropped beyond `capacity`.

    A checkpoint is keyed by run, name and the modification times of its file, of the run's
    calibration and of its index (references.json, written last), so a file replaced on disk is
    loaded again: an index made by `seeds-tf index` on a served run is searched at the next
    request. A checkpoint that fails to load is remembered as broken under the same key, and not
    read again until its file changes.
    Thread-safe: loading happens under a lock.
    """

    def __init__(self, capacity: int = 2):
        self._capacity = capacity
        self._runs: collections.OrderedDict[tuple[str, str, int, int, int], LoadedRun] = (
            collections.OrderedDict()
        )
        self._broken: dict[tuple[str, str, int, int, int], str] = {}
        self._lock = threading.Lock()

    def get(self, layout: runs.RunLayout, checkpoint: str = "final") -> LoadedRun:
        """The loaded checkpoint.

        Raises:
            InputError: for a checkpoint the run does not have.
            BrokenRunError: naming `timestamp` (the final model) or `ckpt_name` (another checkpoint),
                when the files do not load.
        """
        model_file = runs.resolve_checkpoint(layout, checkpoint)
        # A calibration or an index made later (`seeds-tf calibrate`, `seeds-tf index` on a served
        # run) is picked up too.
        later = (layout.calibration_file, layout.index_dir / runs.INDEX_REFERENCES)
        made = tuple(path.stat().st_mtime_ns if path.is_file() else 0 for path in later)
        key = (layout.run_id, checkpoint, model_file.stat().st_mtime_ns, *made)
        with self._lock:
            if key not in self._runs and key not in self._broken:
                try:
                    self._runs[key] = load_run(layout, checkpoint)
                except calibrating.UnreadableCalibration as error:
                    _LOGGER.error("Run %s/%s does not load: %s", layout.run_id, checkpoint, error)
                    self._broken[key] = str(error)
                except Exception as error:
                    _LOGGER.exception("Run %s/%s does not load", layout.run_id, checkpoint)
                    self._broken[key] = f"ckpts/{model_file.name} does not load: {error}"
                while len(self._runs) > self._capacity:
                    self._runs.popitem(last=False)
            if key in self._broken:
                raise _broken_run(layout.run_id, checkpoint, self._broken[key])
            self._runs.move_to_end(key)
            return self._runs[key]


def _broken_run(run_id: str, checkpoint: str, reason: str) -> BrokenRunError:
    if checkpoint == "final":
        return BrokenRunError("timestamp", f"run {run_id} is broken: {reason}")
    return BrokenRunError("ckpt_name", f"checkpoint {checkpoint!r} of run {run_id} is broken: {reason}")


def choose_run(roots: Roots, cache: RunCache, timestamp: str = "", checkpoint: str = "final") -> LoadedRun:
    """The run `timestamp` names, or else the first working run of runs.default_order that loads
    (the promoted run, else the newest): a run whose files turn out not to load is logged and
    skipped for the next one, so one damaged run never takes the service down.

    Raises:
        InputError: naming `timestamp` for an unknown or broken run (or when no run loads), or
            `ckpt_name` for a checkpoint the run does not have or that does not load.
    """
    if timestamp:
        return cache.get(runs.resolve_run(roots.models, timestamp), checkpoint)
    listing = runs.list_runs(roots.models)
    if not listing.working:
        runs.resolve_run(roots.models, "")  # raises: no working run, and why
    problems = []
    for run_id in runs.default_order(roots.models, listing):
        try:
            return cache.get(runs.RunLayout(roots.models / run_id), checkpoint)
        except BrokenRunError as error:
            _LOGGER.warning("Skipping run %s: %s", run_id, error.problem)
            problems.append(error.problem)
    raise InputError("timestamp", f"no run in {roots.models} loads: {'; '.join(problems)}")


def tta_views(pixels: np.ndarray, image_size: int, tta: str) -> np.ndarray:
    """The deterministic views of one image that test-time augmentation averages over.

    Returns float32 images of shape (views, image_size, image_size, 3): 1 for "none", 2 for "flip"
    (the image and its mirror image), 10 for "ten_crop" (corners and centre of the image enlarged by
    1 / TEN_CROP_FRACTION, and their mirror images).
    """
    # Cut and mirrored in NumPy, the same pixels: TensorFlow's eager slicing and stacking cost
    # 0.06-1 ms more per image, paid on every image a request or an identify job answers.
    if tta == "ten_crop":
        enlarged = round(image_size / TEN_CROP_FRACTION)
        big = pipeline.resize(pixels, enlarged).numpy()
        far = enlarged - image_size
        corners = [(0, 0), (0, far), (far, 0), (far, far), (far // 2, far // 2)]
        crops = np.stack([big[y : y + image_size, x : x + image_size] for y, x in corners])
        return np.concatenate([crops, crops[:, :, ::-1]])
    view = pipeline.resize(pixels, image_size).numpy()[np.newaxis]
    return np.concatenate([view, view[:, :, ::-1]]) if tta == "flip" else view


def class_probabilities(
    run: LoadedRun, pixels: Sequence[np.ndarray], tta: str = "none", engine: str = "keras"
) -> np.ndarray:
    """Softmax probabilities, shape (len(pixels), num_classes), each the mean over its TTA views,
    calibrated by the run's temperature where it has one (each view's, before the mean). All views
    of all images go through the network as one batch."""
    return observe(run, pixels, tta, engine)[0]


def observe(
    run: LoadedRun,
    pixels: Sequence[np.ndarray],
    tta: str = "none",
    engine: str = "keras",
    *,
    embed: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """class_probabilities, and with `embed` each image's embedding: the mean of the unit pooled
    features of its TTA views, float32 (len(pixels), dimension); else None.

    One forward pass of the engine gives both (Engine.observe). An export made before exports
    carried the embedding gives the probabilities alone: its embeddings take a pass of the keras
    engine (the whole backbone again: benchmarks/retrieval.py measures it).
    """
    views = [tta_views(image, run.config.image_size, tta) for image in pixels]
    batch = np.concatenate(views)
    outputs, features = run.engine(engine).observe(batch)
    if not embed:
        features = None
    elif features is None:
        features = run.engine("keras").observe(batch)[1]
    outputs = np.asarray(outputs, dtype=np.float64)
    if run.calibration is not None:
        outputs = run.calibration.scale(outputs)
    counts = list(itertools.pairwise(np.cumsum([0, *(len(v) for v in views)])))
    probabilities = np.stack([outputs[start:end].mean(axis=0) for start, end in counts])
    if features is None:
        return probabilities, None
    unit = references.normalised(np.asarray(features, dtype=np.float32))
    return probabilities, np.stack([unit[start:end].mean(axis=0) for start, end in counts])


def species_links(name: str) -> dict[str, str]:
    """Where to read about a species: Wikipedia, GBIF's species search and an image search."""
    return {
        "wikipedia": f"https://en.wikipedia.org/wiki/{urllib.parse.quote(name.replace(' ', '_'))}",
        "gbif": f"https://www.gbif.org/species/search?q={urllib.parse.quote(name)}",
        "images": f"https://www.google.com/search?tbm=isch&q={urllib.parse.quote_plus(name)}",
    }


def ranked(run: LoadedRun, probabilities: np.ndarray, top_k: int) -> dict[str, list[dict[str, Any]]]:
    """The top_k species (with info and links) and the top_k genera of one probability vector.

    A genus is the first word of "Genus species"; its probability is the sum over its species.
    """
    best = np.argsort(-probabilities, kind="stable")[: min(top_k, len(run.classes))]
    species = [
        {
            "label_id": int(i),
            "label": run.classes[i],
            "probability": float(probabilities[i]),
            "info": run.info[i] if run.info else "",
            "links": species_links(run.classes[i]),
        }
        for i in best
    ]
    genus_names, genus_of_class = _genera(run.classes)
    by_genus = calibrating.genus_probabilities(probabilities, genus_of_class)
    best_genera = np.argsort(-by_genus, kind="stable")[:top_k]
    return {
        "species": species,
        "genera": [{"genus": genus_names[i], "probability": float(by_genus[i])} for i in best_genera],
    }


@functools.cache
def _genera(classes: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """calibration.genus_index, once per run's classes."""
    return calibrating.genus_index(classes)


def trust(
    run: LoadedRun,
    probabilities: np.ndarray,
    config: PredictConfig,
    evidence: tuple[int, float] | None = None,
) -> dict[str, Any]:
    """How far to trust one (calibrated) probability vector: the decision ("species", "genus",
    "unknown", or "not_calibrated" for a run without calibration and no thresholds in the request),
    its out-of-distribution score and whether the image is flagged as unlike the training images
    (which makes the decision "unknown").

    With `evidence` (the majority species of the image's nearest references and its specimen
    distance, for a run whose calibration has specimens: LoadedRun.specimens), the flag is raised
    by either score passing its threshold, and the decision follows calibration.decide's neighbour
    rule: "species" only where the references' majority is the top species, "genus" only where it
    is of the top genus. `neighbours_agree` and `specimen_distance` say what they were (None without).
    """
    own = run.calibration.thresholds if run.calibration else None
    species = config.species_threshold if config.species_threshold >= 0 else own.species if own else None
    genus = config.genus_threshold if config.genus_threshold >= 0 else own.genus if own else None
    score = float(calibrating.ood_score(probabilities))
    voted, distance = evidence if evidence is not None else (None, None)
    flagged = bool(run.calibration.out_of_distribution(probabilities, distance)) if run.calibration else None
    if species is None or genus is None:
        decision = "not_calibrated"
    elif flagged:
        decision = "unknown"
    else:
        thresholds = calibrating.Thresholds(species, genus, own.target_precision if own else float("nan"))
        decision = str(calibrating.decide(probabilities, _genera(run.classes)[1], thresholds, voted))
    return {
        "decision": decision,
        "ood_score": round(score, 6),
        "out_of_distribution": flagged,
        "neighbours_agree": None if voted is None else bool(voted == int(np.argmax(probabilities))),
        "specimen_distance": None if distance is None else round(float(distance), 6),
    }


def judged(
    run: LoadedRun, pixels: Sequence[np.ndarray], engine: str, config: PredictConfig
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """class_probabilities of `pixels` (no TTA) and the `trust` of each, with the reference
    specimens' evidence where the run has them (LoadedRun.specimens): each image judged as the
    API judges it, from one pass of `engine`."""
    with_specimens = run.specimens() is not None
    probabilities, embeddings = observe(run, pixels, "none", engine, embed=with_specimens)
    evidence = specimen_evidence(run, embeddings) if with_specimens else [None] * len(pixels)
    return probabilities, [
        trust(run, row, config, said) for row, said in zip(probabilities, evidence, strict=True)
    ]


def specimen_evidence(run: LoadedRun, embeddings: np.ndarray) -> list[tuple[int, float]]:
    """What the reference specimens say of each embedding (observe's), as `trust` takes it, for a
    run with specimens (LoadedRun.specimens)."""
    rule, index = run.specimens()
    return _evidence(rule, index, *index.search(embeddings, rule.references_needed))


def _evidence(
    rule: calibrating.Specimens,
    index: references.ReferenceIndex,
    indices: np.ndarray,
    similarities: np.ndarray,
) -> list[tuple[int, float]]:
    """The evidence by the rule the run's thresholds were chosen under, not today's defaults."""
    said = references.specimen_evidence(index, indices, similarities, rule.neighbours, rule.distance_rank)
    return list(zip(*said, strict=True))


def nearest_references(run: LoadedRun, pixels: Sequence[np.ndarray], k: int, merge: bool) -> list[list[dict]]:
    """The k training images most like each image (one list for all of them when `merge`: their
    mean embedding), from the run's index.

    Raises:
        InputError: naming `neighbours`, for a run without an index.
    """
    index = run.required_index()
    queries = observe(run, pixels, "none", "keras", embed=True)[1]
    if merge:
        queries = queries.mean(axis=0, keepdims=True)
    return references.neighbours_of(index, queries, k, run.classes)


def analyse(
    roots: Roots, cache: RunCache, config: PredictConfig, uploads: Sequence[images.Upload | tuple[str, bytes]]
) -> tuple[LoadedRun, list[np.ndarray], np.ndarray]:
    """The run chosen by `config`, the decoded images and their class probabilities.

    Raises:
        InputError: for an unknown run or checkpoint, or an image that cannot be decoded.
    """
    pixels = images.decode_images(uploads)
    run = choose_run(roots, cache, config.timestamp, config.ckpt_name)
    return run, pixels, class_probabilities(run, pixels, config.tta, config.engine)


def predict(
    roots: Roots, cache: RunCache, config: PredictConfig, uploads: Sequence[images.Upload | tuple[str, bytes]]
) -> dict[str, Any]:
    """Answers one prediction request: the run and checkpoint `config` names say which species
    are in each image.

    Args:
        roots: where the runs are.
        cache: the checkpoints already loaded in this process.
        config: top_k, tta, merge, and the run and checkpoint to use.
        uploads: each image (images.Upload, or a (name, bytes) pair), in the order of the response.

    Raises:
        InputError: for an unknown run or checkpoint, or an image that cannot be decoded.
    """
    pixels = images.decode_images(uploads)
    run = choose_run(roots, cache, config.timestamp, config.ckpt_name)
    specimens = run.specimens()
    index = run.required_index() if config.neighbours else (specimens[1] if specimens else None)
    engine = run.engine(config.engine).name  # resolved once: the answer names the engine that ran
    probabilities, embeddings = observe(
        run, pixels, config.tta, engine, embed=bool(config.neighbours) or specimens is not None
    )
    names = [upload[0] for upload in uploads]
    if config.merge:
        # One specimen in several photos: one answer from the mean of their probabilities (and of
        # their embeddings).
        names, probabilities = [" + ".join(names)], probabilities.mean(axis=0, keepdims=True)
        embeddings = None if embeddings is None else embeddings.mean(axis=0, keepdims=True)
    evidence: list[tuple[int, float] | None] = [None] * len(names)
    found: list[list[dict[str, Any]]] = []
    if embeddings is not None:
        # One search serves the decision's evidence and the neighbours shown.
        needed = specimens[0].references_needed if specimens else 0
        indices, similarities = index.search(embeddings, max(config.neighbours, needed))
        if specimens is not None:
            evidence = _evidence(*specimens, indices, similarities)
        k = config.neighbours
        found = references.specimens(index, indices[:, :k], similarities[:, :k], run.classes) if k else []
    results = [
        {"image": name, **ranked(run, row, config.top_k), **trust(run, row, config, said)}
        for name, row, said in zip(names, probabilities, evidence, strict=True)
    ]
    if config.neighbours:
        for result, shown in zip(results, found, strict=True):
            result["neighbours"] = shown
    first = results[0]
    return {
        "run_id": run.run_id,
        "checkpoint": run.checkpoint,
        "tta": config.tta,
        "engine": engine,
        "merged": config.merge,
        "calibrated": run.calibration is not None,
        "results": results,
        "labels": [species["label"] for species in first["species"]],
        "probabilities": [species["probability"] for species in first["species"]],
        "decision": first["decision"],
    }
