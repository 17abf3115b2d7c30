"""Prediction in the core: checkpoints, genera, info and links, deterministic test-time augmentation."""

import numpy as np
import pytest

from seeds_tf.core import config, runs
from seeds_tf.core.errors import InputError
from seeds_tf.data import pipeline
from seeds_tf.prediction import inference
from seeds_tf.service.schemas import ModelPredictionResponse
from tests.helpers import seed_photo

PIXELS = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)


@pytest.mark.parametrize(("tta", "views"), [("none", 1), ("flip", 2), ("ten_crop", 10)])
def test_tta_views_are_deterministic(tta, views):
    first = inference.tta_views(PIXELS, 71, tta)
    assert first.shape == (views, 71, 71, 3)
    np.testing.assert_array_equal(first, inference.tta_views(PIXELS, 71, tta))


def test_flip_and_ten_crop_views_are_mirror_images():
    flip = inference.tta_views(PIXELS, 71, "flip")
    np.testing.assert_array_equal(flip[1], flip[0][:, ::-1])
    crops = inference.tta_views(PIXELS, 71, "ten_crop")
    np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])
    assert not np.array_equal(crops[0], crops[3]), "opposite corners differ"


def _predict(roots, **options):
    photo = seed_photo(roots)
    request = config.load(config.PredictConfig, **options)
    return inference.predict(roots, inference.RunCache(), request, [(photo.name, photo.read_bytes())])


def test_a_prediction_names_species_with_info_links_and_genera(roots, tiny_run):
    answer = _predict(roots, top_k=3)
    assert ModelPredictionResponse().load(answer) == answer
    assert (answer["run_id"], answer["checkpoint"], answer["tta"]) == (tiny_run, "final", "none")
    (result,) = answer["results"]
    classes = (roots.data / "tiny" / "dataset_files" / "classes.txt").read_text().splitlines()
    info = (roots.data / "tiny" / "dataset_files" / "info.txt").read_text().splitlines()
    for species in result["species"]:
        assert species["label"] == classes[species["label_id"]]
        assert species["info"] == info[species["label_id"]]
        assert species["links"]["wikipedia"].endswith(species["label"].replace(" ", "_"))
        assert "gbif.org" in species["links"]["gbif"]
    genera = result["genera"]
    assert len(genera) == 3
    assert sum(
        g["probability"] for g in _predict(roots, top_k=1000)["results"][0]["genera"]
    ) == pytest.approx(1)
    assert [g["probability"] for g in genera] == sorted((g["probability"] for g in genera), reverse=True)


def test_genus_probability_is_the_sum_of_its_species(roots, tiny_run):
    run = inference.RunCache().get(runs.RunLayout(roots.models / tiny_run))
    probabilities = np.zeros(len(run.classes))
    probabilities[[0, 1]] = [0.3, 0.2]  # two species of the first genus
    probabilities[-1] = 0.5
    genera = inference.ranked(run, probabilities, top_k=2)["genera"]
    assert genera[0]["probability"] == pytest.approx(0.5)
    assert {g["genus"] for g in genera} == {run.classes[0].split()[0], run.classes[-1].split()[0]}


@pytest.mark.parametrize("tta", ["flip", "ten_crop"])
def test_tta_gives_the_same_answer_every_time(roots, tiny_run, tta):
    assert _predict(roots, tta=tta) == _predict(roots, tta=tta)


def test_checkpoints_are_chosen_by_name_and_unknown_ones_listed(roots, tiny_run):
    assert _predict(roots, ckpt_name="best")["checkpoint"] == "best"
    for name in ("epoch_0099", "../final", "/etc/passwd"):
        with pytest.raises(InputError) as raised:
            _predict(roots, ckpt_name=name)
        assert raised.value.field == "ckpt_name"
        assert "Available: ['best', 'final']" in raised.value.problem


def test_an_image_at_the_model_size_skips_the_resize_and_gives_the_same_pixels():
    pixels = np.random.default_rng(3).integers(0, 256, (71, 71, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        inference.tta_views(pixels, 71, "none")[0], pipeline.resize(pixels, 71).numpy()
    )
