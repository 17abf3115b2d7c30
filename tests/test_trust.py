"""Answers a botanist can trust, end to end: a trained run is calibrated and indexed, every answer
carries its decision and OOD score, the reference specimens come on request (JSON and PNG, through
the real DEEPaaS app), `seeds-tf calibrate` and `seeds-tf index` work on a served run, and the trust
report measures unseen images against the test split."""

import dataclasses
import io
import json
import logging

import numpy as np
import PIL.Image
import pytest

from seeds_tf import cli
from seeds_tf.classifier import engines
from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.data import images, synthetic
from seeds_tf.data.splits import CALIBRATION_SPLIT, parse_split_file
from seeds_tf.learning import training, trust
from seeds_tf.prediction import calibration, export, inference, neighbours
from seeds_tf.service.schemas import ModelPredictionResponse
from tests.helpers import SMALL_OPTIONS, in_process_service, seed_photo


def _request(roots, **options):
    photo = seed_photo(roots)
    return config.load(config.PredictConfig, **options), [(photo.name, photo.read_bytes())]


def _set_temperature(layout: runs.RunLayout, temperature: float) -> calibration.Calibration:
    fitted = calibration.load_calibration(layout)
    changed = calibration.Calibration.from_dict({**fitted.to_dict(), "temperature": temperature})
    changed.save(layout)
    return changed


def test_a_trained_run_is_calibrated_and_indexed(roots, tiny_run):
    layout = runs.RunLayout(roots.models / tiny_run)
    fitted = calibration.load_calibration(layout)
    assert fitted is not None and fitted.fitted_on == "val"
    assert fitted.thresholds.target_precision == layout.config().training.target_precision
    index = neighbours.load_index(layout.index_dir)
    train_lines = files.read_lines(layout.dataset_dir / "train.txt")
    assert len(index) == len(train_lines)
    assert list(index.paths) == [line.rsplit(" ", 1)[0] for line in train_lines]
    assert (layout.reports_dir / "reliability_diagram.png").stat().st_size > 0
    assert "held_out" in files.read_json(layout.reports_dir / "calibration.json")


@pytest.mark.parametrize("engine", ["keras", "tflite_fp32"])
def test_every_engine_and_tta_mode_answers_with_the_run_temperature(roots, tiny_run, engine):
    layout = runs.RunLayout(roots.models / tiny_run)
    if engine != "keras":
        export.export_checkpoint(layout, engines.engine_spec(engine))
    _set_temperature(layout, 0.05)  # sharp enough to show on the tiny run's near-uniform outputs
    pixels = [images.read_image(seed_photo(roots, index)) for index in range(2)]
    calibrated = inference.load_run(layout)
    raw = inference.LoadedRun(**{**calibrated.__dict__, "calibration": None, "_engines": {}, "_lazy": {}})
    for tta in ("none", "flip", "ten_crop"):
        got = inference.class_probabilities(calibrated, pixels, tta, engine)
        views = [inference.tta_views(image, calibrated.config.image_size, tta) for image in pixels]
        expected = [
            calibration.scale(np.asarray(raw.engine(engine)(v), np.float64), 0.05).mean(axis=0) for v in views
        ]
        np.testing.assert_allclose(got, np.stack(expected), atol=1e-6)  # one batch or several: rounding
        assert not np.allclose(got, inference.class_probabilities(raw, pixels, tta, engine), atol=1e-3)


def test_each_answer_carries_its_decision_and_the_request_may_set_the_thresholds(roots, tiny_run):
    cache = inference.RunCache()
    answer = inference.predict(roots, cache, *_request(roots))
    assert ModelPredictionResponse().load(answer) == answer
    result = answer["results"][0]
    assert answer["calibrated"] is True
    # The tiny run answers at chance: no threshold reaches the target, and nothing is trusted.
    assert result["decision"] == answer["decision"] == "unknown"
    assert 0.0 <= result["ood_score"] <= 1.0
    assert isinstance(result["out_of_distribution"], bool)

    trusting = inference.predict(roots, cache, *_request(roots, species_threshold=0.0, genus_threshold=0.0))
    said = trusting["results"][0]
    # The run is calibrated with its reference specimens: the species needs them to agree.
    assert isinstance(said["neighbours_agree"], bool) and 0.0 <= said["specimen_distance"] <= 2.0
    if said["out_of_distribution"]:
        assert trusting["decision"] == "unknown"
    elif said["neighbours_agree"]:
        assert trusting["decision"] == "species"
    else:
        assert trusting["decision"] in ("genus", "unknown")
    # Without specimens (a calibration written before them), the thresholds alone decide.
    layout = runs.RunLayout(roots.models / answer["run_id"])
    plain = calibration.Calibration.from_dict(
        {**calibration.load_calibration(layout).to_dict(), "specimens": None}
    )
    plain.save(layout)
    trusting = inference.predict(roots, cache, *_request(roots, species_threshold=0.0, genus_threshold=0.0))
    said = trusting["results"][0]
    assert (said["neighbours_agree"], said["specimen_distance"]) == (None, None)
    ood = said["out_of_distribution"]
    assert trusting["decision"] == ("unknown" if ood else "species")
    genus_only = inference.predict(roots, cache, *_request(roots, species_threshold=1.0, genus_threshold=0.0))
    assert genus_only["decision"] == ("unknown" if ood else "genus")


def test_the_evidence_follows_the_rule_the_run_was_calibrated_with(roots, tiny_run):
    """A run's thresholds were chosen with the voting references and the distance rank its
    calibration records: its answers take the evidence by those, whatever the defaults are now."""
    layout = runs.RunLayout(roots.models / tiny_run)
    recorded = calibration.load_calibration(layout).to_dict()
    assert recorded["specimens"]["distance_rank"] == neighbours.KNN_RANK > 1
    nearest_only = {**recorded["specimens"], "neighbours": 1, "distance_rank": 1}
    calibration.Calibration.from_dict({**recorded, "specimens": nearest_only}).save(layout)
    run = inference.load_run(layout)
    photo = images.read_image(seed_photo(roots))
    _, embeddings = inference.observe(run, [photo], "none", "keras", embed=True)
    said = inference.specimen_evidence(run, embeddings)
    indices, similarities = run.required_index().search(embeddings, 1)
    distance = float(np.clip(1.0 - float(similarities[0, 0]), 0.0, 2.0))
    assert said == [(run.required_index().labels[indices[0, 0]], distance)]


def test_a_run_without_calibration_says_so_and_still_answers(roots, tiny_run):
    layout = runs.RunLayout(roots.models / tiny_run)
    layout.calibration_file.unlink()
    answer = inference.predict(roots, inference.RunCache(), *_request(roots))
    assert answer["calibrated"] is False
    assert answer["decision"] == "not_calibrated"
    assert answer["results"][0]["out_of_distribution"] is None
    assert ModelPredictionResponse().load(answer) == answer


def test_neighbours_are_training_images_with_their_species(roots, tiny_run):
    layout = runs.RunLayout(roots.models / tiny_run)
    trained = files.read_lines(layout.dataset_dir / "train.txt")[5].rsplit(" ", 1)[0]
    photo = roots.data / "tiny" / "images" / trained
    request = config.load(config.PredictConfig, neighbours=3)
    answer = inference.predict(roots, inference.RunCache(), request, [(photo.name, photo.read_bytes())])
    found = answer["results"][0]["neighbours"]
    assert len(found) == 3
    assert [n["similarity"] for n in found] == sorted((n["similarity"] for n in found), reverse=True)
    classes = runs.RunLayout(roots.models / tiny_run).classes()
    for neighbour in found:
        assert (roots.data / "tiny" / "images" / neighbour["path"]).is_file()
        assert classes[neighbour["label_id"]] == neighbour["label"]
    # The tiny run's features are nearly all alike (cosine > 0.9999), so which training image comes
    # first is noise here; tests/test_neighbours.py checks with a real model that an image finds itself.
    assert all(0.99 <= n["similarity"] <= 1.001 for n in found)

    # The index holds the final model's embeddings: another checkpoint is told so, not sent to make one.
    best = dataclasses.replace(request, ckpt_name="best")
    with pytest.raises(InputError) as other_checkpoint:
        inference.predict(roots, inference.RunCache(), best, [(photo.name, photo.read_bytes())])
    assert other_checkpoint.value.field == "neighbours"
    assert "ckpt_name final, not best" in other_checkpoint.value.problem

    layout.index_dir.joinpath("references.json").unlink()
    with pytest.raises(InputError) as missing:
        inference.predict(roots, inference.RunCache(), request, [(photo.name, photo.read_bytes())])
    assert missing.value.field == "neighbours"
    assert f"seeds-tf index {tiny_run}" in missing.value.problem


def test_the_api_shows_decisions_and_neighbours_in_json_and_png(tmp_path, session_roots, tiny_run):
    with in_process_service(tmp_path, session_roots) as (app, roots, _):
        upload = {"image": ("seed.jpg", seed_photo(roots).read_bytes())}
        answer = app.predict(upload, neighbours=2)
        assert answer.status == 200, answer.body
        body = answer.json()
        assert body["decision"] in ("species", "genus", "unknown")
        assert len(body["results"][0]["neighbours"]) == 2
        plain = app.predict(upload, headers={"Accept": "image/png"})
        beside = app.predict(upload, neighbours=4, headers={"Accept": "image/png"})
        assert beside.status == 200, beside.body
        with PIL.Image.open(io.BytesIO(plain.body)) as alone, PIL.Image.open(io.BytesIO(beside.body)) as both:
            assert both.width > alone.width  # the contact sheet stands beside the heatmap
        refused = app.predict(upload, neighbours=21)
        assert refused.status == 422
        assert refused.json()["field"] == "neighbours"


def test_calibrate_and_index_commands_refit_a_served_run(roots, tiny_run, capsys):
    layout = runs.RunLayout(roots.models / tiny_run)
    cache = inference.RunCache()
    request, shown = _request(roots), _request(roots, neighbours=2)
    assert cache.get(layout).calibration.fitted_on == "val"
    layout.index_dir.joinpath("references.json").unlink()
    assert cli.main(["--quiet", "calibrate", tiny_run, "--split", "test", "--target_precision", "0.9"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["fitted_on"], printed["thresholds"]["target_precision"]) == ("test", 0.9)
    # The cached run picks the new calibration up.
    assert cache.get(layout).calibration.fitted_on == "test"
    assert inference.predict(roots, cache, *request)["calibrated"] is True
    with pytest.raises(InputError, match="seeds-tf index"):
        inference.predict(roots, cache, *shown)

    assert cli.main(["--quiet", "index", tiny_run]) == 0
    assert json.loads(capsys.readouterr().out) == {"index": str(layout.index_dir)}
    assert neighbours.load_index(layout.index_dir) is not None
    # The served run searches the new index, as the refusal said it would.
    assert len(inference.predict(roots, cache, *shown)["results"][0]["neighbours"]) == 2
    assert cli.main(["--quiet", "calibrate", tiny_run, "--split", "nowhere.txt"]) == 2
    assert "split" in capsys.readouterr().err


def test_a_damaged_index_leaves_the_decisions_without_the_specimens(roots, tiny_run, caplog):
    """Its embeddings truncated after the run was complete: every prediction was a 500. As with an
    index that is gone, the run answers without the specimens' evidence and says why."""
    layout = runs.RunLayout(roots.models / tiny_run)
    embeddings = next(layout.index_dir.glob("*.npy"))
    embeddings.write_bytes(embeddings.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger=inference.__name__):
        answer = inference.predict(roots, inference.RunCache(), *_request(roots))
    assert answer["results"][0]["species"]
    assert any(
        f"Run {tiny_run} was calibrated with its index, which is damaged (" in record.getMessage()
        for record in caplog.records
    )


def test_the_trust_report_measures_unseen_images_against_the_test_split(roots, tiny_run):
    unseen = roots.data / "unseen"
    for index in range(6):
        (unseen / "noise").mkdir(parents=True, exist_ok=True)
        synthetic.draw_non_seed_image("noise", 80, np.random.default_rng(index)).save(
            unseen / "noise" / f"{index}.jpg"
        )
    report = trust.evaluate_trust(roots, tiny_run, {"noise": unseen / "noise"})
    figures = report["unseen"]["noise"]
    assert figures["images"] == 6
    for side in ("before", "after"):
        assert 0.0 <= figures[side]["auroc"] <= 1.0
        assert 0.0 <= figures[side]["fpr_at_95_tpr"] <= 1.0
    assert 0.0 <= figures[f"specimen_distance_k{trust.KNN_RANK}"]["auroc"] <= 1.0
    agreement = report["neighbour_agreement"]
    assert agreement["neighbours"] == trust.AGREEMENT_NEIGHBOURS
    assert 0.0 <= agreement["agreement_share"] <= 1.0
    written = files.read_json(runs.RunLayout(roots.models / tiny_run).reports_dir / trust.REPORT_FILE)
    assert written == json.loads(json.dumps(report))
    with pytest.raises(InputError, match="no images"):
        trust.evaluate_trust(roots, tiny_run, {"empty": roots.data / "tiny" / "dataset_files"})


def test_a_training_without_validation_split_calibrates_on_images_held_out_of_training(data_roots):
    files_dir = data_roots.data / "tiny" / "dataset_files"
    listed = parse_split_file(files_dir / "train.txt")
    (files_dir / "val.txt").unlink()
    run_id = training.train(config.RunConfig.from_options(**SMALL_OPTIONS), data_roots).run_id
    layout = runs.RunLayout(data_roots.models / run_id)
    held = parse_split_file(layout.dataset_dir / f"{CALIBRATION_SPLIT}.txt")
    trained = parse_split_file(layout.dataset_dir / "train.txt")
    assert len(held) == max(2, round(0.1 * len(listed))) and not set(held) & set(trained)
    assert sorted(held + trained) == sorted(listed)
    assert not (layout.dataset_dir / "val.txt").exists()
    fitted = calibration.load_calibration(layout)
    assert (fitted.fitted_on, fitted.images) == (CALIBRATION_SPLIT, len(held))
    assert fitted.specimens is not None and fitted.specimens.neighbours == neighbours.AGREEMENT_NEIGHBOURS
    # The references are the images trained on: none of the held-out ones.
    assert list(neighbours.load_index(layout.index_dir).paths) == [path for path, _ in trained]
