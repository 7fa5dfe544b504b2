"""Decoding at the size the network needs: a drafted JPEG against a full decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.decode import decode_image, may_draft, resized_size
from pipeline.data.images import ImageFiles, load_image_set, read_image
from pipeline.models.preprocessing import Preprocessing

RECIPE = Preprocessing(resize=64, crop=56, mean=(0.5,) * 3, std=(0.5,) * 3,
                       interpolation="bicubic")
# Mean and largest absolute difference on 0-255 of the recipe's crop, drafted against full.
# Measured on these photo-like pictures: means 0.16 to 0.27, largest 2 to 4 (on edges, where
# the scaled inverse DCT and the bicubic filter disagree most); docs/data.md has real photos
# (means 0.13 to 0.81, largest up to 20 on fine sand ripples). The tolerances: about four
# times the largest mean here, three times the largest difference.
MEAN_TOLERANCE, MAX_TOLERANCE = 1.0, 12


def photo(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth shading, texture, hard-edged shapes: what a photo's blocks hold."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    pixels = np.stack([120 + 90 * np.sin(x / (w / 5) + c) * np.cos(y / (h / 4) - c)
                       for c in range(3)], -1)
    pixels += rng.normal(0, 6, pixels.shape)
    for _ in range(6):
        x0, y0 = rng.integers(0, w * 3 // 4), rng.integers(0, h * 3 // 4)
        pixels[y0:y0 + h // 6, x0:x0 + w // 7] = rng.integers(0, 256, 3)
    return pixels.clip(0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    image = image if mode == "RGB" else image.convert(mode)
    image.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def crop(source, mode: str, recipe: Preprocessing = RECIPE) -> torch.Tensor:
    """The network's 8-bit input: decoded as ``mode`` says, then the recipe's transform."""
    image = decode_image(source, resize=recipe.resize, interpolation=recipe.interpolation,
                         mode=mode)
    return recipe.transform(normalize=False)(image)


def difference(data, recipe: Preprocessing = RECIPE) -> tuple[float, float]:
    diff = (crop(data, "draft", recipe).float() - crop(data, "exact", recipe).float()).abs()
    return diff.mean().item(), diff.max().item()


@pytest.mark.parametrize("size", [(1024, 768), (1001, 757), (600, 1100), (2000, 300)])
def test_a_drafted_jpeg_is_within_a_pixel_level_of_the_full_decode(size):
    data = jpeg(photo(size))
    drafted = decode_image(data, resize=RECIPE.resize, interpolation="bicubic")
    assert drafted.size == resized_size(size, RECIPE.resize)  # the recipe's resize, done here
    mean, largest = difference(data)
    assert mean < MEAN_TOLERANCE and largest < MAX_TOLERANCE


def test_the_draft_scales_down_to_twice_the_resize_and_no_further():
    data = jpeg(photo((1024, 768)))
    seen = []
    original = Image.Image.resize

    def spy(self, size, resample=None, box=None, reducing_gap=None):
        seen.append((self.size, box))
        return original(self, size, resample, box, reducing_gap)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "resize", spy)
        decode_image(data, resize=64, interpolation="bicubic")  # 768 / 8 = 96 < 128: 1/4
        decode_image(data, resize=48, interpolation="bicubic")  # 768 / 8 = 96 = 2 x 48: 1/8
    assert seen == [((256, 192), (0, 0, 256, 192)), ((128, 96), (0, 0, 128, 96))]


def test_a_side_not_a_multiple_of_the_scale_keeps_the_original_geometry():
    """1001 px at 1/4 is 250.25 px of picture in a 251 px image: the resize takes that box,
    so an edge lands where the full decode puts it."""
    pixels = np.zeros((757, 1001, 3), np.uint8)
    pixels[:, 700:] = 255  # a vertical edge at 70% of the width
    data = jpeg(pixels)
    # The edge's sub-pixel place in the crop: its width less the white in a row. Scaling the
    # whole 251 px instead would move it by a quarter of a pixel.
    edge = [56 - x[0].float().mean(0).sum().item() / 255 for x in (crop(data, "exact"),
                                                                  crop(data, "draft"))]
    assert edge[0] == pytest.approx(edge[1], abs=0.05)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpegs_come_out_the_same_way_up_in_both_modes(orientation):
    pixels = photo((1024, 768), seed=orientation)
    pixels[:200, :200] = (255, 0, 0)  # a red corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(pixels, exif=exif.tobytes())
    exact = decode_image(data, mode="exact")
    draft = decode_image(data, resize=RECIPE.resize, interpolation="bicubic")
    turned = orientation in (6, 8)
    assert exact.size == ((768, 1024) if turned else (1024, 768))
    assert draft.size == resized_size(exact.size, RECIPE.resize)
    small_exact = np.asarray(exact.resize(draft.size, Image.Resampling.BICUBIC), np.float32)
    red = [np.unravel_index(np.argmax(a[..., 0] - a[..., 1]), a.shape[:2])
           for a in (small_exact, np.asarray(draft, np.float32))]
    assert abs(red[0][0] - red[1][0]) <= 2 and abs(red[0][1] - red[1][1]) <= 2
    assert difference(data)[0] < MEAN_TOLERANCE


@pytest.mark.parametrize("kind", ["progressive", "greyscale", "cmyk", "subsampling-444"])
def test_progressive_greyscale_and_cmyk_jpegs_draft_too(kind):
    pixels = photo((1024, 768), seed=3)
    data = {"progressive": lambda: jpeg(pixels, progressive=True),
            "greyscale": lambda: jpeg(pixels, "L"),
            "cmyk": lambda: jpeg(pixels, "CMYK"),
            "subsampling-444": lambda: jpeg(pixels, subsampling=0)}[kind]()
    drafted = decode_image(data, resize=RECIPE.resize, interpolation="bicubic")
    assert drafted.mode == "RGB" and drafted.size == resized_size((1024, 768), RECIPE.resize)
    mean, largest = difference(data)
    assert mean < MEAN_TOLERANCE and largest < MAX_TOLERANCE


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_other_formats_decode_identically_in_both_modes(fmt):
    buf = io.BytesIO()
    Image.fromarray(photo((1024, 768))).save(buf, fmt)
    data = buf.getvalue()
    draft = decode_image(data, resize=RECIPE.resize, mode="draft")
    assert draft.size == (1024, 768)  # every pixel, as before: the recipe resizes it
    assert np.array_equal(np.asarray(draft), np.asarray(decode_image(data, mode="exact")))


def test_a_small_jpeg_is_not_drafted():
    data = jpeg(photo((200, 150)))  # 150 // 128 = 1: no scale of 1/2 keeps twice 64
    draft = decode_image(data, resize=RECIPE.resize)
    assert np.array_equal(np.asarray(draft), np.asarray(decode_image(data, mode="exact")))


def test_paths_bytes_and_file_objects_decode_alike(tmp_path):
    data = jpeg(photo((1024, 768)))
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    args = {"resize": RECIPE.resize, "interpolation": "bicubic"}
    results = [decode_image(s, **args) for s in (path, str(path), data, bytearray(data),
                                                  io.BytesIO(data))]
    for other in results[1:]:
        assert np.array_equal(np.asarray(results[0]), np.asarray(other))
    with open(path, "rb") as fh:
        assert np.array_equal(np.asarray(decode_image(fh, **args)), np.asarray(results[0]))
    image, digest = read_image(path, resize=RECIPE.resize, interpolation="bicubic",
                               decode="draft")
    assert np.array_equal(np.asarray(image), np.asarray(results[0])) and len(digest) == 64


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="draft, exact"):
        decode_image(jpeg(photo((64, 64))), mode="fast")


def test_a_truncated_jpeg_is_unreadable_in_draft_mode_as_before(tmp_path):
    data = jpeg(photo((1024, 768)))
    for name in ("a/whole.jpg", "a/cut.jpg", "b/whole.jpg", "b/cut.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data[: len(data) // 2] if "cut" in name else data)
    images = load_image_set(tmp_path, (1.0, 0.0, 0.0))
    for decode in ("draft", "exact"):
        files = ImageFiles(images, RECIPE.transform(normalize=False), (3, 56, 56),
                           dtype="uint8", recipe=RECIPE, decode=decode)
        errors = {images.paths[i]: files[i][2] for i in range(len(images))}
        assert errors["a/whole.jpg"] == "" and "truncated" in errors["a/cut.jpg"]


def test_may_draft_reads_extensions():
    assert not may_draft(["a.png", "b/c.webp", "d.PNG"])
    assert may_draft(["a.png", "b.JPG"]) and may_draft(["x.jpeg"]) and may_draft(["y.mpo"])
    assert may_draft(["rows.parquet#3"])  # not a registered image: may be a JPEG's bytes
