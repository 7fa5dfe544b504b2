import numpy as np
from PIL import Image, JpegImagePlugin

from pipeline.report.tiles import thumbnail, tile_sheet

SHEET = {"columns": 3, "size": 40, "tile_inches": (2.0, 2.0), "caption_size": 7,
         "empty": "nothing here"}


def test_a_thumbnail_shrinks_the_longer_side_and_keeps_the_shape(tmp_path):
    Image.new("RGB", (200, 100), (10, 20, 30)).save(tmp_path / "wide.png")
    pixels = thumbnail(tmp_path / "wide.png", 40)
    assert pixels.shape == (20, 40, 3)
    assert tuple(pixels[0, 0]) == (10, 20, 30)


def test_a_gray_image_becomes_rgb_and_an_unreadable_one_none(tmp_path):
    Image.new("L", (28, 28), 90).save(tmp_path / "gray.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert thumbnail(tmp_path / "gray.png", 40).shape[-1] == 3
    assert thumbnail(tmp_path / "broken.png", 40) is None
    assert thumbnail(tmp_path / "missing.png", 40) is None


def test_the_sheet_wraps_rows_and_captions_each_tile_in_order(tmp_path):
    for i in range(5):
        Image.new("RGB", (30, 30), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    fig = tile_sheet([f"{i}.png" for i in range(5)], [f"c{i}" for i in range(5)], tmp_path,
                     "five", **SHEET)
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6  # two rows of three, the last tile blank
    assert [ax.get_title() for ax in tiles] == [f"c{i}" for i in range(5)]
    assert [int(np.asarray(ax.images[0].get_array())[0, 0, 0]) for ax in tiles] == [
        0, 40, 80, 120, 160]
    assert fig.get_suptitle() == "five"


def test_an_empty_sheet_says_so(tmp_path):
    fig = tile_sheet([], [], tmp_path, "none", **SHEET)
    assert [t.get_text() for t in fig.axes[0].texts] == ["nothing here"]


def test_a_large_rotated_jpeg_is_drafted_and_shown_the_way_up_extraction_sees_it(tmp_path,
                                                                                monkeypatch):
    pixels = np.zeros((1200, 1600, 3), np.uint8)
    pixels[:300, :400] = (255, 0, 0)  # red at the stored image's top left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: turned 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=90, exif=exif.tobytes())
    scaled = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafted = original(self, mode, size)
        scaled.append(self.size)
        return drafted

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    tile = thumbnail(tmp_path / "photo.jpg", 40)
    assert scaled == [(200, 150)]  # decoded at 1/8, not every pixel
    assert tile.shape == (40, 30, 3)  # portrait once turned
    red = tile[..., 0].astype(int) - tile[..., 1]
    assert red[:5, -5:].mean() > 150 and red[-5:, :5].mean() < 50  # now at the top right
