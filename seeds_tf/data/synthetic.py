"""Procedural "seed photo" dataset for demos and tests without the real images.

The real seed collections cannot be downloaded everywhere (CI, air-gapped
machines), so this module paints a stand-in dataset that exercises the same
code paths. Every genus has its own outline and its species differ only in
colour, surface pattern and markings, so a classifier has to look past the
silhouette. Each scene adds the nuisances of real photos: pose, scale,
lighting, a cluttered background, shadow, sensor noise and blur.

The output follows the original service's split-file layout::

    <root>/images/<Genus_species>/<nnnn>.jpg
    <root>/dataset_files/classes.txt  # one class name per line; line i = label i
    <root>/dataset_files/info.txt     # one description per class, same order
    <root>/dataset_files/{train,val,test}.txt  # "<Genus_species>/<nnnn>.jpg <label>"

All randomness comes from `numpy.random.default_rng` seeded with `seed`, with
one generator per image, so the same arguments give byte-identical files
whatever the generation order.
"""

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFilter

from seeds_tf.core.errors import InputError
from seeds_tf.data.splits import SPLIT_NAMES, write_split_files

_LOGGER = logging.getLogger(__name__)

_JPEG_QUALITY = 92
# Outlines are rasterised at this multiple of the image size and box-filtered
# down, which anti-aliases the edges at any image size.
_SUPERSAMPLE = 4
_OUTLINE_POINTS = 128
# Tags that keep the image and split generators apart. SeedSequence ignores
# trailing zeros, so without them [seed, 0] and [seed, 0, 0] would collide.
_IMAGE_STREAM = 0
_SPLIT_STREAM = 1
_NON_SEED_STREAM = 2

UNSEEN_FOLDER = "unseen"
"""Folder of the dataset root with images unlike the trained classes: `species/` (held-out
species) and `not_seeds/` (photos without a seed)."""
NON_SEED_KINDS = ("empty", "noise", "shapes")

_Pattern = Literal["smooth", "stripes", "speckles", "mottled"]
_Marking = Literal["none", "hilum", "ridge", "ring"]


@dataclasses.dataclass(frozen=True)
class SyntheticSpecies:
    """One class of the synthetic dataset.

    Attributes:
        name: "Genus species", the class name written to classes.txt.
        genus: The genus; species of one genus share their outline.
        info: The info.txt line: what the synthetic seed looks like.
    """

    name: str
    genus: str
    info: str


@dataclasses.dataclass(frozen=True)
class _Genus:
    """What all species of a genus share: outline and relief.

    Seed coordinates (u, v) have u along the seed's length, from -1 to 1
    between the tips, and v across it, both in units of half the length.

    Attributes:
        shape: How info.txt describes the outline.
        curve: Maps angles in [0, 2 pi) and a width/length ratio to outline
            points (u, v).
        aspect: Typical width/length ratio.
        hilum: (u, v) of the hilum, the scar where the seed was attached.
        furrow: Depth of a lengthwise groove in the relief; 0 for none.
    """

    shape: str
    curve: Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]]
    aspect: float
    hilum: tuple[float, float]
    furrow: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Look:
    """What tells the species of one genus apart. Colours are "#rrggbb".

    Attributes:
        stand_in_for: Common name of the real species, for info.txt.
        appearance: How info.txt describes the look.
        coat: Base colour of the seed coat.
        pattern: Texture laid over the coat.
        pattern_colour: Colour of the texture.
        marking: Feature drawn on top of the texture.
        marking_colour: Colour of the marking.
    """

    stand_in_for: str
    appearance: str
    coat: str
    pattern: _Pattern = "smooth"
    pattern_colour: str = "#000000"
    marking: _Marking = "none"
    marking_colour: str = "#000000"


@dataclasses.dataclass(frozen=True)
class _Pose:
    """Where and how a seed lies in the frame.

    Attributes:
        centre: (x, y) of the seed coordinates' origin, in pixels.
        angle: Direction of the seed's length axis, in radians.
        half_length: Half the seed's length, in pixels.
        mirrored: Whether the seed lies on its other face.
    """

    centre: tuple[float, float]
    angle: float
    half_length: float
    mirrored: bool


@dataclasses.dataclass(frozen=True)
class _SeedGeometry:
    """Per-pixel description of one seed, for painting its coat.

    Attributes:
        u: Seed coordinate along the length of every pixel.
        v: Seed coordinate across the seed of every pixel.
        coverage: Fraction of every pixel covered by the seed.
        half_length: Half the seed's length, in pixels.
        hilum: (u, v) of the hilum.
    """

    u: np.ndarray
    v: np.ndarray
    coverage: np.ndarray
    half_length: float
    hilum: tuple[float, float]


def _ellipse(t: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    return np.cos(t), aspect * np.sin(t)


def _kidney(t: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    u, v = _ellipse(t, aspect)
    # Dent only the upper side (weight 0 at the bottom, 1 at the top) to get
    # the concave hilum side of a bean.
    dent = 0.3 * aspect * np.exp(-((u / 0.5) ** 2)) * (1 + np.sin(t)) / 2
    return u, v - dent


def _teardrop(t: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    # The (1 - cos t) factor pinches the u = 1 end to a point; normalising by
    # the maximum keeps `aspect` the true width/length ratio.
    profile = np.sin(t) * ((1 - np.cos(t)) / 2) ** 0.6
    return np.cos(t), aspect * profile / np.abs(profile).max()


_GENERA = {
    "Phaseolus": _Genus(
        shape="kidney-shaped",
        curve=_kidney,
        aspect=0.62,
        hilum=(0.0, 0.35),
    ),
    "Lens": _Genus(
        shape="a round disc",
        curve=_ellipse,
        aspect=0.9,
        hilum=(0.85, 0.0),
    ),
    "Helianthus": _Genus(
        shape="a pointed teardrop",
        curve=_teardrop,
        aspect=0.58,
        hilum=(0.8, 0.0),
    ),
    "Triticum": _Genus(
        shape="an oblong grain with a crease",
        curve=_ellipse,
        aspect=0.42,
        hilum=(-0.78, 0.0),
        furrow=0.3,
    ),
}

# Each genus uses all four patterns once, and pairs of species share their
# coat colour, so neither colour nor pattern alone identifies a species.
# The order is the label order.
_LOOKS = {
    "Phaseolus vulgaris": _Look(
        stand_in_for="the common bean",
        appearance="buff with maroon mottling and a white hilum",
        coat="#d6b98a",
        pattern="mottled",
        pattern_colour="#7b3a2c",
        marking="hilum",
        marking_colour="#f5f0e4",
    ),
    "Phaseolus coccineus": _Look(
        stand_in_for="the runner bean",
        appearance="mauve with dense black speckles",
        coat="#a4688f",
        pattern="speckles",
        pattern_colour="#2a1d28",
    ),
    "Phaseolus lunatus": _Look(
        stand_in_for="the lima bean",
        appearance="cream with fawn lengthwise stripes and a brown hilum",
        coat="#ece3c8",
        pattern="stripes",
        pattern_colour="#b0926c",
        marking="hilum",
        marking_colour="#6e4b32",
    ),
    "Phaseolus acutifolius": _Look(
        stand_in_for="the tepary bean",
        appearance="plain buff with a pale rim",
        coat="#d6b98a",
        marking="ring",
        marking_colour="#f7efdc",
    ),
    "Lens culinaris": _Look(
        stand_in_for="the lentil",
        appearance="khaki with dark speckles and a pale rim",
        coat="#a89a62",
        pattern="speckles",
        pattern_colour="#3f3523",
        marking="ring",
        marking_colour="#ddd3a4",
    ),
    "Lens orientalis": _Look(
        stand_in_for="the wild lentil",
        appearance="khaki with black marbling",
        coat="#a89a62",
        pattern="mottled",
        pattern_colour="#352e22",
    ),
    "Lens nigricans": _Look(
        stand_in_for="the black wild lentil",
        appearance="plain dark brown with a pale hilum",
        coat="#4a3a33",
        marking="hilum",
        marking_colour="#ddd2ba",
    ),
    "Lens ervoides": _Look(
        stand_in_for="the bitter-vetch lentil",
        appearance="rust-red with dark bands and a pale ridge",
        coat="#b0683f",
        pattern="stripes",
        pattern_colour="#5e301c",
        marking="ridge",
        marking_colour="#ecc8a2",
    ),
    "Helianthus annuus": _Look(
        stand_in_for="the sunflower",
        appearance="black with white lengthwise stripes",
        coat="#2b2a2e",
        pattern="stripes",
        pattern_colour="#dedbd3",
    ),
    "Helianthus petiolaris": _Look(
        stand_in_for="the prairie sunflower",
        appearance="brown with black speckles and a pale ridge",
        coat="#9a7658",
        pattern="speckles",
        pattern_colour="#221d1a",
        marking="ridge",
        marking_colour="#e6d6c0",
    ),
    "Helianthus debilis": _Look(
        stand_in_for="the beach sunflower",
        appearance="plain black with a grey rim",
        coat="#2b2a2e",
        marking="ring",
        marking_colour="#9a958b",
    ),
    "Helianthus argophyllus": _Look(
        stand_in_for="the silverleaf sunflower",
        appearance="silver-grey with dark mottling and a black tip",
        coat="#bebbb3",
        pattern="mottled",
        pattern_colour="#4d4a45",
        marking="hilum",
        marking_colour="#151312",
    ),
    "Triticum aestivum": _Look(
        stand_in_for="bread wheat",
        appearance="plain red-brown with a pale germ",
        coat="#a8643a",
        marking="hilum",
        marking_colour="#e8c48f",
    ),
    "Triticum durum": _Look(
        stand_in_for="durum wheat",
        appearance="amber with brown speckles",
        coat="#d9ae5f",
        pattern="speckles",
        pattern_colour="#6e4420",
    ),
    "Triticum monococcum": _Look(
        stand_in_for="einkorn",
        appearance="red-brown with pale lengthwise streaks",
        coat="#a8643a",
        pattern="stripes",
        pattern_colour="#e0ab72",
    ),
    "Triticum spelta": _Look(
        stand_in_for="spelt",
        appearance="pale tan with brown mottling and a light rim",
        coat="#cfae82",
        pattern="mottled",
        pattern_colour="#7f5a38",
        marking="ring",
        marking_colour="#f3e4c8",
    ),
}


def _species(name: str, look: _Look) -> SyntheticSpecies:
    genus = name.split(maxsplit=1)[0]
    shape = _GENERA[genus].shape
    info = f"Synthetic stand-in for {look.stand_in_for}: {shape}, {look.appearance}."
    return SyntheticSpecies(name=name, genus=genus, info=info)


SPECIES: tuple[SyntheticSpecies, ...] = tuple(_species(name, look) for name, look in _LOOKS.items())

# Paper, kraft paper, grey card, soil and a green cutting mat.
_BACKGROUND_COLOURS = ("#e2ded0", "#c4aa80", "#96968f", "#705840", "#5e6a58")


def generate_dataset(
    root: Path | str,
    *,
    images_per_class: int = 100,
    image_size: int = 128,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    held_out_species: int = 0,
    non_seed_images: int = 0,
) -> Path:
    """Writes a synthetic seed dataset in the original split-file layout, and optionally images
    unlike anything trained, to measure how well a run tells them apart (`UNSEEN_FOLDER`).

    Args:
        root: Directory to write `images/` and `dataset_files/` into.
        images_per_class: Images per species; at least 3 so that every split
            gets one of each.
        image_size: Width and height of the square images, in pixels.
        split_fractions: Fractions of each species' images for the train,
            val and test splits.
        seed: Seed for all randomness; the same arguments give identical files.
        held_out_species: Species left out of the classes (see `held_out`): their
            images go to `root/unseen/species/<Genus_species>/`. Defaults to 0.
        non_seed_images: Images of each kind of `NON_SEED_KINDS` (no seed in
            them) in `root/unseen/not_seeds/<kind>/`. Defaults to 0.

    Returns:
        The `root/dataset_files` directory.

    Raises:
        InputError: naming the argument that is out of range.
    """
    _check_at_least("images_per_class", images_per_class, 3)
    _check_at_least("image_size", image_size, 32)
    _check_split_fractions(split_fractions)
    _check_at_least("seed", seed, 0)
    _check_at_least("non_seed_images", non_seed_images, 0)
    unseen = held_out(held_out_species)
    root = Path(root)
    files_dir = root / "dataset_files"
    files_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLIT_NAMES}
    trained = [index for index, species in enumerate(SPECIES) if species.name not in unseen]
    for label, index in enumerate(trained):
        class_dir = SPECIES[index].name.replace(" ", "_")
        # Drawn and split by the species' own index: holding others out changes none of its images.
        _write_class_images(root / "images" / class_dir, index, images_per_class, image_size, seed)
        split_rng = np.random.default_rng([seed, _SPLIT_STREAM, index])
        parts = _split_indices(images_per_class, split_fractions, split_rng)
        for split, indices in zip(SPLIT_NAMES, parts, strict=True):
            entries[split] += [(f"{class_dir}/{_image_name(i)}", label) for i in indices]
    for index, species in enumerate(SPECIES):
        if species.name in unseen:
            folder = root / UNSEEN_FOLDER / "species" / species.name.replace(" ", "_")
            _write_class_images(folder, index, images_per_class, image_size, seed)
    for kind_index, kind in enumerate(NON_SEED_KINDS if non_seed_images else ()):
        folder = root / UNSEEN_FOLDER / "not_seeds" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(non_seed_images):
            rng = np.random.default_rng([seed, _NON_SEED_STREAM, kind_index, index])
            draw_non_seed_image(kind, image_size, rng).save(
                folder / _image_name(index), quality=_JPEG_QUALITY
            )
    # The text files come last, so their presence marks a complete dataset.
    write_split_files(
        files_dir,
        [SPECIES[index].name for index in trained],
        entries,
        info=[SPECIES[index].info for index in trained],
    )
    _LOGGER.info(
        "Wrote %d synthetic seed images of %d species under %s (%d species held out, %d non-seed images).",
        images_per_class * len(trained),
        len(trained),
        root,
        len(unseen),
        non_seed_images * len(NON_SEED_KINDS),
    )
    return files_dir


def held_out(count: int) -> tuple[str, ...]:
    """The names of `count` species to leave out of training: the last species of each genus in
    turn, then the one before it, so that every genus loses one before any loses two. Unseen species
    of known genera are the hard case of "not a seed I know": they share their genus' outline."""
    if not 0 <= count < len(SPECIES) - 1:
        raise InputError(
            "held_out_species",
            f"Expected 0 <= held_out_species <= {len(SPECIES) - 2}. Received: held_out_species={count}",
        )
    by_genus: dict[str, list[str]] = {}
    for species in SPECIES:
        by_genus.setdefault(species.genus, []).append(species.name)
    order = [
        names[-1 - depth]
        for depth in range(max(map(len, by_genus.values())))
        for names in by_genus.values()
        if depth < len(names)
    ]
    return tuple(order[:count])


def draw_non_seed_image(kind: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Paints one photo with no seed in it, of a kind in `NON_SEED_KINDS`: "empty" (the photo
    backgrounds with their debris, nothing on them), "noise" (uniform RGB noise) or "shapes"
    (rectangles and bars of random colours, like a label or a ruler).

    Raises:
        InputError: naming `kind` when it is not one of NON_SEED_KINDS.
    """
    if kind not in NON_SEED_KINDS:
        raise InputError("kind", f"Expected one of {list(NON_SEED_KINDS)}. Received: kind={kind!r}")
    _check_at_least("image_size", image_size, 32)
    if kind == "empty":
        return _photograph(_scatter_debris(_background(image_size, rng), rng), rng)
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
    canvas = Image.new("RGB", (image_size, image_size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, image_size, 2)
        width, height = rng.integers(image_size // 16, image_size // 2, 2)
        draw.rectangle(
            [int(x0), int(y0), int(x0 + width), int(y0 + height)],
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
    return canvas


def draw_seed_image(species_index: int, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Paints one photo-like image of a seed of the given species.

    Args:
        species_index: Label of the species, an index into `SPECIES`.
        image_size: Width and height of the square image, in pixels.
        rng: Source of all randomness; the same state gives the same image.

    Returns:
        An RGB image.

    Raises:
        InputError: naming `species_index` or `image_size` when out of range.
    """
    if not 0 <= species_index < len(SPECIES):
        raise InputError(
            "species_index",
            f"Expected 0 <= species_index < {len(SPECIES)}. Received: species_index={species_index}",
        )
    _check_at_least("image_size", image_size, 32)
    species = SPECIES[species_index]
    pose = _random_pose(image_size, rng)
    light = _random_light(rng)
    seed_rgb, coverage = _render_seed(
        _GENERA[species.genus], _LOOKS[species.name], pose, light, image_size=image_size, rng=rng
    )
    scene = _scatter_debris(_background(image_size, rng), rng)
    scene = _cast_shadow(scene, coverage, light, pose.half_length, rng)
    return _photograph(_mix(scene, seed_rgb, coverage), rng)


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise InputError(name, f"Expected {name} >= {minimum}. Received: {name}={value}")


def _check_split_fractions(split_fractions: Sequence[float]) -> None:
    if len(split_fractions) != 3 or min(split_fractions) <= 0 or not math.isclose(sum(split_fractions), 1.0):
        raise InputError(
            "split_fractions",
            "Expected split_fractions to be three positive fractions (train, val, "
            f"test) summing to 1. Received: split_fractions={split_fractions}",
        )


def _image_name(index: int) -> str:
    return f"{index:04d}.jpg"


def _write_class_images(class_dir: Path, label: int, count: int, image_size: int, seed: int) -> None:
    class_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        # A generator per image makes each image independent of the others.
        rng = np.random.default_rng([seed, _IMAGE_STREAM, label, index])
        draw_seed_image(label, image_size, rng).save(class_dir / _image_name(index), quality=_JPEG_QUALITY)


def _split_indices(
    count: int, fractions: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffles `range(count)` into train, val and test parts, none empty."""
    # Rounding the cumulative boundaries keeps the total exact; clipping
    # them leaves at least one image in every part.
    first = int(np.clip(round(fractions[0] * count), 1, count - 2))
    second = int(np.clip(round((fractions[0] + fractions[1]) * count), first + 1, count - 1))
    train, val, test = np.split(rng.permutation(count), [first, second])
    return np.sort(train), np.sort(val), np.sort(test)


def _random_pose(image_size: int, rng: np.random.Generator) -> _Pose:
    half_length = rng.uniform(0.25, 0.45) * image_size
    # The seed fits in a circle of radius half_length around its centre, so
    # this slack keeps it whole in the frame at any angle.
    slack = image_size / 2 - half_length
    centre = image_size / 2 + rng.uniform(-slack, slack, size=2)
    return _Pose(
        centre=(float(centre[0]), float(centre[1])),
        angle=rng.uniform(0, 2 * np.pi),
        half_length=half_length,
        mirrored=bool(rng.integers(2)),
    )


def _random_outline(genus: _Genus, rng: np.random.Generator) -> np.ndarray:
    """Returns the genus' outline as (N, 2) seed coordinates, slightly varied."""
    t = np.linspace(0, 2 * np.pi, _OUTLINE_POINTS, endpoint=False)
    u, v = genus.curve(t, genus.aspect * rng.uniform(0.92, 1.08))
    # Small low harmonics make every seed a little irregular without changing
    # the genus' outline.
    harmonics = np.arange(2, 5)[:, np.newaxis]
    amplitudes = rng.normal(0, 0.015, size=(3, 1))
    phases = rng.uniform(0, 2 * np.pi, size=(3, 1))
    wobble = 1 + (amplitudes * np.cos(harmonics * t + phases)).sum(axis=0)
    return np.stack([u * wobble, v * wobble], axis=1)


def _to_pixels(points: np.ndarray, pose: _Pose) -> np.ndarray:
    """Maps (N, 2) seed coordinates to (N, 2) pixel coordinates (x, y)."""
    u, v = points.T
    if pose.mirrored:
        v = -v
    cos, sin = np.cos(pose.angle), np.sin(pose.angle)
    x = pose.centre[0] + pose.half_length * (u * cos - v * sin)
    y = pose.centre[1] + pose.half_length * (u * sin + v * cos)
    return np.stack([x, y], axis=1)


def _seed_coordinates(pose: _Pose, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverts `_to_pixels` for every pixel centre: returns u and v maps."""
    x, y = _pixel_centres(image_size)
    dx, dy = x - pose.centre[0], y - pose.centre[1]
    cos, sin = np.cos(pose.angle), np.sin(pose.angle)
    u = (dx * cos + dy * sin) / pose.half_length
    v = (dy * cos - dx * sin) / pose.half_length
    return u, -v if pose.mirrored else v


def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns x and y maps of the pixel centres."""
    y, x = np.mgrid[:image_size, :image_size].astype(np.float32) + 0.5
    return x, y


def _random_light(rng: np.random.Generator) -> np.ndarray:
    """Returns a unit vector towards the light; z points at the camera."""
    azimuth = rng.uniform(0, 2 * np.pi)
    elevation = rng.uniform(np.radians(40), np.radians(70))
    return np.array(
        [
            np.cos(azimuth) * np.cos(elevation),
            np.sin(azimuth) * np.cos(elevation),
            np.sin(elevation),
        ],
        dtype=np.float32,
    )


def _background(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Paints paper, card or soil: a base colour with blotches and grain."""
    colour = _vary_colour(_rgb(_BACKGROUND_COLOURS[rng.integers(len(_BACKGROUND_COLOURS))]), rng)
    blotches = _value_noise(image_size, image_size / rng.uniform(3, 8), rng) - 0.5
    grain_strength = rng.uniform(0.01, 0.05)
    grain = grain_strength * rng.standard_normal((image_size, image_size), np.float32)
    tone = 1 + rng.uniform(0.1, 0.4) * blotches + grain
    return tone[..., np.newaxis] * colour


def _scatter_debris(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Adds crumbs and fibres, so the seed is not the only structure in view."""
    image_size = scene.shape[0]
    image = Image.fromarray(_to_uint8(scene))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 10)):
        colour = tuple(_to_uint8(rng.uniform(0.15, 0.9) * _rgb("#ffe6c0")).tolist())
        x, y = rng.uniform(0, image_size, size=2)
        if rng.random() < 0.5:  # A crumb.
            rx, ry = rng.uniform(0.008, 0.025, size=2) * image_size
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=colour)
        else:  # A fibre.
            length = rng.uniform(0.05, 0.2) * image_size
            angle = rng.uniform(0, 2 * np.pi)
            end = (x + length * np.cos(angle), y + length * np.sin(angle))
            draw.line([(x, y), end], fill=colour, width=max(1, image_size // 128))
    return _to_float(image)


def _cast_shadow(
    scene: np.ndarray,
    coverage: np.ndarray,
    light: np.ndarray,
    half_length: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Darkens a soft copy of the silhouette, shifted away from the light."""
    # A seed about a tenth of its length thick throws a shadow that long
    # under a 45 degree light, and a longer one under a lower light.
    offset = -light[:2] / light[2] * 0.2 * half_length
    shadow = _blur(_shift(coverage, offset), 0.1 * half_length)
    return scene * (1 - rng.uniform(0.2, 0.5) * shadow)[..., np.newaxis]


def _render_seed(
    genus: _Genus,
    look: _Look,
    pose: _Pose,
    light: np.ndarray,
    *,
    image_size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the lit seed's colour at every pixel and its per-pixel coverage."""
    coverage = _polygon_coverage(_to_pixels(_random_outline(genus, rng), pose), image_size)
    u, v = _seed_coordinates(pose, image_size)
    geometry = _SeedGeometry(u=u, v=v, coverage=coverage, half_length=pose.half_length, hilum=genus.hilum)
    diffuse, specular = _shading(_relief(genus, geometry), light, pose.half_length)
    colour = _paint_coat(look, geometry, rng)
    return colour * diffuse[..., np.newaxis] + specular[..., np.newaxis], coverage


def _relief(genus: _Genus, geometry: _SeedGeometry) -> np.ndarray:
    """Returns a height map: a dome from the blurred silhouette, minus any furrow."""
    dome = _blur(geometry.coverage, 0.25 * geometry.half_length)
    # Like the crease of a grain, the furrow fades out before the tips.
    along = _smoothstep(0.9, 0.6, np.abs(geometry.u))
    furrow = genus.furrow * np.exp(-((geometry.v / 0.07) ** 2)) * along
    return dome - furrow


def _shading(relief: np.ndarray, light: np.ndarray, half_length: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns diffuse (multiplicative) and specular (additive) light maps."""
    dy, dx = np.gradient(relief)
    # Slopes of the dome scale with 1 / half_length; scaling them back keeps
    # the seed looking equally rounded at every size.
    steepness = 0.75 * half_length
    normal = np.stack([-steepness * dx, -steepness * dy, np.ones_like(dx)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    halfway = light + np.array([0, 0, 1], dtype=np.float32)
    halfway /= np.linalg.norm(halfway)
    diffuse = 0.35 + 0.75 * np.clip(normal @ light, 0, None)
    specular = 0.25 * np.clip(normal @ halfway, 0, None) ** 30
    return diffuse, specular


def _paint_coat(look: _Look, geometry: _SeedGeometry, rng: np.random.Generator) -> np.ndarray:
    """Returns the unlit coat colour: base colour, then pattern, then marking."""
    coat = _vary_colour(_rgb(look.coat), rng)
    pattern_colour = _vary_colour(_rgb(look.pattern_colour), rng)
    colour = _mix(coat, pattern_colour, _PATTERNS[look.pattern](geometry, rng))
    return _mix(colour, _rgb(look.marking_colour), _MARKINGS[look.marking](geometry))


def _smooth(geometry: _SeedGeometry, rng: np.random.Generator) -> np.ndarray:
    """A plain coat."""
    return np.zeros_like(geometry.u)


def _stripes(geometry: _SeedGeometry, rng: np.random.Generator) -> np.ndarray:
    """Gently waving lengthwise bands, like those of a sunflower achene."""
    bands_per_half_length = rng.uniform(3.0, 4.0)
    phase = rng.uniform(0, 2 * np.pi) + 0.8 * np.sin(3 * geometry.u)
    return _smoothstep(0.1, 0.5, np.sin(2 * np.pi * bands_per_half_length * geometry.v + phase))


def _speckles(geometry: _SeedGeometry, rng: np.random.Generator) -> np.ndarray:
    """Small dots."""
    return _noise_peaks(geometry, spacing=0.15, share=0.14, rng=rng)


def _mottled(geometry: _SeedGeometry, rng: np.random.Generator) -> np.ndarray:
    """Large irregular blotches."""
    return _noise_peaks(geometry, spacing=0.3, share=0.4, rng=rng)


def _noise_peaks(
    geometry: _SeedGeometry, spacing: float, share: float, rng: np.random.Generator
) -> np.ndarray:
    """Covers `share` of the area with noise peaks `spacing` half lengths apart."""
    noise = _value_noise(geometry.u.shape[0], spacing * geometry.half_length, rng)
    # A quantile threshold fixes the covered share whatever the noise's range.
    threshold = np.quantile(noise, 1 - share)
    return _smoothstep(threshold, threshold + 0.04, noise)


def _no_marking(geometry: _SeedGeometry) -> np.ndarray:
    """No marking."""
    return np.zeros_like(geometry.u)


def _hilum(geometry: _SeedGeometry) -> np.ndarray:
    """A small oval scar where the genus' seeds were attached."""
    u0, v0 = geometry.hilum
    distance = ((geometry.u - u0) / 0.17) ** 2 + ((geometry.v - v0) / 0.08) ** 2
    return _smoothstep(1.0, 0.6, distance)


def _ridge(geometry: _SeedGeometry) -> np.ndarray:
    """A thin line along the length, stopping short of the tips."""
    along = _smoothstep(0.75, 0.55, np.abs(geometry.u))
    return np.exp(-((geometry.v / 0.045) ** 2)) * along


def _ring(geometry: _SeedGeometry) -> np.ndarray:
    """A band just inside the outline."""
    inner = _blur(geometry.coverage, 0.08 * geometry.half_length)
    return _smoothstep(0.95, 0.75, inner)


_PATTERNS: dict[_Pattern, Callable[[_SeedGeometry, np.random.Generator], np.ndarray]] = {
    "smooth": _smooth,
    "stripes": _stripes,
    "speckles": _speckles,
    "mottled": _mottled,
}
_MARKINGS: dict[_Marking, Callable[[_SeedGeometry], np.ndarray]] = {
    "none": _no_marking,
    "hilum": _hilum,
    "ridge": _ridge,
    "ring": _ring,
}


def _photograph(scene: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Applies the camera: exposure, uneven light, colour cast, noise and focus."""
    image_size = scene.shape[0]
    x, y = _pixel_centres(image_size)
    azimuth = rng.uniform(0, 2 * np.pi)
    across = ((x - image_size / 2) * np.cos(azimuth) + (y - image_size / 2) * np.sin(azimuth)) / image_size
    exposure = rng.uniform(0.8, 1.15) * (1 + rng.uniform(0, 0.3) * across)
    contrast = rng.uniform(0.8, 1.15)
    cast = rng.normal(1, 0.03, size=3).astype(np.float32)
    photo = ((scene - 0.5) * contrast + 0.5) * exposure[..., np.newaxis] * cast
    noise_strength = rng.uniform(0.005, 0.03)
    photo += noise_strength * rng.standard_normal(photo.shape, np.float32)
    image = Image.fromarray(_to_uint8(photo))
    if rng.random() < 0.3:  # Slightly out of focus.
        blur_radius = rng.uniform(0.3, 0.9) * image_size / 128
        image = image.filter(ImageFilter.GaussianBlur(blur_radius))
    return image


def _rgb(colour: str) -> np.ndarray:
    return np.array(ImageColor.getrgb(colour), dtype=np.float32) / 255


def _vary_colour(colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shifts brightness and hue a little, as between real seeds or lamps."""
    brightness = rng.normal(1, 0.06)
    tint = rng.normal(1, 0.025, size=3)
    return (colour * brightness * tint).astype(np.float32)


def _mix(base: np.ndarray, overlay: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Blends per pixel; colours may be (3,) or (H, W, 3), `weight` is (H, W)."""
    weight = weight[..., np.newaxis]
    return base * (1 - weight) + overlay * weight


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Eases from 0 at `edge0` to 1 at `edge1`; falls instead if `edge0 > edge1`."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0, 1)
    return t * t * (3 - 2 * t)


def _value_noise(image_size: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Returns smooth noise, about [0, 1], with features `spacing` pixels apart."""
    cells = max(2, math.ceil(image_size / spacing))
    grid = rng.random((cells, cells), dtype=np.float32)
    noise = Image.fromarray(grid).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(noise)


def _polygon_coverage(points: np.ndarray, image_size: int) -> np.ndarray:
    """Rasterises an (N, 2) polygon to per-pixel coverage in [0, 1]."""
    canvas = Image.new("L", (image_size * _SUPERSAMPLE, image_size * _SUPERSAMPLE))
    ImageDraw.Draw(canvas).polygon((points * _SUPERSAMPLE).ravel().tolist(), fill=255)
    return _to_float(canvas.resize((image_size, image_size), Image.Resampling.BOX))


def _shift(coverage: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Moves a coverage map by (dx, dy) pixels, filling with 0."""
    image = Image.fromarray(_to_uint8(coverage))
    # The affine data maps output to input pixels, hence the negated offset.
    shifted = image.transform(
        image.size,
        Image.Transform.AFFINE,
        (1, 0, -offset[0], 0, 1, -offset[1]),
        Image.Resampling.BILINEAR,
    )
    return _to_float(shifted)


def _blur(coverage: np.ndarray, radius: float) -> np.ndarray:
    image = Image.fromarray(_to_uint8(coverage))
    return _to_float(image.filter(ImageFilter.GaussianBlur(radius)))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)


def _to_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def unseen_folders(dataset_root: Path) -> dict[str, Path]:
    """The folders of images unlike the classes (UNSEEN_FOLDER) that the synthetic dataset at
    `dataset_root` has, for a trust report: one made by `seeds-tf synthetic` with its defaults (no
    held-out species, no photos without a seed) has none, and the report measures the test split
    alone."""
    unseen = dataset_root / UNSEEN_FOLDER
    present = {}
    for name, folder in {"unseen species": unseen / "species", "not seeds": unseen / "not_seeds"}.items():
        if folder.is_dir() and any(path.is_file() for path in folder.rglob("*")):
            present[name] = folder
        else:
            _LOGGER.warning(
                "%s has no %s images (seeds-tf synthetic --held_out_species, --non_seed_images): "
                "the trust report goes without them",
                dataset_root,
                name,
            )
    return present
