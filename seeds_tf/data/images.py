"""From image bytes to RGB pixels, the same way for training and for prediction.

Pillow decodes (it reads every common format and applies EXIF orientation); TensorFlow resizes, so
the pixels a trained model sees at prediction time are computed exactly as during training.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageOps

from seeds_tf.core.errors import InputError

MAX_PIXELS = 40_000_000
"""Largest width x height accepted: above it, decoding could exhaust memory (decompression bombs)."""

MIN_SIDE = 16
"""Smallest width or height accepted: a thinner picture holds no seed to name, only a confident guess."""

MAX_REQUEST_PIXELS = 64_000_000
"""Most pixels in one request, all its images together (e.g. five 12-megapixel phone photos), checked
from the headers before any decoding."""

DECODE_BUDGET_PIXELS = MAX_PIXELS
"""Most pixels decoding at once: one image at the per-image limit, or several smaller ones together."""

FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
"""The only formats handed to a decoder. Pillow knows dozens more; some decode in slow pure Python
(a small upload can hold a worker for many seconds) and PostScript goes to Ghostscript, so nothing
else is even identified."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
"""File name endings (any case) taken for images where a folder is read (a dataset's class folders,
an identify job's collection): those of FORMATS. Other files are left out, and counted (not_images)."""


def decode_image(
    data: bytes, field: str, name: str, max_pixels: int = MAX_PIXELS, *, reduce_jpeg: bool = False
) -> np.ndarray:
    """Decodes image bytes into an RGB array of shape (height, width, 3), dtype uint8.

    Args:
        data: the encoded image, in one of FORMATS (of a GIF, its first frame).
        field: the argument the bytes came from, named in errors.
        name: the file name or URL the bytes came from, named in errors.
        max_pixels: refuse images with more pixels than this, before decoding them.
        reduce_jpeg: decode a JPEG over max_pixels at the largest of 1/2, 1/4 and 1/8 of its size
            that fits (the JPEG decoder does so at a fraction of the cost and memory), rather than
            refuse it: a whole collection's 50-megapixel camera photos. Images under the limit
            decode at full size, so they answer as the API answers them.

    Raises:
        InputError: when the bytes are empty, not an image in one of FORMATS, broken, truncated, too
            large or too small, whatever exception the decoder raised.
    """
    with _decoding_errors(data, field, name):
        image = open_image(data)
        if reduce_jpeg:
            _reduce_jpeg(image, max_pixels)
        return _decoded(image, field, name, max_pixels)


def _reduce_jpeg(image: PIL.Image.Image, max_pixels: int) -> None:
    """Sets a JPEG over `max_pixels` to decode at the largest of 1/2, 1/4 and 1/8 of its size that
    fits (see decode_image); one that no scale fits is left as it is, to be refused."""
    width, height = image.size
    if image.format != "JPEG" or width * height <= max_pixels:
        return
    for scale in (2, 4, 8):
        if -(-width // scale) * -(-height // scale) <= max_pixels:
            image.draft(image.mode, (-(-width // scale), -(-height // scale)))
            return


def image_pixels(data: bytes, field: str, name: str) -> int:
    """Width x height of encoded image bytes, read from the header alone (nothing is decoded).

    Raises:
        InputError: as decode_image, for bytes that are not an image in one of FORMATS.
    """
    with _decoding_errors(data, field, name):
        width, height = open_image(data).size
    return width * height


def open_image(data: bytes) -> PIL.Image.Image:
    """Opens encoded bytes lazily (the header only), trying only the accepted FORMATS."""
    return PIL.Image.open(io.BytesIO(data), formats=FORMATS)


@contextlib.contextmanager
def _decoding_errors(data: bytes, field: str, name: str) -> Iterator[None]:
    """Turns every failure of Pillow on `data` into an InputError naming `field` and `name`."""
    if not data:
        raise InputError(field, f"{name!r} is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns before its own, larger bomb limit (our explicit checks decide) and
            # about broken EXIF blocks (which only lose the orientation): neither is the caller's.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            yield
    except (InputError, MemoryError):
        raise
    except PIL.Image.DecompressionBombError as error:
        raise InputError(field, f"{name!r} has too many pixels: {error}") from None
    except PIL.UnidentifiedImageError:
        raise InputError(field, f"{name!r} is not an image in one of {', '.join(FORMATS)}") from None
    except Exception as error:  # which types a decoder raises varies by format and Pillow release
        raise InputError(
            field, f"{name!r} is a broken or truncated image ({type(error).__name__}: {error})"
        ) from None


def _decoded(image: PIL.Image.Image, field: str, name: str, max_pixels: int) -> np.ndarray:
    """The pixels of an opened image, after checking its size from the header alone."""
    problem = _size_problem(image, max_pixels)
    if problem is not None:
        raise InputError(field, f"{name!r} {problem}")
    image.load()
    _turn_upright(image)
    return _to_rgb(image)


def _turn_upright(image: PIL.Image.Image) -> None:
    """Turns the image in place as its EXIF orientation says (in place: a copy of a large photo
    costs as much as decoding it). A broken or hostile EXIF block only loses the orientation: the
    pixels are still good."""
    with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        PIL.ImageOps.exif_transpose(image, in_place=True)


class Upload(NamedTuple):
    """One image of a request: its name in the answer, its encoded bytes and the argument it was
    sent in, which a refusal of it names (`image_2`, `urls`, `data`). A (name, bytes) pair is an
    upload in `image`."""

    name: str
    data: bytes
    field: str = "image"


def decode_images(
    uploads: Sequence[Upload | tuple[str, bytes]],
    max_request_pixels: int = MAX_REQUEST_PIXELS,
) -> list[np.ndarray]:
    """Decodes the images of one request, in order, within a memory budget.

    Every header is read first: a request whose images add up to more than `max_request_pixels`
    is refused before anything is decoded. Then images decode in parallel threads (Pillow decodes
    without the GIL), but only as many at once as fit in DECODE_BUDGET_PIXELS: decoding costs up to
    ~30 bytes per pixel (RGBA and float images), so that bounds the request's peak memory.

    Raises:
        InputError: naming the argument of the first image that cannot be decoded, or `image` for
            a request over the budget.
    """
    uploads = [Upload(*upload) for upload in uploads]
    sizes = [image_pixels(upload.data, upload.field, upload.name) for upload in uploads]
    if sum(sizes) > max_request_pixels:
        raise InputError(
            "image",
            f"{len(uploads)} images of {sum(sizes)} pixels together; the limit per request is "
            f"{max_request_pixels} pixels",
        )
    decoded: list[np.ndarray] = []
    for group in _decoding_groups(sizes, DECODE_BUDGET_PIXELS):
        batch = [uploads[index] for index in group]
        if len(batch) == 1:
            decoded.append(decode_image(batch[0].data, batch[0].field, batch[0].name))
            continue
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            decoded.extend(
                pool.map(lambda upload: decode_image(upload.data, upload.field, upload.name), batch)
            )
    return decoded


def _decoding_groups(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices of `sizes` in groups whose sum stays within `budget` (an image larger
    than the budget alone makes a group of one)."""
    groups: list[list[int]] = []
    total = budget + 1
    for index, size in enumerate(sizes):
        if total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += size
    return groups


def files_under(folder: Path, *, follow_links: bool = False) -> Iterator[Path]:
    """The files under `folder`, at any depth, folders in name order, hidden files and folders left
    out: a disk that has been on a Mac holds a `._IMG_0001.jpg` of metadata beside each photo, and a
    USB disk its deleted photos under `.Trash-1000/`. With `follow_links`, symbolic links to folders
    are followed (a collection gathered from several disks), each folder once: a link back up is no
    endless loop."""
    seen = set()
    for top, folders, names in os.walk(folder, followlinks=follow_links):
        identity = os.stat(top)
        if (identity.st_dev, identity.st_ino) in seen:
            folders.clear()
            continue
        seen.add((identity.st_dev, identity.st_ino))
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # first seen, first kept
        yield from (Path(top, name) for name in names if not name.startswith("."))


def is_image_name(path: Path) -> bool:
    """Whether the file name ends in one of IMAGE_SUFFIXES."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def not_images(paths: Iterable[Path]) -> dict[str, int]:
    """The files of `paths` that are no images by their suffix, by suffix ("no suffix"), most first."""
    counts = collections.Counter(
        path.suffix.lower() or "no suffix" for path in paths if not is_image_name(path)
    )
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def not_images_text(counts: Mapping[str, int]) -> str:
    """`counts` of not_images for a message: iPhone .heic and raw .cr2 photos, left out by their
    suffix, are photos a user may count on."""
    listed = ", ".join(f"{suffix}: {count}" for suffix, count in counts.items())
    return f"no images by their suffix ({listed}); images are {', '.join(sorted(IMAGE_SUFFIXES))}"


def read_image(path: Path) -> np.ndarray:
    """Reads an image file of a dataset, decoded exactly as an uploaded image would be."""
    return decode_image(path.read_bytes(), "image", str(path))


def find_unreadable(paths: Sequence[Path], threads: int = 8) -> dict[Path, str]:
    """The images among `paths` that cannot be decoded, with the reason for each.

    Decodes each file at reduced scale where the format allows it (JPEG draft mode), which still
    detects truncation, so screening a large dataset costs a fraction of an epoch.
    """
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        problems = dict(zip(paths, pool.map(_problem_of, paths), strict=True))
    return {path: problem for path, problem in problems.items() if problem is not None}


def _size_problem(image: PIL.Image.Image, max_pixels: int) -> str | None:
    """What is wrong with an opened image's size (from its header alone), or None: a dataset's
    screening and every decoding refuse the same images."""
    width, height = image.size
    if width * height > max_pixels:
        return f"has {width}x{height} pixels, more than the limit of {max_pixels}"
    if min(width, height) < MIN_SIDE:
        return f"is {width}x{height} pixels; each side must be at least {MIN_SIDE}"
    return None


def _problem_of(path: Path) -> str | None:
    try:
        with PIL.Image.open(path, formats=FORMATS) as image:
            problem = _size_problem(image, MAX_PIXELS)
            if problem is not None:
                return problem
            image.draft("RGB", (64, 64))
            image.load()
        return None
    except MemoryError:
        raise
    except Exception as error:  # as in decode_image: any decoder failure is a bad file
        return f"{type(error).__name__}: {error}"


def _to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """Converts any Pillow mode to 8-bit RGB: 16-bit, 32-bit and float images are scaled, not
    clipped, and transparent pixels are laid on white (the usual background of seed photos)."""
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        # 16-bit samples (modes I;16*, and mode I where a format stores them so) span 0-65535; a
        # 32-bit scan or a float image has no fixed range, so it is scaled by its peak.
        fits_16_bit = image.mode != "F" and pixels.max() <= 65535.0
        peak = 65535.0 if fits_16_bit else max(pixels.max(), 1e-12)
        gray = np.clip(pixels * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
