"""Decoding: every common format to 8-bit RGB, and a clear error for anything else."""

import io

import numpy as np
import PIL.Image
import pytest

from seeds_tf.core.errors import InputError
from seeds_tf.data import images
from tests.helpers import encode

RNG = np.random.default_rng(0)
PHOTO = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"])
def test_common_formats_decode_to_rgb(fmt):
    pixels = images.decode_image(encode(PHOTO, fmt), "image", f"seed.{fmt.lower()}")
    assert pixels.shape == (40, 60, 3)
    assert pixels.dtype == np.uint8


def test_lossless_formats_keep_the_pixels():
    assert np.array_equal(images.decode_image(encode(PHOTO, "PNG"), "image", "a.png"), PHOTO)


def test_grayscale_and_16_bit_are_scaled_to_8_bit_rgb():
    gray = images.decode_image(encode(PHOTO[..., 0], "PNG"), "image", "g.png")
    assert np.array_equal(gray[..., 0], PHOTO[..., 0])
    assert np.array_equal(gray[..., 0], gray[..., 2])
    deep = PIL.Image.fromarray(PHOTO[..., 0].astype(np.uint16) * 257)
    assert deep.mode.startswith("I;16")
    buffer = io.BytesIO()
    deep.save(buffer, format="PNG")
    decoded = images.decode_image(buffer.getvalue(), "image", "deep.png")
    assert np.abs(decoded[..., 0].astype(int) - PHOTO[..., 0]).max() <= 1
    # A 32-bit scan (TIFF mode I) was clipped as if 16-bit: all but its darkest pixels white.
    deeper = PIL.Image.fromarray(PHOTO[..., 0].astype(np.int32) * 8_000_000)
    assert deeper.mode == "I"
    decoded = images.decode_image(encode(np.asarray(deeper), "TIFF"), "image", "scan.tif")
    expected = PHOTO[..., 0] * (255 / PHOTO[..., 0].max())
    assert np.abs(decoded[..., 0] - expected).max() <= 1


def test_transparent_pixels_are_laid_on_white():
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:2, :, :] = (200, 10, 10, 255)
    decoded = images.decode_image(encode(rgba, "PNG"), "image", "a.png")
    assert tuple(decoded[0, 0]) == (200, 10, 10)
    assert tuple(decoded[3, 3]) == (255, 255, 255)


def test_palette_with_transparency_is_laid_on_white():
    palette = PIL.Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 200] + [0, 0, 0] * 255)
    palette.putpixel((0, 0), 1)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=1)
    decoded = images.decode_image(buffer.getvalue(), "image", "p.png")
    assert tuple(decoded[3, 3]) == (10, 20, 200)
    assert tuple(decoded[0, 0]) == (255, 255, 255)


def test_an_animated_gif_gives_its_first_frame():
    frames = [PIL.Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = images.decode_image(buffer.getvalue(), "image", "a.gif")
    assert decoded[0, 0, 0] > 200 and decoded[0, 0, 2] < 50


def test_cmyk_is_converted():
    cmyk = PIL.Image.fromarray(PHOTO).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG")
    assert images.decode_image(buffer.getvalue(), "image", "c.jpg").shape == (40, 60, 3)


def test_exif_orientation_is_applied():
    image = PIL.Image.fromarray(PHOTO)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert images.decode_image(buffer.getvalue(), "image", "r.jpg").shape == (60, 40, 3)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "is empty"),
        (b"this is not an image at all", "not an image"),
        (encode(PHOTO, "JPEG")[:300], "broken or truncated"),
        (encode(PHOTO, "PNG")[:100], "broken or truncated"),
    ],
)
def test_bad_bytes_get_a_clear_error(data, problem):
    with pytest.raises(InputError) as raised:
        images.decode_image(data, "image", "upload.jpg")
    assert raised.value.field == "image"
    assert problem in raised.value.problem
    assert "upload.jpg" in raised.value.problem


def test_too_many_pixels_are_refused_before_decoding():
    with pytest.raises(InputError, match="more than the limit of 1000"):
        images.decode_image(encode(PHOTO, "PNG"), "image", "big.png", max_pixels=1000)


def test_unreadable_dataset_images_are_found(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(PHOTO, "JPEG"))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(encode(PHOTO, "JPEG")[:300])
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    thumbnail = tmp_path / "thumbnail.jpg"  # decodes, but every decoding refuses it
    thumbnail.write_bytes(encode(np.zeros((12, 40, 3), np.uint8), "JPEG"))
    problems = images.find_unreadable([good, truncated, text, thumbnail])
    assert set(problems) == {truncated, text, thumbnail}
    assert problems[thumbnail] == f"is 40x12 pixels; each side must be at least {images.MIN_SIDE}"


def test_several_images_decode_in_order_and_the_first_bad_one_is_named():
    uploads = [
        (f"{index}.png", encode(np.full((20, 20 + index, 3), index, np.uint8), "PNG")) for index in range(5)
    ]
    decoded = images.decode_images(uploads)
    assert [pixels.shape[1] for pixels in decoded] == [20, 21, 22, 23, 24]
    with pytest.raises(InputError, match=r"'bad\.jpg' is not an image"):
        images.decode_images([*uploads, ("bad.jpg", b"words"), ("worse.jpg", b"")])


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "PPM", "ICO", "SGI", "XBM"])
def test_formats_beyond_the_six_never_reach_a_decoder(fmt):
    """Pillow reads these, some in slow pure Python: a request gets a 422 without decoding them."""
    pixels = PHOTO if fmt != "XBM" else PHOTO[..., 0]
    image = PIL.Image.fromarray(pixels).convert("1") if fmt == "XBM" else PIL.Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    assert PIL.Image.open(io.BytesIO(buffer.getvalue())).format == fmt  # Pillow itself would read it
    with pytest.raises(InputError, match=r"is not an image in one of JPEG, PNG, WEBP, TIFF, BMP, GIF"):
        images.decode_image(buffer.getvalue(), "image", f"seed.{fmt.lower()}")


@pytest.mark.parametrize("fmt", images.FORMATS)
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_every_broken_file_of_the_six_formats_is_a_clear_error(fmt, cut):
    """Whatever each decoder raises for a file cut short, or with garbage in its middle."""
    data = bytearray(encode(PHOTO, fmt))
    truncated = bytes(data[: int(len(data) * cut)])
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(range(64))
    for broken in (truncated, bytes(data)):
        try:
            images.decode_image(broken, "image", f"seed.{fmt.lower()}")
        except InputError as error:
            assert error.field == "image"
            assert f"seed.{fmt.lower()}" in error.problem


def test_a_request_over_the_pixel_budget_is_refused_from_the_headers():
    """The last image is broken past its header: refused for the total first, nothing was decoded."""
    photo = encode(PHOTO, "PNG")
    broken = photo[: len(photo) // 2]
    uploads = [("a.png", photo), ("b.png", photo), ("c.png", broken)]
    pixels = PHOTO.shape[0] * PHOTO.shape[1]
    with pytest.raises(InputError, match=f"3 images of {3 * pixels} pixels together") as raised:
        images.decode_images(uploads, max_request_pixels=3 * pixels - 1)
    assert raised.value.field == "image"
    with pytest.raises(InputError, match="broken or truncated"):
        images.decode_images(uploads, max_request_pixels=3 * pixels)


def test_images_decode_together_only_within_the_budget():
    budget = 100
    assert images._decoding_groups([40, 50, 20, 100, 150, 1], budget) == [[0, 1], [2], [3], [4], [5]]
    assert images._decoding_groups([], budget) == []
