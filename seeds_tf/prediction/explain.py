"""Why the model named a species: Grad-CAM heatmaps over the photo, and the reference specimens.

Grad-CAM (Selvaraju et al., 2017) weighs the backbone's last feature maps by the gradient of the
class score, showing which parts of the seed drove the prediction. A contact sheet of the training
images most like the photo (seeds_tf.prediction.neighbours) can stand beside it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import matplotlib
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import tensorflow as tf

from seeds_tf.classifier.model import FEATURES_LAYER, OUTPUT_LAYER
from seeds_tf.core import runs
from seeds_tf.core.config import PredictConfig
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import images, pipeline
from seeds_tf.prediction import inference
from seeds_tf.prediction.inference import LoadedRun, RunCache

MIN_SIDE, MAX_SIDE = 384, 768
"""Range of the longest side of the returned picture: room for the labels, small enough to send."""

BACKGROUND = (0, 0, 0)
"""Behind the labels, between the tiles of a contact sheet and around pictures set side by side."""

GAP = 4
"""Pixels between the tiles of a contact sheet, and between the pictures set side by side."""

CAPTION_FONT_SIZE = 11
"""Small enough for two caption lines under a 96-pixel thumbnail."""


def gradcam(run: LoadedRun, pixels: np.ndarray, class_index: int) -> np.ndarray:
    """Heatmap in [0, 1] of shape (h, w), the backbone's output grid, for class `class_index`.

    The gradient is of the class's logit, the score before the softmax, as in the paper: the
    gradient of its probability vanishes where the network is sure (a top probability that
    float32 rounds to 1 gave an empty heatmap, for the answers most worth explaining).
    """
    head = run.model.get_layer(OUTPUT_LAYER)
    features = run.model.get_layer(FEATURES_LAYER).input
    explainer = keras.Model(run.model.inputs, [features, head.input])
    batch = pipeline.resize(pixels, run.config.image_size)[tf.newaxis]
    with tf.GradientTape() as tape:
        maps, penultimate = explainer(batch, training=False)
        kernel = tf.cast(head.kernel[:, class_index], tf.float32)
        score = tf.linalg.matvec(tf.cast(penultimate, tf.float32), kernel) + tf.cast(
            head.bias[class_index], tf.float32
        )
    gradients = tf.cast(tape.gradient(score, maps), tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(maps, tf.float32), axis=-1))[0].numpy()
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def heatmap_picture(
    pixels: np.ndarray,
    cam: np.ndarray,
    labels: Sequence[tuple[str, float]],
    beside: PIL.Image.Image | None = None,
) -> PIL.Image.Image:
    """The photo with the heatmap laid over it and the labels with their probabilities.

    Args:
        pixels: the photo, RGB uint8 (height, width, 3).
        cam: the heatmap from `gradcam`, any grid: it is stretched over the photo.
        labels: (name, probability) pairs, listed at the top in this order.
        beside: a picture to set to the right of the explained photo, top-aligned (a
            `contact_sheet`); None (the default) for the explained photo alone.
    """
    picture = _heatmap_picture(pixels, cam, labels)
    return picture if beside is None else _side_by_side(picture, beside)


def contact_sheet(neighbours: Sequence[dict[str, Any]], images_dir: Path, thumb: int = 96) -> PIL.Image.Image:
    """The reference images of an answer as a near-square grid of thumbnails, most similar first,
    each with its label and similarity under it.

    Args:
        neighbours: one query's neighbours, as seeds_tf.prediction.neighbours.neighbours_of gives
            them ({"label", "similarity", "path"}, the path relative to `images_dir`).
        images_dir: the dataset's images folder.
        thumb: side of each thumbnail in pixels (default 96).

    A reference image that is gone, unreadable or outside `images_dir` becomes a grey tile saying
    "missing": the dataset may have changed since the index was built, and the answer still stands.
    """
    if not neighbours:
        raise ValueError("Expected at least one neighbour. Received: none")
    if thumb < 32:
        raise ValueError(f"Expected thumb >= 32 pixels. Received: thumb={thumb}")
    font = PIL.ImageFont.load_default(size=CAPTION_FONT_SIZE)
    line_height = CAPTION_FONT_SIZE + 3
    tile_height = thumb + 2 * line_height + 2
    columns = math.ceil(math.sqrt(len(neighbours)))
    rows = math.ceil(len(neighbours) / columns)
    sheet = PIL.Image.new(
        "RGB", (columns * (thumb + GAP) + GAP, rows * (tile_height + GAP) + GAP), BACKGROUND
    )
    draw = PIL.ImageDraw.Draw(sheet)
    root = images_dir.resolve()
    for position, neighbour in enumerate(neighbours):
        left = GAP + (position % columns) * (thumb + GAP)
        top = GAP + (position // columns) * (tile_height + GAP)
        sheet.paste(_thumbnail(root, neighbour["path"], thumb, font), (left, top))
        captions = (neighbour["label"], f"similarity {neighbour['similarity']:.3f}")
        for row, caption in enumerate(captions):
            text = _fitted(draw, caption, font, thumb)
            draw.text((left, top + thumb + 2 + row * line_height), text, fill=(255, 255, 255), font=font)
    return sheet


def _heatmap_picture(
    pixels: np.ndarray, cam: np.ndarray, labels: Sequence[tuple[str, float]]
) -> PIL.Image.Image:
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
    draw.rectangle((0, 0, blended.width, 8 + line_height * len(lines)), fill=BACKGROUND)
    for row, line in enumerate(lines):
        draw.text((8, 4 + line_height * row), line, fill=(255, 255, 255), font=font)
    return blended


def _side_by_side(left: PIL.Image.Image, right: PIL.Image.Image) -> PIL.Image.Image:
    """`left` and `right` on one canvas, top-aligned, GAP pixels apart."""
    canvas = PIL.Image.new(
        "RGB", (left.width + GAP + right.width, max(left.height, right.height)), BACKGROUND
    )
    canvas.paste(left.convert("RGB"), (0, 0))
    canvas.paste(right.convert("RGB"), (left.width + GAP, 0))
    return canvas


def _thumbnail(root: Path, relative: str, thumb: int, font: PIL.ImageFont.ImageFont) -> PIL.Image.Image:
    """The image at `relative` under `root`, fitted into a thumb x thumb tile; a grey "missing" tile
    when it is not a readable image inside `root` (the index names it, the path guard still holds)."""
    tile = PIL.Image.new("RGB", (thumb, thumb), (96, 96, 96))
    path = (root / relative).resolve()
    try:
        if not path.is_relative_to(root):
            raise InputError("path", f"{relative!r} is outside the images folder")
        picture = PIL.Image.fromarray(images.read_image(path))
    except (InputError, OSError):
        centre = (thumb / 2, thumb / 2)
        PIL.ImageDraw.Draw(tile).text(centre, "missing", fill=(255, 255, 255), font=font, anchor="mm")
        return tile
    picture.thumbnail((thumb, thumb), PIL.Image.BILINEAR)
    tile.paste(picture, ((thumb - picture.width) // 2, (thumb - picture.height) // 2))
    return tile


def _fitted(draw: PIL.ImageDraw.ImageDraw, text: str, font: PIL.ImageFont.ImageFont, width: int) -> str:
    """`text`, cut short with an ellipsis where it would be wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def explain_request(
    roots: Roots, cache: RunCache, config: PredictConfig, uploads: Sequence[images.Upload | tuple[str, bytes]]
) -> bytes:
    """The answer to a prediction request that accepts image/png: each image explained (the
    Grad-CAM picture of its top species, labelled with the top three), one under another in the
    request's order, each with its `config.neighbours` reference specimens beside it as a contact
    sheet. With `config.merge` (one specimen in several photos) each photo is explained by the one
    answer the JSON response gives, from the mean of their probabilities, and the reference
    specimens of their mean embedding stand beside the first."""
    run, pixels, probabilities = inference.analyse(roots, cache, config, uploads)
    if config.merge:
        probabilities = np.repeat(probabilities.mean(axis=0, keepdims=True), len(pixels), axis=0)
    sheets: list[PIL.Image.Image] = []
    if config.neighbours:
        training = runs.RunLayout(roots.models / run.run_id).config().training
        images_dir = roots.data_path(training.images_directory, "images_directory")
        found = inference.nearest_references(run, pixels, config.neighbours, merge=config.merge)
        sheets = [contact_sheet(shown, images_dir) for shown in found]
    pictures = [
        _explained(
            run,
            photo,
            inference.ranked(run, row, max(3, config.top_k))["species"],
            sheets[position] if position < len(sheets) else None,
        )
        for position, (photo, row) in enumerate(zip(pixels, probabilities, strict=True))
    ]
    return _png(_one_under_another(pictures))


def _explained(
    run: LoadedRun, pixels: np.ndarray, ranked_species: Sequence[dict], beside: PIL.Image.Image | None
) -> PIL.Image.Image:
    cam = gradcam(run, pixels, ranked_species[0]["label_id"])
    return heatmap_picture(pixels, cam, [(s["label"], s["probability"]) for s in ranked_species[:3]], beside)


def _one_under_another(pictures: Sequence[PIL.Image.Image]) -> PIL.Image.Image:
    """`pictures` on one canvas, left-aligned, GAP pixels apart: one picture is itself."""
    if len(pictures) == 1:
        return pictures[0]
    width = max(picture.width for picture in pictures)
    height = sum(picture.height for picture in pictures) + GAP * (len(pictures) - 1)
    canvas = PIL.Image.new("RGB", (width, height), BACKGROUND)
    top = 0
    for picture in pictures:
        canvas.paste(picture.convert("RGB"), (0, top))
        top += picture.height + GAP
    return canvas


def _png(picture: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
