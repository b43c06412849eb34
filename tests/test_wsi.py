"""stlib.io.wsi: lazy region reads of pyramidal TIFFs, writing them, errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from stlib.io.wsi import open_wsi, write_pyramidal_tiff
from stlib.utils import InputError


@pytest.fixture()
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:420]
    img = np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    img[100:140, 200:260] = rng.integers(0, 255, (40, 60, 3))
    return img


def test_lossless_pyramid_region_equals_crop(tmp_path, image):
    p = write_pyramidal_tiff(tmp_path / "s.tif", image, um_per_px=0.2737, tile=64, min_size=64, compression="zlib")
    with open_wsi(p) as w:
        assert w.shape == (300, 420)
        assert w.level_count == 3  # 300x420 -> 150x210 -> 75x105 (next would be < 64)
        assert w.level_shapes[1] == (150, 210)
        assert w.level_downsamples[:2] == [1.0, 2.0]
        assert w.um_per_px == pytest.approx(0.2737, rel=1e-6)
        reg = w.read_region(37, 81, 150, 90)
        np.testing.assert_array_equal(reg, image[81:171, 37:187])
        # OpenSlide convention: x, y in level-0 px, size in level px
        low = w.read_region(40, 20, 50, 30, level=1)
        assert low.shape == (30, 50, 3)
        np.testing.assert_array_equal(low, w.read_level(1)[10:40, 20:70])
        # out of bounds is white
        edge = w.read_region(400, 290, 40, 20)
        assert edge.shape == (20, 40, 3)
        np.testing.assert_array_equal(edge[:10, :20], image[290:300, 400:420])
        assert (edge[10:] == 255).all() and (edge[:, 20:] == 255).all()
        assert (w.read_region(-50, -50, 10, 10) == 255).all()


def test_jpeg_pyramid_is_read_as_levels_and_close(tmp_path, image):
    p = write_pyramidal_tiff(tmp_path / "s.tif", image, um_per_px=0.5, tile=128, min_size=100, quality=95)
    with tifffile.TiffFile(p) as tf:
        assert len(tf.series[0].levels) == 3  # longer sides 420, 210, 105 (>= 100)
        assert tf.pages[0].is_tiled
    with open_wsi(p) as w:
        full = w.read_region(0, 0, 420, 300)
        assert np.abs(full.astype(int) - image.astype(int)).mean() < 6
        th = w.thumbnail(max_px=100)
        assert max(th.shape[:2]) == 100 and th.dtype == np.uint8


def test_ome_and_png_and_given_um(tmp_path, image):
    p = write_pyramidal_tiff(tmp_path / "s.ome.tif", image, um_per_px=0.25, tile=64, min_size=64, ome=True,
                             compression="zlib")
    with open_wsi(p) as w:
        assert w.um_per_px == pytest.approx(0.25)
        np.testing.assert_array_equal(w.read_region(0, 0, 420, 300), image)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "s.png")
    with open_wsi(tmp_path / "s.png", um_per_px=0.3) as w:
        assert w.um_per_px == 0.3 and w.level_count == 1
        np.testing.assert_array_equal(w.read_region(5, 6, 7, 8), image[6:14, 5:12])
    # plain (untiled) TIFF without resolution
    tifffile.imwrite(tmp_path / "plain.tif", image)
    with open_wsi(tmp_path / "plain.tif") as w:
        assert w.um_per_px is None
        np.testing.assert_array_equal(w.read_region(10, 10, 30, 20), image[10:30, 10:40])


def test_truncated_missing_and_garbage_files_raise_inputerror(tmp_path, image):
    p = write_pyramidal_tiff(tmp_path / "s.tif", image, um_per_px=0.25, tile=64, min_size=64, compression="zlib")
    data = p.read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.tif"):
        open_wsi(bad)
    with pytest.raises(InputError, match="nothere.tif"):
        open_wsi(tmp_path / "nothere.tif")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputError, match="junk.tif"):
        open_wsi(junk)


def test_writer_validates(tmp_path, image):
    with pytest.raises(ValueError):
        write_pyramidal_tiff(tmp_path / "x.tif", image[..., 0], um_per_px=0.25)
    with pytest.raises(ValueError):
        write_pyramidal_tiff(tmp_path / "x.tif", image, um_per_px=0.25, tile=100)
    assert not (tmp_path / "x.tif").exists()
