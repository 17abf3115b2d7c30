"""Grad-CAM explanations: a heatmap of the top species over the photo, as PNG."""

import io
import types

import keras
import numpy as np
import PIL.Image

from seeds_tf.core import config, runs
from seeds_tf.prediction import explain, inference
from tests.helpers import seed_photo


def test_gradcam_is_a_normalised_map_over_the_backbone_grid(roots, tiny_run):
    run = inference.RunCache().get(runs.RunLayout(roots.models / tiny_run))
    with PIL.Image.open(seed_photo(roots)) as image:
        pixels = np.asarray(image.convert("RGB"))
    cam = explain.gradcam(run, pixels, class_index=0)
    assert cam.ndim == 2
    assert cam.shape == tuple(run.model.get_layer("avg_pool").input.shape[1:3])
    assert cam.size > 1, "a grid of one cell explains nothing: the tiny run is too small for Grad-CAM"
    assert cam.min() >= 0.0 and cam.max() <= 1.0


def test_gradcam_shows_where_a_sure_network_saw_its_class():
    """A top probability that float32 rounds to 1 (a logit ahead by about 20) still has a heatmap:
    the gradient of the probability vanished there and left an empty one."""
    inputs = keras.Input((8, 8, 3))
    maps = keras.layers.Conv2D(2, 1, use_bias=False, name="maps")(inputs)  # red and green channels
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(maps)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="predictions")(pooled))
    model.get_layer("maps").set_weights([np.array([[[[1, 0], [0, 1], [0, 0]]]], dtype=np.float32)])
    model.get_layer("predictions").set_weights(
        [np.diag([0.2, 0.2]).astype(np.float32), np.zeros(2, np.float32)]
    )
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, :4, 0] = 255  # red on the left: class 0
    pixels[:, 4:, 1] = 40  # a little green on the right: class 1
    assert model.predict(pixels[np.newaxis].astype(np.float32), verbose=0)[0, 0] == 1.0
    run = inference.LoadedRun(
        "r", "final", model, types.SimpleNamespace(image_size=8), ("A a", "B b"), None, None
    )
    cam = explain.gradcam(run, pixels, class_index=0)
    np.testing.assert_allclose(cam[:, :4], 1.0)
    np.testing.assert_allclose(cam[:, 4:], 0.0)


def test_the_explained_picture_is_the_photo_with_labels(roots, tiny_run):
    photo = seed_photo(roots)
    request = config.load(config.PredictConfig, top_k=1)
    png = explain.explain_request(roots, inference.RunCache(), request, [(photo.name, photo.read_bytes())])
    picture = PIL.Image.open(io.BytesIO(png))
    assert picture.format == "PNG"
    with PIL.Image.open(photo) as original:
        # Small photos are enlarged (to 384 px) so the labels fit; the aspect ratio stays.
        assert picture.width / picture.height == original.width / original.height
        assert max(picture.size) == 384


def test_several_images_are_explained_one_under_another_and_merged_as_the_json_answer(roots, tiny_run):
    """Only the first image was drawn, labelled with its own species even where the JSON answer
    merged the photos into one specimen."""
    photos = [seed_photo(roots, index) for index in (0, 1)]
    uploads = [(photo.name, photo.read_bytes()) for photo in photos]
    cache = inference.RunCache()
    run = cache.get(runs.RunLayout(roots.models / tiny_run))
    pixels = [np.asarray(PIL.Image.open(photo).convert("RGB")) for photo in photos]
    for merge in (False, True):
        options = config.load(config.PredictConfig, top_k=3, merge=merge)
        answer = inference.predict(roots, cache, options, uploads)["results"]
        png = explain.explain_request(roots, cache, options, uploads)
        picture = np.asarray(PIL.Image.open(io.BytesIO(png)))
        top = 0
        for position, photo in enumerate(pixels):
            species = answer[0 if merge else position]["species"][:3]
            labels = [(s["label"], s["probability"]) for s in species]
            cam = explain.gradcam(run, photo, species[0]["label_id"])
            expected = np.asarray(explain.heatmap_picture(photo, cam, labels))
            height, width = expected.shape[:2]
            np.testing.assert_array_equal(picture[top : top + height, :width], expected)
            top += height + explain.GAP
        assert picture.shape[0] == top - explain.GAP
