"""Why the model named a species: Grad-CAM heatmaps over the photo.

Grad-CAM (Selvaraju et al., 2017) weighs the backbone's last feature maps by the gradient of the
class score, showing which parts of the seed drove the prediction.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import keras
import matplotlib
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import tensorflow as tf

from seeds_tf.core.config import PredictConfig
from seeds_tf.core.paths import Roots
from seeds_tf.data import pipeline
from seeds_tf.prediction import inference
from seeds_tf.prediction.inference import LoadedRun, RunCache

MIN_SIDE, MAX_SIDE = 384, 768
"""Range of the longest side of the returned picture: room for the labels, small enough to send."""


def gradcam(run: LoadedRun, pixels: np.ndarray, class_index: int) -> np.ndarray:
    """Heatmap in [0, 1] of shape (h, w), the backbone's output grid, for class `class_index`."""
    features = run.model.get_layer("avg_pool").input
    explainer = keras.Model(run.model.inputs, [features, run.model.output])
    batch = pipeline.resize(pixels, run.config.image_size)[tf.newaxis]
    with tf.GradientTape() as tape:
        maps, probabilities = explainer(batch, training=False)
        score = probabilities[:, class_index]
    gradients = tape.gradient(score, maps)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[0].numpy()
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def heatmap_png(pixels: np.ndarray, cam: np.ndarray, labels: Sequence[tuple[str, float]]) -> bytes:
    """The photo with the heatmap laid over it and the labels with their probabilities, as PNG."""
    photo = PIL.Image.fromarray(pixels)
    side = min(max(*photo.size, MIN_SIDE), MAX_SIDE)
    scale = side / max(photo.size)
    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), PIL.Image.BILINEAR)
    colours = matplotlib.colormaps["jet"](cam)[..., :3]
    overlay = PIL.Image.fromarray((colours * 255).astype(np.uint8)).resize(photo.size, PIL.Image.BILINEAR)
    blended = PIL.Image.blend(photo.convert("RGB"), overlay, alpha=0.4)
    draw = PIL.ImageDraw.Draw(blended)
    font = PIL.ImageFont.load_default(size=15)
    lines = [f"{label}: {probability:.1%}" for label, probability in labels]
    line_height = 19
    draw.rectangle((0, 0, blended.width, 8 + line_height * len(lines)), fill=(0, 0, 0))
    for row, line in enumerate(lines):
        draw.text((8, 4 + line_height * row), line, fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG")
    return buffer.getvalue()


def explain_png(run: LoadedRun, pixels: np.ndarray, ranked_species: Sequence[dict]) -> bytes:
    """The Grad-CAM picture of the top species, labelled with the top three."""
    cam = gradcam(run, pixels, ranked_species[0]["label_id"])
    return heatmap_png(pixels, cam, [(s["label"], s["probability"]) for s in ranked_species[:3]])


def explain_request(
    roots: Roots, cache: RunCache, config: PredictConfig, uploads: Sequence[tuple[str, bytes]]
) -> bytes:
    """The answer to a prediction request that accepts image/png: the first image, explained."""
    run, pixels, probabilities = inference.analyse(roots, cache, config, uploads[:1])
    species = inference.ranked(run, probabilities[0], max(3, config.top_k))["species"]
    return explain_png(run, pixels[0], species)
