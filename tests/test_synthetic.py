"""Tests for the synthetic seed dataset generator."""

import itertools
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from seeds_tf.data import synthetic

IMAGES_PER_CLASS = 4
IMAGE_SIZE = 48
NUM_SPECIES = len(synthetic.SPECIES)
# Canonical renders: centred, unrotated, lit from the camera, so that only
# the species (and its per-seed variation) changes between them.
CANONICAL_SIZE = 64
CANONICAL_VARIANTS = 8


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("synthetic")
    files_dir = synthetic.generate_dataset(
        root, images_per_class=IMAGES_PER_CLASS, image_size=IMAGE_SIZE, seed=3
    )
    assert files_dir == root / "dataset_files"
    return root


@pytest.fixture(scope="module")
def canonical_renders() -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """(colour, coverage) of CANONICAL_VARIANTS seeds of every species."""
    pose = synthetic._Pose(
        centre=(CANONICAL_SIZE / 2, CANONICAL_SIZE / 2),
        angle=0.0,
        half_length=0.45 * CANONICAL_SIZE,
        mirrored=False,
    )
    light = np.array([0.0, 0.0, 1.0], dtype=np.float32)
    return [
        [
            synthetic._render_seed(
                synthetic._GENERA[species.genus],
                synthetic._LOOKS[species.name],
                pose,
                light,
                image_size=CANONICAL_SIZE,
                rng=np.random.default_rng([index, variant]),
            )
            for variant in range(CANONICAL_VARIANTS)
        ]
        for index, species in enumerate(synthetic.SPECIES)
    ]


def _read_lines(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text.splitlines()


def _read_split(root: pathlib.Path, split: str) -> list[tuple[str, int]]:
    entries = []
    for line in _read_lines(root / "dataset_files" / f"{split}.txt"):
        path, label = line.rsplit(" ", 1)
        entries.append((path, int(label)))
    return entries


def _file_contents(root: pathlib.Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def _same_genus_pairs() -> list[tuple[int, int]]:
    return [
        (first, second)
        for first, second in itertools.combinations(range(NUM_SPECIES), 2)
        if synthetic.SPECIES[first].genus == synthetic.SPECIES[second].genus
    ]


def _overlap(first: np.ndarray, second: np.ndarray) -> float:
    """Soft intersection over union of two coverage maps."""
    return float(np.minimum(first, second).sum() / np.maximum(first, second).sum())


def _coat_features(colour: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Chromaticity, brightness and contrast (a texture measure) inside the seed."""
    pixels = colour[coverage > 0.99]
    mean = pixels.mean(axis=0)
    luminance = pixels.mean(axis=-1)
    brightness = luminance.mean()
    return np.append(mean / mean.sum(), [brightness, luminance.std() / brightness])


def _foreground_histogram(image: Image.Image) -> np.ndarray:
    """Colour histogram of the pixels unlike the border, i.e. mostly of the seed."""
    pixels = np.asarray(image, dtype=np.float32) / 255
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    foreground = pixels[distance > 0.2]
    histogram, _ = np.histogramdd(foreground, bins=4, range=[(0, 1)] * 3)
    # Square roots (Hellinger) keep a few dominant bins from swamping the rest.
    return np.sqrt(histogram.ravel() / max(len(foreground), 1))


def _foreground_histograms(species_index: int, count: int) -> list[np.ndarray]:
    return [
        _foreground_histogram(
            synthetic.draw_seed_image(species_index, 64, np.random.default_rng([7, species_index, image]))
        )
        for image in range(count)
    ]


def test_catalogue_has_several_genera_of_several_species():
    genera = {species.genus for species in synthetic.SPECIES}
    assert len(genera) >= 4
    assert NUM_SPECIES >= 12
    assert len({species.name for species in synthetic.SPECIES}) == NUM_SPECIES
    for species in synthetic.SPECIES:
        assert re.fullmatch(r"[A-Z][a-z]+ [a-z]+", species.name)
        assert species.name.split()[0] == species.genus
        assert species.info
        assert "\n" not in species.info


def test_class_files_list_the_catalogue(dataset_root):
    classes = _read_lines(dataset_root / "dataset_files" / "classes.txt")
    info = _read_lines(dataset_root / "dataset_files" / "info.txt")
    assert len(info) == len(classes)
    assert classes == [species.name for species in synthetic.SPECIES]
    assert info == [species.info for species in synthetic.SPECIES]


def test_split_files_partition_the_images(dataset_root):
    splits = {split: _read_split(dataset_root, split) for split in ("train", "val", "test")}
    images = dataset_root / "images"
    for entries in splits.values():
        assert {label for _, label in entries} == set(range(NUM_SPECIES))
        for path, label in entries:
            assert (images / path).is_file()
            assert path.split("/")[0] == synthetic.SPECIES[label].name.replace(" ", "_")
    listed = [path for entries in splits.values() for path, _ in entries]
    assert len(listed) == len(set(listed))
    assert set(listed) == {path.relative_to(images).as_posix() for path in images.rglob("*.jpg")}
    assert len(listed) == NUM_SPECIES * IMAGES_PER_CLASS


def test_images_are_rgb_of_the_requested_size(dataset_root):
    path, _ = _read_split(dataset_root, "val")[0]
    with Image.open(dataset_root / "images" / path) as image:
        assert image.format == "JPEG"
        assert image.mode == "RGB"
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize(
    ("count", "fractions", "expected_sizes"),
    [
        (100, (0.7, 0.15, 0.15), (70, 15, 15)),
        (3, (0.9, 0.05, 0.05), (1, 1, 1)),
        (10, (0.05, 0.05, 0.9), (1, 1, 8)),
    ],
)
def test_splits_follow_the_fractions_and_are_never_empty(count, fractions, expected_sizes):
    parts = synthetic._split_indices(count, fractions, np.random.default_rng(0))
    assert tuple(len(part) for part in parts) == expected_sizes
    assert sorted(np.concatenate(parts).tolist()) == list(range(count))


def test_generation_is_deterministic_by_seed(tmp_path):
    for name, seed in (("first", 5), ("again", 5), ("other", 6)):
        synthetic.generate_dataset(tmp_path / name, images_per_class=3, image_size=32, seed=seed)
    first = _file_contents(tmp_path / "first")
    assert _file_contents(tmp_path / "again") == first
    other = _file_contents(tmp_path / "other")
    assert other.keys() == first.keys()
    images = [path for path in first if path.endswith(".jpg")]
    assert all(other[path] != first[path] for path in images)


def test_species_of_a_genus_share_their_outline(canonical_renders):
    silhouettes = [np.mean([coverage for _, coverage in renders], axis=0) for renders in canonical_renders]
    same_genus = set(_same_genus_pairs())
    overlaps = {
        pair: _overlap(silhouettes[pair[0]], silhouettes[pair[1]])
        for pair in itertools.combinations(range(NUM_SPECIES), 2)
    }
    within = [overlap for pair, overlap in overlaps.items() if pair in same_genus]
    between = [overlap for pair, overlap in overlaps.items() if pair not in same_genus]
    assert min(within) > 0.9
    assert max(between) < 0.85


def test_species_of_a_genus_differ_in_colour_or_texture(canonical_renders):
    features = np.array([[_coat_features(*render) for render in renders] for renders in canonical_renders])
    means, variances = features.mean(axis=1), features.var(axis=1)
    for first, second in _same_genus_pairs():
        # Some statistic must separate the two species by several pooled
        # standard deviations of the seed-to-seed variation.
        pooled_std = np.sqrt((variances[first] + variances[second]) / 2)
        separation = np.abs(means[first] - means[second]) / pooled_std
        names = synthetic.SPECIES[first].name, synthetic.SPECIES[second].name
        assert separation.max() > 3, names


def test_species_are_learnable_from_simple_features():
    # Nearest centroid on colour histograms: fit on 10 images per species,
    # test on 10 others.
    features = np.array([_foreground_histograms(index, count=20) for index in range(NUM_SPECIES)])
    centroids = features[:, :10].mean(axis=1)
    distances = np.linalg.norm(features[:, 10:, np.newaxis] - centroids, axis=-1)
    predictions = np.argmin(distances, axis=-1)
    accuracy = np.mean(predictions == np.arange(NUM_SPECIES)[:, np.newaxis])
    assert accuracy > 4 / NUM_SPECIES  # Four times chance.


def test_draw_seed_image_depends_only_on_the_generator_state():
    def draw(species_index: int) -> bytes:
        return synthetic.draw_seed_image(species_index, 40, np.random.default_rng(11)).tobytes()

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"images_per_class": 2}, "images_per_class"),
        ({"image_size": 31}, "image_size"),
        ({"split_fractions": (0.8, 0.2, 0.0)}, "split_fractions"),
        ({"split_fractions": (0.5, 0.2, 0.2)}, "split_fractions"),
        ({"split_fractions": (0.5, 0.5)}, "split_fractions"),
        ({"seed": -1}, "seed"),
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path, arguments, name):
    with pytest.raises(ValueError, match=f"Received: {name}="):
        synthetic.generate_dataset(tmp_path / "dataset", **arguments)
    assert not (tmp_path / "dataset").exists()


@pytest.mark.parametrize(
    ("species_index", "image_size", "name"),
    [
        (-1, 64, "species_index"),
        (NUM_SPECIES, 64, "species_index"),
        (0, 31, "image_size"),
    ],
)
def test_draw_seed_image_rejects_bad_arguments(species_index, image_size, name):
    with pytest.raises(ValueError, match=f"Received: {name}="):
        synthetic.draw_seed_image(species_index, image_size, np.random.default_rng(0))


def test_held_out_species_are_one_per_genus_before_any_genus_loses_two():
    four = synthetic.held_out(4)
    genus_of = {species.name: species.genus for species in synthetic.SPECIES}
    assert len({genus_of[name] for name in four}) == 4
    assert synthetic.held_out(6)[:4] == four
    assert synthetic.held_out(0) == ()
    with pytest.raises(synthetic.InputError, match="held_out_species"):
        synthetic.held_out(NUM_SPECIES - 1)


def test_held_out_species_and_non_seeds_are_written_apart_from_the_classes(tmp_path, dataset_root):
    root = tmp_path / "open_set"
    synthetic.generate_dataset(
        root,
        images_per_class=IMAGES_PER_CLASS,
        image_size=IMAGE_SIZE,
        seed=3,
        held_out_species=4,
        non_seed_images=2,
    )
    classes = (root / "dataset_files" / "classes.txt").read_text().splitlines()
    unseen = synthetic.held_out(4)
    assert len(classes) == NUM_SPECIES - 4
    assert not set(classes) & set(unseen)
    species_dir = root / synthetic.UNSEEN_FOLDER / "species"
    assert sorted(path.name for path in species_dir.iterdir()) == sorted(n.replace(" ", "_") for n in unseen)
    assert all(len(list(folder.glob("*.jpg"))) == IMAGES_PER_CLASS for folder in species_dir.iterdir())
    not_seeds = root / synthetic.UNSEEN_FOLDER / "not_seeds"
    assert sorted(path.name for path in not_seeds.iterdir()) == sorted(synthetic.NON_SEED_KINDS)
    # The demo's trust report measures what there is: a dataset made without them has none.
    assert synthetic.unseen_folders(root) == {"unseen species": species_dir, "not seeds": not_seeds}
    assert synthetic.unseen_folders(dataset_root) == {}
    for kind in synthetic.NON_SEED_KINDS:
        for path in (not_seeds / kind).glob("*.jpg"):
            with Image.open(path) as image:
                assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    # A kept species has the same images and split as in the dataset without held-out species,
    # under its new label.
    kept = classes[0].replace(" ", "_")
    assert (root / "images" / kept / "0000.jpg").read_bytes() == (
        dataset_root / "images" / kept / "0000.jpg"
    ).read_bytes()
    train = (root / "dataset_files" / "train.txt").read_text()
    assert all(int(line.rsplit(" ", 1)[1]) < len(classes) for line in train.splitlines())
    assert [line.split()[0] for line in train.splitlines() if line.startswith(kept)] == [
        line.split()[0]
        for line in (dataset_root / "dataset_files" / "train.txt").read_text().splitlines()
        if line.startswith(kept)
    ]


@pytest.mark.parametrize("kind", synthetic.NON_SEED_KINDS)
def test_non_seed_images_depend_only_on_the_generator_state(kind):
    first = synthetic.draw_non_seed_image(kind, 40, np.random.default_rng(5))
    again = synthetic.draw_non_seed_image(kind, 40, np.random.default_rng(5))
    assert first.mode == "RGB" and first.size == (40, 40)
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_an_unknown_non_seed_kind_is_named():
    with pytest.raises(synthetic.InputError, match="kind"):
        synthetic.draw_non_seed_image("pebbles", 40, np.random.default_rng(0))
