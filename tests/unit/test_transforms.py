import numpy as np
import pytest
import torch
from PIL import Image

from genmodels.data.transforms import resize_center_crop, to_channels, to_float


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    out = to_channels(Image.fromarray(values), 1)
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[0, 128, 255]]


def test_alpha_is_composited_over_black():
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # opaque white stays white
    rgba[0, 1] = (255, 255, 255, 0)  # transparent white becomes background
    out = to_channels(Image.fromarray(rgba, "RGBA"), 1)
    assert np.asarray(out).tolist() == [[255, 0]]


@pytest.mark.parametrize("mode", ["P", "CMYK", "1", "LA", "YCbCr", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_common_mode_ends_as_8bit_l_or_rgb(mode, channels):
    img = Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).convert(mode)
    out = to_channels(img, channels)
    assert out.mode == ("L" if channels == 1 else "RGB")
    assert out.size == (4, 4)


def test_palette_transparency_is_honoured():
    img = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    img.putpalette([255, 255, 255, 255, 255, 255])
    img.info["transparency"] = 1
    assert np.asarray(to_channels(img, 1)).tolist() == [[255, 0]]


@pytest.mark.parametrize(("size", "target"), [((40, 20), 16), ((20, 40), 16), ((8, 8), 28), ((28, 28), 28), ((33, 31), 32)])
def test_resize_center_crop_gives_exact_square(size, target):
    img = Image.new("L", size)
    assert resize_center_crop(img, target).size == (target, target)


def test_center_crop_keeps_the_center():
    pixels = np.zeros((10, 30), dtype=np.uint8)
    pixels[:, 10:20] = 255  # bright middle third of a wide image
    out = np.asarray(resize_center_crop(Image.fromarray(pixels), 10))
    assert out.min() > 200


def test_to_float_maps_uint8_to_unit_interval():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    y = to_float(x)
    assert y.dtype == torch.float32
    assert y[0] == -1.0 and y[1] == 1.0 and abs(y[2].item() - 0.0039) < 1e-3
