"""Grad-CAM explanations: a heatmap of the top species over the photo, as PNG."""

import io

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
    assert cam.min() >= 0.0 and cam.max() <= 1.0


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
