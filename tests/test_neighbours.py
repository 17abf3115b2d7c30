"""The reference specimens behind an answer: embeddings, cosine search, the index files, the contact sheet."""

import json
import resource
import time
from pathlib import Path

import keras
import numpy as np
import PIL.Image
import pytest
import threadpoolctl

from seeds_tf.classifier import engines
from seeds_tf.classifier.model import build_classifier
from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.data.splits import parse_split_file
from seeds_tf.learning.indexing import index_run
from seeds_tf.prediction import explain, neighbours
from seeds_tf.prediction.neighbours import ReferenceIndex

SMALL = config.load(
    config.ModelConfig, modelname="MobileNetV3Small", image_size=32, dense_units=8, weights="none"
)


@pytest.fixture(scope="module")
def small_model():
    return build_classifier(SMALL, num_classes=3)


def _distinct_images(count: int) -> np.ndarray:
    """Images unlike each other: each a different random pattern at a different brightness."""
    rng = np.random.default_rng(0)
    patterns = rng.uniform(0, 255, (count, 32, 32, 3))
    return (patterns * np.linspace(0.2, 1.0, count)[:, None, None, None]).astype(np.float32)


def _index(embeddings: np.ndarray, labels=None) -> ReferenceIndex:
    count = len(embeddings)
    labels = np.arange(count) % 3 if labels is None else labels
    paths = tuple(f"class{label}/image{i}.png" for i, label in enumerate(labels))
    stored = embeddings.astype(np.float16).astype(np.float32)  # as an index holds them
    return ReferenceIndex(stored, paths, np.asarray(labels, dtype=np.int32))


def _pooled(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The reference the keras engine's features are checked against: the classifier itself,
    unfolded, cut at its pooled features."""
    return keras.Model(model.input, model.get_layer("avg_pool").output)(images, training=False).numpy()


def test_an_image_is_its_own_nearest_reference(small_model):
    images = _distinct_images(6)
    embeddings = neighbours.normalised(
        engines.load_engine("keras", small_model, Path(".")).observe(images)[1]
    )
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (6, small_model.get_layer("avg_pool").output.shape[-1])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    index = _index(embeddings)
    indices, similarities = index.search(embeddings, k=1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(6))
    np.testing.assert_allclose(similarities[:, 0], 1.0, atol=2e-3)


def test_search_orders_by_cosine_similarity_and_caps_k():
    references = np.array([[-1, 0, 0], [0.8, 0.6, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    index = _index(references)
    # Queries need not be unit vectors: cosine similarity ignores their length.
    indices, similarities = index.search(np.array([[5.0, 0, 0], [0, 0.5, 0]]), k=2)
    np.testing.assert_array_equal(indices, [[2, 1], [3, 1]])
    np.testing.assert_allclose(similarities, [[1.0, 0.8], [1.0, 0.6]], atol=1e-3)
    indices, similarities = index.search(np.array([[1.0, 0, 0]]), k=10)
    assert indices.shape == similarities.shape == (1, 4)
    np.testing.assert_array_equal(indices, [[2, 1, 3, 0]])
    np.testing.assert_allclose(similarities, [[1.0, 0.8, 0.0, -1.0]], atol=1e-3)
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k >= 1"):
            index.search(references, bad_k)
    with pytest.raises(ValueError, match=r"\(q, 3\)"):
        index.search(np.ones((2, 4)), 1)
    with pytest.raises(ValueError, match="float32 embeddings"):
        ReferenceIndex(references.astype(np.float16), index.paths, index.labels)
    with pytest.raises(ValueError, match="finite"):
        index.search(np.array([[np.nan, 0, 0]]), 1)


def test_search_matches_an_exact_ranking():
    rng = np.random.default_rng(1)
    count = 2171
    references = rng.standard_normal((count, 16)).astype(np.float32)
    references /= np.linalg.norm(references, axis=1, keepdims=True)
    index = _index(references)
    queries = rng.standard_normal((3, 16))
    indices, similarities = index.search(queries, k=5)
    exact = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ index.embeddings.astype(np.float64).T
    np.testing.assert_array_equal(indices, np.argsort(-exact, axis=1)[:, :5])
    np.testing.assert_allclose(similarities, np.take_along_axis(exact, indices, axis=1), atol=1e-5)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_a_search_leaves_no_blas_thread_spinning():
    """A batch's search (identify's 64 queries against 1,000 references of Xception's 2048
    dimensions) keeps to one BLAS thread and gives the threads back: the same product on
    OpenBLAS's two threads left the second one spinning for a tenth of a second after it (0.1
    CPU-s of this process while it slept), taking the core the engine's next batch needed."""
    rng = np.random.default_rng(2)
    index = _index(rng.standard_normal((1000, 2048)).astype(np.float32))
    queries = rng.standard_normal((64, 2048)).astype(np.float32)
    threads = [library["num_threads"] for library in threadpoolctl.threadpool_info()]
    time.sleep(0.2)  # whatever ran before has settled
    index.search(queries, k=5)
    before = _cpu_seconds()
    time.sleep(0.2)
    assert _cpu_seconds() - before < 0.03
    assert [library["num_threads"] for library in threadpoolctl.threadpool_info()] == threads


def test_neighbours_name_the_label_similarity_and_path():
    index = _index(np.eye(3, dtype=np.float32), labels=[2, 0, 1])
    classes = ("Genus a", "Genus b", "Genus c")
    answer = neighbours.neighbours_of(index, np.array([[0.1, 1.0, 0.0]]), k=2, classes=classes)
    assert [[entry["path"] for entry in row] for row in answer] == [
        ["class0/image1.png", "class2/image0.png"]
    ]
    first = answer[0][0]
    # Plain Python values: the answer goes out as JSON as it is.
    assert json.loads(json.dumps(answer)) == answer
    assert first == {
        "label": "Genus a",
        "label_id": 0,
        "similarity": round(1 / np.sqrt(1.01), 4),
        "path": first["path"],
    }
    with pytest.raises(ValueError, match="below 2 classes"):
        neighbours.neighbours_of(index, np.eye(3), 1, classes[:2])


def test_the_index_round_trips_through_its_files_in_float16(tmp_path):
    rng = np.random.default_rng(2)
    index = _index(rng.standard_normal((7, 5)).astype(np.float32) / 3)
    folder = tmp_path / "index"
    assert neighbours.load_index(folder) is None
    neighbours.save_index(index, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["embeddings.npy", "references.json"]
    stored = np.load(folder / "embeddings.npy", allow_pickle=False)
    assert stored.dtype == np.float16 and stored.shape == (7, 5)
    references = files.read_json(folder / "references.json")
    assert (references["count"], references["dimension"], references["dtype"]) == (7, 5, "float16")
    loaded = neighbours.load_index(folder)
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    np.testing.assert_array_equal(loaded.labels, index.labels)
    assert loaded.paths == index.paths
    # A references.json that no longer matches the array is an error naming the file.
    files.write_json(folder / "references.json", {**references, "count": 8})
    with pytest.raises(ValueError, match=r"embeddings\.npy"):
        neighbours.load_index(folder)
    # So is an array of another precision than float16, even one that references.json names.
    np.save(folder / "embeddings.npy", index.embeddings, allow_pickle=False)
    files.write_json(folder / "references.json", {**references, "dtype": "float32"})
    with pytest.raises(ValueError, match=r"npy holds float32 embeddings; an index stores float16"):
        neighbours.load_index(folder)
    (folder / "embeddings.npy").unlink()
    with pytest.raises(ValueError, match=r"embeddings\.npy is missing"):
        neighbours.load_index(folder)
    (folder / "references.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"references\.json is not JSON"):
        neighbours.load_index(folder)


def test_index_run_embeds_every_training_image_with_its_relative_path(roots, tiny_run):
    folder = index_run(roots, tiny_run, batch_size=8)
    layout = runs.RunLayout(roots.models / tiny_run)
    assert folder == layout.index_dir
    index = neighbours.load_index(folder)
    entries = parse_split_file(layout.dataset_dir / "train.txt")
    assert len(index) == len(entries) > 0
    assert list(index.paths) == [path for path, _ in entries]
    np.testing.assert_array_equal(index.labels, [label for _, label in entries])
    images_dir = roots.data / "tiny" / "images"
    assert all(not path.startswith("/") and (images_dir / path).is_file() for path in index.paths)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=2e-3)
    answer = neighbours.neighbours_of(index, index.embeddings[:2], 3, layout.classes())
    assert [row[0]["similarity"] for row in answer] == pytest.approx([1.0, 1.0], abs=2e-3)
    with pytest.raises(InputError) as raised:
        index_run(roots, "no_such_run")
    assert raised.value.field == "run"


def test_the_contact_sheet_has_a_tile_per_neighbour_and_survives_missing_images(tmp_path):
    images_dir = tmp_path / "images"
    (images_dir / "a").mkdir(parents=True)
    PIL.Image.new("RGB", (120, 80), (200, 30, 30)).save(images_dir / "a" / "red.png")
    (tmp_path / "secret.png").write_bytes((images_dir / "a" / "red.png").read_bytes())
    paths = ["a/red.png", "a/gone.png", "../secret.png", "a/red.png", "a"]
    shown = [
        {"label": f"Genus species{i} with a long name", "similarity": 0.9 - i / 10, "path": p}
        for i, p in enumerate(paths)
    ]
    sheet = explain.contact_sheet(shown, images_dir, thumb=64)
    gap, tile_height = explain.GAP, 64 + 2 * (explain.CAPTION_FONT_SIZE + 3) + 2
    # Five tiles: three columns, two rows.
    assert sheet.size == (3 * (64 + gap) + gap, 2 * (tile_height + gap) + gap)

    def centre_of(position):
        column, row = position % 3, position // 3
        return sheet.getpixel((gap + column * (64 + gap) + 32, gap + row * (tile_height + gap) + 20))

    assert centre_of(0) == centre_of(3) == (200, 30, 30)
    # Gone, outside the images folder, a folder: grey "missing" tiles, never the file outside.
    for position in (1, 2, 4):
        assert centre_of(position) == (96, 96, 96)
    with pytest.raises(ValueError, match="at least one"):
        explain.contact_sheet([], images_dir)


def test_the_explained_picture_can_carry_the_contact_sheet_beside_it(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    cam = np.random.default_rng(4).uniform(0, 1, (3, 3))
    sheet = explain.contact_sheet([{"label": "Genus a", "similarity": 0.5, "path": "x.png"}] * 9, tmp_path)
    alone = explain.heatmap_picture(pixels, cam, [("Genus a", 0.9)])
    both = explain.heatmap_picture(pixels, cam, [("Genus a", 0.9)], beside=sheet)
    assert alone.size == (384, 256)
    assert both.size == (384 + explain.GAP + sheet.width, max(256, sheet.height))
    np.testing.assert_array_equal(np.asarray(both)[:256, :384], np.asarray(alone.convert("RGB")))


def test_one_pass_of_the_keras_engine_gives_the_probabilities_and_the_features(small_model):
    images = _distinct_images(4)
    keras_engine = engines.load_engine("keras", small_model, Path("."))
    probabilities, features = keras_engine.observe(images)
    assert keras_engine.embeds
    np.testing.assert_allclose(probabilities, small_model(images, training=False).numpy(), atol=1e-5)
    np.testing.assert_allclose(keras_engine(images), probabilities)
    np.testing.assert_allclose(features, _pooled(small_model, images), rtol=1e-4, atol=1e-4)


def test_specimen_evidence_is_the_majority_of_the_nearest_and_the_distance_at_rank_five():
    # Similarity falls with the row: references 0..6 in order, their labels chosen per case.
    references = np.stack([[np.cos(a), np.sin(a), 0.0] for a in np.linspace(0.0, 1.2, 7)]).astype(np.float32)
    query = np.array([[1.0, 0.0, 0.0]])
    for labels, majority in (
        ([1, 2, 2, 0, 1, 1, 1], 1),
        ([2, 1, 1, 2, 0, 0, 0], 2),
        ([0, 1, 2, 0, 1, 2, 2], 0),
    ):
        index = _index(references, np.array(labels))
        found = index.search(query, neighbours.EVIDENCE_K)
        voted, distance = neighbours.specimen_evidence(index, *found)
        # A tie (2 and 2) goes to the species of the most similar reference among those tied.
        assert voted.tolist() == [majority]
        np.testing.assert_allclose(distance, 1.0 - np.cos(0.8), atol=2e-3)  # the 5th: angle 0.8
    small = _index(references[:3], np.array([0, 1, 1]))
    voted, distance = neighbours.specimen_evidence(small, *small.search(query, neighbours.EVIDENCE_K))
    assert voted.tolist() == [1]
    np.testing.assert_allclose(distance, 1.0 - np.cos(0.4), atol=2e-3)  # the last of 3
    with pytest.raises(ValueError, match="at least 5 references"):
        neighbours.specimen_evidence(index, *index.search(query, 2))
    # A run calibrated with other numbers of voters and another rank gets its evidence by those.
    index = _index(references, np.array([1, 2, 2, 0, 1, 1, 1]))
    voted, distance = neighbours.specimen_evidence(index, *index.search(query, 3), voters=3, rank=2)
    assert voted.tolist() == [2]
    np.testing.assert_allclose(distance, 1.0 - np.cos(0.2), atol=2e-3)  # the 2nd: angle 0.2
    with pytest.raises(ValueError, match="voters >= 1"):
        neighbours.specimen_evidence(index, *index.search(query, 3), voters=0)
