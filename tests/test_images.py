"""Image modes a paper figure comes in, decoded from real PNG and JPEG files to 8-bit RGB."""

import numpy as np
import pytest
from PIL import Image

import dataset as data
from dataset import ImageSettings

WHITE = (255, 255, 255)


def decode(path):
    """Open an image file as the data loader does and return its RGB pixels, [height, width, 3]."""
    with Image.open(path) as image:
        image.load()
        return np.asarray(data.to_rgb(image))


def assert_near(pixel, expected, tolerance):
    difference = np.abs(pixel.astype(int) - np.array(expected)).max()
    assert difference <= tolerance, f"pixel {tuple(pixel)} differs from {expected} by {difference}"


def test_grayscale_l(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "gray.png")
    assert_near(decode(tmp_path / "gray.png")[0, 0], (100, 100, 100), 0)


def test_grayscale_alpha_transparent_is_white(tmp_path):
    image = Image.new("LA", (8, 8), (0, 0))
    image.putpixel((1, 1), (40, 255))
    image.save(tmp_path / "la.png")
    pixels = decode(tmp_path / "la.png")
    assert_near(pixels[0, 0], WHITE, 0)
    assert_near(pixels[1, 1], (40, 40, 40), 0)


def test_one_bit(tmp_path):
    image = Image.new("1", (8, 8), 1)
    image.putpixel((2, 3), 0)
    image.save(tmp_path / "bits.png")
    pixels = decode(tmp_path / "bits.png")
    assert_near(pixels[0, 0], WHITE, 0)
    assert_near(pixels[3, 2], (0, 0, 0), 0)


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 30, 60] + [0] * (254 * 3))
    image.save(tmp_path / "palette.png")
    assert_near(decode(tmp_path / "palette.png")[0, 0], (200, 30, 60), 0)


def test_palette_transparent_index_is_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 10, 120, 250] + [0] * (254 * 3))
    image.putpixel((4, 4), 1)
    image.save(tmp_path / "palette.png", transparency=0)
    with Image.open(tmp_path / "palette.png") as image:
        assert "transparency" in image.info
    pixels = decode(tmp_path / "palette.png")
    assert_near(pixels[0, 0], WHITE, 0)
    assert_near(pixels[4, 4], (10, 120, 250), 0)


def test_rgba_transparent_is_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((5, 5), (0, 0, 255, 255))
    image.putpixel((6, 6), (0, 0, 0, 128))
    image.save(tmp_path / "rgba.png")
    pixels = decode(tmp_path / "rgba.png")
    assert_near(pixels[0, 0], WHITE, 0)
    assert_near(pixels[5, 5], (0, 0, 255), 0)
    assert_near(pixels[6, 6], (127, 127, 127), 1)


def test_sixteen_bit_mid_grey(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as image:
        assert image.mode.startswith("I")
    assert_near(decode(tmp_path / "gray16.png")[0, 0], (128, 128, 128), 0)


def test_sixteen_bit_full_range(tmp_path):
    array = np.zeros((8, 8), dtype=np.uint16)
    array[0, 0] = 65535
    Image.fromarray(array).save(tmp_path / "gray16.png")
    pixels = decode(tmp_path / "gray16.png")
    assert_near(pixels[0, 0], WHITE, 0)
    assert_near(pixels[1, 1], (0, 0, 0), 0)


@pytest.mark.parametrize(
    "cmyk, rgb",
    [((0, 0, 0, 0), (255, 255, 255)), ((255, 0, 0, 0), (0, 255, 255)), ((0, 0, 0, 255), (0, 0, 0))],
    ids=["white", "cyan", "black"],
)
def test_cmyk_jpeg(tmp_path, cmyk, rgb):
    Image.new("CMYK", (16, 16), cmyk).save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
    assert_near(decode(tmp_path / "cmyk.jpg")[8, 8], rgb, 8)


def write_rotated_jpeg(path):
    """Write a 40x20 JPEG, red left half and blue right half, tagged to display rotated 90 degrees clockwise."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, quality=95, exif=exif)


def test_exif_rotation_swaps_size(tmp_path):
    write_rotated_jpeg(tmp_path / "rotated.jpg")
    assert decode(tmp_path / "rotated.jpg").shape == (40, 20, 3)


def test_exif_rotation_moves_pixels(tmp_path):
    write_rotated_jpeg(tmp_path / "rotated.jpg")
    pixels = decode(tmp_path / "rotated.jpg")
    assert_near(pixels[5, 10], (255, 0, 0), 16)
    assert_near(pixels[35, 10], (0, 0, 255), 16)


def test_load_image_resizes_rotated(tmp_path):
    write_rotated_jpeg(tmp_path / "rotated.jpg")
    settings = ImageSettings(
        height=8, width=4, resample=2, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
    )
    pixels = data.load_image_uint8(tmp_path / "rotated.jpg", settings)
    assert pixels.shape == (3, 8, 4)
    assert pixels[0, 1, 2].item() > 200
    assert pixels[2, 6, 2].item() > 200
