"""Exports of a run to TensorFlow Lite, ONNX and SavedModel (fp32 and bf16), and the engines that
run them, checked against the run's own Keras model on a copy of the session's tiny run (fast to
convert: tests.helpers.TINY_OPTIONS)."""

import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from seeds_tf import cli
from seeds_tf.classifier import engine_choice, engines
from seeds_tf.classifier.model import load_classifier
from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from seeds_tf.data import images
from seeds_tf.data.splits import read_split
from seeds_tf.prediction import export, inference
from tests.helpers import copy_roots, seed_photo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, session_roots, tiny_run) -> tuple[Roots, runs.RunLayout]:
    """A copy of the session's tiny run and dataset, which the module's exports are written into."""
    roots = copy_roots(session_roots, tmp_path_factory.mktemp("export"))
    return roots, runs.RunLayout(roots.models / tiny_run)


@pytest.fixture(scope="module")
def exported(tiny) -> dict[str, object]:
    """Every export of the tiny run, made once for the module by export_models from one load of
    its final model (`seeds-tf export`, one export_model each, is test_the_export_command's)."""
    roots, layout = tiny
    calibration = export.calibration_images(layout, roots.data / "tiny" / "images")
    model = load_classifier(runs.resolve_checkpoint(layout, "final"))
    return export.export_models(model, engines.EXPORTS, layout.exports_dir, calibration)


def _test_split(roots: Roots, layout: runs.RunLayout, run: inference.LoadedRun):
    images_dir = roots.data / "tiny" / "images"
    return read_split(layout.dataset_dir / "test.txt", "test", images_dir, len(run.classes), "test")


def test_every_export_is_written_into_the_run(tiny, exported):
    _, layout = tiny
    assert sorted(path.name for path in layout.exports_dir.iterdir()) == [
        "onnx_fp32.onnx",
        "onnx_int8.onnx",
        "savedmodel_bf16",
        "savedmodel_fp32",
        "tflite_dynamic_int8.tflite",
        "tflite_fp32.tflite",
        "tflite_int8.tflite",
    ]
    assert (exported["savedmodel_fp32"] / "saved_model.pb").is_file()
    for fmt in ("tflite", "onnx"):
        assert exported[f"{fmt}_int8"].stat().st_size < exported[f"{fmt}_fp32"].stat().st_size / 2


TOLERANCES = {
    "tflite_fp32": 1e-4,
    "onnx_fp32": 1e-4,
    "tflite_dynamic_int8": 0.05,
    "tflite_int8": 0.1,
    "onnx_int8": 0.1,
    "savedmodel_bf16": 0.05,
}
"""How far each engine's probabilities may be from Keras': a new engine of the table needs one."""


@pytest.mark.parametrize("engine", [name for name in engines.ENGINES if name != "keras"])
def test_each_engine_gives_the_keras_probabilities_and_embedding(tiny, exported, engine):
    tolerance = TOLERANCES[engine]
    roots, layout = tiny
    run = inference.load_run(layout)
    pixels = [images.read_image(seed_photo(roots, index)) for index in range(4)]
    got, embedding = inference.observe(run, pixels, engine=engine, embed=True)
    assert set(run._engines) == {engine}, "one pass of the export gives both: no pass of keras"
    assert run.engine(engine).embeds
    reference, reference_embedding = inference.observe(run, pixels, engine="keras", embed=True)
    assert got.shape == reference.shape
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-3)
    assert np.abs(got - reference).max() < tolerance
    # The softmax in float, in every engine (before the run's temperature, which normalises):
    # onnx_int8's quantized one gave steps of 1/255, a rare species' as 0, rows off 1 by up to 0.008.
    size = run.config.image_size
    raw = run.engine(engine)(np.concatenate([inference.tta_views(image, size, "none") for image in pixels]))
    np.testing.assert_allclose(raw.sum(axis=1), 1.0, atol=1e-5)
    assert embedding.shape == reference_embedding.shape
    similarity = np.sum(embedding * reference_embedding, axis=1)  # unit vectors: their cosines
    assert similarity.min() > 1 - tolerance


def test_an_export_without_the_embedding_serves_by_name_and_never_under_auto(tiny, tmp_path):
    """An export made before exports carried the embedding (one output, as TensorFlow Lite writes
    the classifier alone) still answers by name; the run's answers then take their embedding from
    a pass of the keras engine, and auto never takes it for a run with specimens."""
    import tensorflow as tf

    roots, layout = tiny
    old = runs.RunLayout(tmp_path / "models" / layout.run_id)
    shutil.copytree(layout.root, old.root, ignore=shutil.ignore_patterns(layout.exports_dir.name))
    saved = tmp_path / "savedmodel"
    load_classifier(layout.final_model).export(str(saved), format="tf_saved_model", verbose=False)
    old.exports_dir.mkdir()
    tflite = engines.engine_spec("tflite_fp32")
    tflite.path(old.exports_dir).write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())

    run = inference.load_run(old)
    pixels = [images.read_image(seed_photo(roots, index)) for index in range(4)]
    got, embedding = inference.observe(run, pixels, engine=tflite.name, embed=True)
    assert not run.engine(tflite.name).embeds
    assert set(run._engines) == {tflite.name, "keras"}, "the embedding took a pass of keras"
    reference, reference_embedding = inference.observe(run, pixels, engine="keras", embed=True)
    np.testing.assert_array_equal(embedding, reference_embedding)
    assert np.abs(got - reference).max() < TOLERANCES[tflite.name]

    figures = export.compare_with_keras(run, tflite.name, _test_split(roots, old, run))
    assert figures["agreement_top1"] == 1.0
    assert "agreement_decision" not in figures
    export.record_export(old, tflite.name, figures)
    assert engine_choice.candidates(old.exports_dir, engines.cpu_flags()) == ("keras", tflite.name)
    assert engine_choice.candidates(old.exports_dir, engines.cpu_flags(), embeds=True) == ("keras",)


def test_agreement_with_keras_is_measured_on_the_test_split(tiny, exported):
    roots, layout = tiny
    run = inference.load_run(layout)
    test = _test_split(roots, layout, run)
    figures = export.compare_with_keras(run, "tflite_fp32", test)
    assert figures["images"] == len(test.paths)
    assert figures["agreement_top1"] == 1.0
    assert figures["agreement_decision"] == 1.0  # the run's answers use its reference specimens
    assert figures["top1"] == figures["keras_top1"]
    assert figures["top1_change"] == 0.0


def test_a_run_serves_with_an_export_only_if_it_agrees(tiny, exported, tmp_path):
    _, layout = tiny
    with pytest.raises(InputError) as refused:
        export.record_export(layout, "tflite_int8", {"agreement_top1": 0.9}, serve=True)
    assert refused.value.field == "serve"
    assert "engine=auto will not run it" in refused.value.problem
    assert engine_choice.candidates(layout.exports_dir, engines.cpu_flags()) == ("keras",)

    export.record_export(layout, "tflite_fp32", {"agreement_top1": 1.0}, serve=True)
    flags = engines.cpu_flags()
    assert engine_choice.candidates(layout.exports_dir, flags) == ("keras", "tflite_fp32")
    # The run's answers use its reference specimens: an export qualifies once its decisions agree.
    assert engine_choice.candidates(layout.exports_dir, flags, embeds=True) == ("keras",)
    assert inference.load_run(layout).engine("auto").name == "keras"
    assert engine_choice.recorded_choice(layout.exports_dir, embeds=True).reason == "only keras"
    with pytest.raises(InputError) as refused:
        export.record_export(
            layout, "tflite_int8", {"agreement_top1": 1.0, "agreement_decision": 0.9}, serve=True, embeds=True
        )
    assert "(agreement_decision)" in refused.value.problem
    export.record_export(
        layout, "tflite_fp32", {"agreement_top1": 1.0, "agreement_decision": 1.0}, serve=True, embeds=True
    )
    assert engine_choice.candidates(layout.exports_dir, flags, embeds=True) == ("keras", "tflite_fp32")
    auto = inference.load_run(layout).engine("auto").name  # measured here, at the first load
    assert auto == engine_choice.recorded_choice(layout.exports_dir, embeds=True).engine
    plain = _without_index(layout, tmp_path)
    auto = inference.load_run(plain).engine("auto").name  # measured here, at the first load
    assert auto == engine_choice.recorded_choice(plain.exports_dir).engine
    assert inference.load_run(plain, "best").engine("auto").name == "keras"  # exports are of final
    recorded = files.read_json(layout.exports_dir / runs.EXPORTS_INDEX)
    assert set(recorded["exports"]) == {"tflite_int8", "tflite_fp32"}


def test_exports_made_side_by_side_record_the_figures_of_each(tmp_path):
    """Two `seeds-tf export` of one run at once each read exports.json, added their figures and
    wrote it: one export's figures were lost, and engine=auto silently never ran it."""
    layout = runs.RunLayout(tmp_path / "run")
    layout.exports_dir.mkdir(parents=True)

    def record(tag: str) -> None:
        for number in range(40):
            export.record_export(layout, f"{tag}_{number}", {"agreement_top1": 1.0})

    workers = [threading.Thread(target=record, args=(tag,)) for tag in "abcd"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(files.read_json(layout.exports_dir / runs.EXPORTS_INDEX)["exports"]) == 160


def test_a_run_without_a_test_split_is_exported_but_not_served_by_it(tiny, tmp_path):
    """The test split is optional in a dataset: the export is made and recorded without figures,
    and `--serve` refuses it, naming why, instead of failing on the missing file."""
    roots, layout = tiny
    copy = Roots(data=roots.data, models=tmp_path / "models")
    untested = runs.RunLayout(copy.models / layout.run_id)
    shutil.copytree(layout.root, untested.root, ignore=shutil.ignore_patterns("exports"))
    (untested.dataset_dir / "test.txt").unlink()
    spec = engines.engine_spec("tflite_fp32")
    with pytest.raises(InputError) as refused:
        export.export_run(copy, layout.run_id, spec, serve=True)
    assert refused.value.field == "serve"
    assert "has no labelled test split" in refused.value.problem
    assert spec.path(untested.exports_dir).is_file()
    assert files.read_json(untested.exports_dir / runs.EXPORTS_INDEX)["exports"] == {"tflite_fp32": {}}
    assert engine_choice.candidates(untested.exports_dir, engines.cpu_flags()) == ("keras",)


def test_a_re_export_is_never_chosen_on_the_figures_of_the_export_it_replaces(tiny, exported, tmp_path):
    """A re-export replaced the file, then failed before its comparison (an image of the test split
    gone): the figures of the export it replaced stayed beside a file nothing had checked, and
    `auto` ran it."""
    roots, layout = tiny
    copy = Roots(data=roots.data, models=tmp_path / "models")
    again = runs.RunLayout(copy.models / layout.run_id)
    shutil.copytree(layout.root, again.root, ignore=shutil.ignore_patterns("exports"))
    spec = engines.engine_spec("tflite_fp32")
    again.exports_dir.mkdir()
    shutil.copy(exported["tflite_fp32"], spec.path(again.exports_dir))
    export.record_export(again, "tflite_fp32", {"agreement_top1": 1.0})
    assert "tflite_fp32" in engine_choice.candidates(again.exports_dir, engines.cpu_flags())
    with open(again.dataset_dir / "test.txt", "a") as listing:
        listing.write("gone.jpg 0\n")
    with pytest.raises(InputError, match=r"gone\.jpg"):
        export.export_run(copy, layout.run_id, spec, serve=True)
    assert spec.path(again.exports_dir).is_file()  # the new file, unchecked
    assert files.read_json(again.exports_dir / runs.EXPORTS_INDEX)["exports"] == {}
    assert engine_choice.candidates(again.exports_dir, engines.cpu_flags()) == ("keras",)


def test_serve_refuses_an_export_seeds_tf_does_not_run_before_exporting(tiny, tmp_path):
    """`--serve` on the SavedModel for TensorFlow Serving printed the export alone, as if it had
    been checked and measured: it is refused, naming why, and nothing is written."""
    roots, layout = tiny
    spec = engines.export_spec("savedmodel", "fp32")
    copy = Roots(data=roots.data, models=tmp_path / "models")
    shutil.copytree(layout.root, copy.models / layout.run_id, ignore=shutil.ignore_patterns("exports"))
    with pytest.raises(InputError) as refused:
        export.export_run(copy, layout.run_id, spec, serve=True)
    assert refused.value.field == "serve"
    assert "savedmodel_fp32 is exported for TensorFlow Serving" in refused.value.problem
    assert not (copy.models / layout.run_id / "exports").exists()


def test_a_folder_export_replaces_one_an_earlier_export_left_half_replaced(tmp_path):
    """An export killed between its two renames leaves the old copy behind: the next one still
    lands (a rename onto a folder that is not empty would fail)."""
    made = tmp_path / "made"
    made.mkdir()
    (made / "saved_model.pb").write_text("new")
    destination = tmp_path / "exports" / "savedmodel_bf16"
    destination.mkdir(parents=True)
    (destination / "saved_model.pb").write_text("old")
    left = destination.with_name(".savedmodel_bf16.old")
    left.mkdir()
    (left / "saved_model.pb").write_text("older")
    export._replace_folder(made, destination)
    assert (destination / "saved_model.pb").read_text() == "new"
    assert [path.name for path in destination.parent.iterdir()] == ["savedmodel_bf16"]


def _without_index(layout: runs.RunLayout, base: Path) -> runs.RunLayout:
    """A copy of the run in `base`/models without its index, as runs trained before issue 13 or
    imported are: its answers take no embedding, so engine=auto measures its exports."""
    plain = runs.RunLayout(base / "models" / layout.run_id)
    shutil.copytree(layout.root, plain.root, ignore=shutil.ignore_patterns(layout.index_dir.name))
    return plain


def test_a_prediction_names_its_engine_and_refuses_a_missing_export(tiny, exported, tmp_path):
    roots, layout = tiny
    cache = inference.RunCache()
    photo = [("a.jpg", seed_photo(roots).read_bytes())]
    by_tflite = inference.predict(
        roots, cache, config.load(config.PredictConfig, engine="tflite_fp32"), photo
    )
    by_keras = inference.predict(roots, cache, config.load(config.PredictConfig, engine="keras"), photo)
    assert by_tflite["engine"] == "tflite_fp32"
    assert by_keras["engine"] == "keras"
    assert [s["label"] for s in by_tflite["results"][0]["species"]] == [
        s["label"] for s in by_keras["results"][0]["species"]
    ]

    bare = runs.RunLayout(tmp_path / layout.run_id)
    shutil.copytree(layout.root, bare.root, ignore=shutil.ignore_patterns("exports"))
    with pytest.raises(InputError) as missing:
        inference.load_run(bare).engine("tflite_int8")
    assert missing.value.field == "engine"
    assert f"seeds-tf export {layout.run_id} --format tflite --precision int8" in missing.value.problem


def test_the_export_command(tiny, monkeypatch, capsys):
    roots, layout = tiny
    monkeypatch.setenv(DATA_ENV, str(roots.data))
    monkeypatch.setenv(MODELS_ENV, str(roots.models))
    status = cli.main(["--quiet", "export", layout.run_id, "--format", "tflite", "--serve"])
    printed = json.loads(capsys.readouterr().out)
    assert status == 0
    assert printed["agreement_top1"] == 1.0
    assert printed["agreement_decision"] == 1.0  # the run's answers use its reference specimens
    assert set(printed["measured_ms"]) == {"keras", "tflite_fp32"}  # measured again
    assert printed["serve"] == engine_choice.recorded_choice(layout.exports_dir, embeds=True).engine


def test_warm_loads_the_newest_run_with_its_engine_ready(tiny, monkeypatch, tmp_path):
    """DEEPaaS calls warm() once per worker: the first request then finds the run loaded and its
    engine traced (the benchmark measures what that saves)."""
    from seeds_tf import api

    roots, layout = tiny
    monkeypatch.setenv(DATA_ENV, str(roots.data))
    monkeypatch.setenv(MODELS_ENV, str(roots.models))
    api._run_cache.cache_clear()
    api.warm()
    choice = engine_choice.recorded_choice(layout.exports_dir, embeds=True)
    assert set(api._run_cache().get(layout)._engines) == {choice.engine}  # it gives the embedding too
    served = api.get_metadata()["engine"]  # which engine serves, and why
    assert served == {**choice.to_dict(), "run_id": layout.run_id}

    plain = _without_index(layout, tmp_path)
    monkeypatch.setenv(MODELS_ENV, str(plain.root.parent))
    api._run_cache.cache_clear()
    api.warm()
    run = api._run_cache().get(plain)
    choice = engine_choice.recorded_choice(plain.exports_dir)
    assert set(run._engines) == {choice.engine}
    served = api.get_metadata()["engine"]  # which engine serves, and the timings it was chosen by
    assert served == {**choice.to_dict(), "run_id": plain.run_id}
    assert served["reason"] == "measured"
    offered = engine_choice.candidates(plain.exports_dir, engines.cpu_flags())
    assert set(served["ms"]) == set(served["candidates"]) == set(offered)
    assert {"keras", "tflite_fp32"} <= set(offered)
    api._run_cache.cache_clear()


def test_only_a_converted_export_takes_the_export_it_converts_from(tiny, exported, tmp_path):
    _, layout = tiny
    model = load_classifier(layout.final_model)
    with pytest.raises(ValueError, match="converts from nothing"):
        export.export_model(
            model, engines.engine_spec("onnx_fp32"), tmp_path / "x.onnx", converted_from=exported["onnx_fp32"]
        )
    assert not (tmp_path / "x.onnx").exists()


def test_an_export_auto_chose_that_no_longer_loads_leaves_the_answers_to_keras(
    tiny, exported, tmp_path, caplog
):
    """auto's choice is recorded per CPU; the export truncated since (or written by a runtime this
    one cannot read), every request that named no engine was refused. Named, it still is."""
    _, layout = tiny
    plain = _without_index(layout, tmp_path)
    export.record_export(plain, "tflite_fp32", {"agreement_top1": 1.0}, serve=True)
    offered = engine_choice.candidates(plain.exports_dir, engines.cpu_flags())
    assert "tflite_fp32" in offered
    chosen = engine_choice.EngineChoice(
        "tflite_fp32", "measured", engines.cpu_model(), engine_choice.cpu_signature(), offered
    )
    engine_choice._record(plain.exports_dir, chosen)
    engines.engine_spec("tflite_fp32").path(plain.exports_dir).write_bytes(b"")  # truncated
    run = inference.load_run(plain)
    with caplog.at_level(logging.WARNING, logger=inference.__name__):
        assert run.engine("auto").name == "keras"
        assert run.engine("auto").name == "keras"  # the broken export is not loaded again
    (warning,) = [record.getMessage() for record in caplog.records if "auto's choice" in record.getMessage()]
    assert f"Run {plain.run_id} answers with keras, not auto's choice: run" in warning
    assert "tflite_fp32 export does not load here" in warning
    with pytest.raises(InputError, match="tflite_fp32 export does not load here"):
        run.engine("tflite_fp32")
