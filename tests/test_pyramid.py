import numpy as np
import pytest
import tifffile
import tiffslide

from htd_toolkit.wsi.pyramid import write_pyramidal_tiff, write_slide_region

REGION = ((300, 500), (1200, 900))  # level-0 (x, y), (w, h) of the CC0 slide


@pytest.fixture(scope="module")
def region(sample_slide):
    with tiffslide.TiffSlide(sample_slide) as slide:
        return slide.read_region(*[REGION[0], 0, REGION[1]], as_array=True)


def test_slide_region_becomes_a_pyramid_tiffslide_reads(sample_slide, region, tmp_path):
    out = write_slide_region(sample_slide, tmp_path / "region.tiff", *REGION)
    with tiffslide.TiffSlide(out) as slide:
        assert slide.level_count >= 3
        assert slide.level_dimensions[:3] == ((1200, 900), (600, 450), (300, 225))
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499, abs=1e-6)
        assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(0.499, abs=1e-6)
        # lossless by default: level 0 is the source pixels, x and y not swapped
        assert np.array_equal(slide.read_region((0, 0), 0, (1200, 900), as_array=True), region)
        patch = slide.read_region((100, 40), 0, (64, 32), as_array=True)
        assert np.array_equal(patch, region[40:72, 100:164])
        # level 2 is the 4x area average of level 0
        low = slide.read_region((0, 0), 2, (300, 225), as_array=True).astype(float)
        ref = region.reshape(225, 4, 300, 4, 3).mean(axis=(1, 3))
        assert np.abs(low - ref).mean() < 1.0


def test_tiles_and_compression_are_as_asked(region, tmp_path):
    out = write_pyramidal_tiff(tmp_path / "jpeg.tiff", region, mpp=0.25, tile=128, compression="jpeg")
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (128, 128)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert len(tif.series[0].levels) == 5  # 1200 px halved until it fits one 128-px tile
    with tiffslide.TiffSlide(out) as slide:
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        lossy = slide.read_region((0, 0), 0, (1200, 900), as_array=True).astype(int)
        assert np.abs(lossy - region).mean() < 6


def test_small_arrays_still_get_three_levels(tmp_path):
    out = write_pyramidal_tiff(tmp_path / "small.tiff", np.full((64, 80, 3), 200, np.uint8), mpp=0.5)
    with tiffslide.TiffSlide(out) as slide:
        assert slide.level_dimensions == ((80, 64), (40, 32), (20, 16))


def test_single_level_on_request(tmp_path):
    out = write_pyramidal_tiff(tmp_path / "flat.tiff", np.zeros((64, 64, 3), np.uint8), mpp=0.5, levels=1)
    with tiffslide.TiffSlide(out) as slide:
        assert slide.level_count == 1


@pytest.mark.parametrize("array, kwargs, message", [
    (np.zeros((8, 8), np.uint8), {}, "H x W x 3 uint8"),
    (np.zeros((8, 8, 3), np.float32), {}, "H x W x 3 uint8"),
    (np.zeros((8, 8, 3), np.uint8), {"tile": 100}, "multiple of 16"),
    (np.zeros((8, 8, 3), np.uint8), {"mpp": 0}, "mpp must be positive"),
])
def test_bad_input_is_refused(array, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        write_pyramidal_tiff(tmp_path / "x.tiff", array, **{"mpp": 0.5, **kwargs})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("compression", ["scanned", "jpeg", "deflate"])
def test_tile_parallel_reads_equal_tiffslide_everywhere(sample_slide, compression, tmp_path):
    """Every level, boxes inside, across edges and partly outside (left/above included): same pixels."""
    import warnings

    from htd_toolkit.wsi.slide import Slide

    path = sample_slide if compression == "scanned" else write_slide_region(
        sample_slide, tmp_path / "s.tif", compression=compression, tile=240)
    rng = np.random.default_rng(0)
    with Slide(path) as slide, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiffslide warns about out-of-bounds boxes it pads
        fast_pages = slide._tiled_pages
        assert all(page is not None for page in fast_pages)
        for level in range(len(slide.level_dimensions)):
            for _ in range(12):
                box = (int(rng.integers(-300, slide.dimensions[0])), int(rng.integers(-300, slide.dimensions[1])),
                       int(rng.integers(1, 1200)), int(rng.integers(1, 1200)))
                fast = slide.read_level(level, *box)
                slide._tiled_pages = [None] * len(fast_pages)  # tiffslide's read_region
                slow = slide.read_level(level, *box)
                slide._tiled_pages = fast_pages
                assert fast.shape == slow.shape and np.array_equal(fast, slow), (level, box)


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_openslide_sees_every_level_with_its_mpp(region, compression, tmp_path):
    """OpenSlide, the reader most pipelines use, sees the same levels, mpp and pixels as tiffslide."""
    import openslide
    out = write_pyramidal_tiff(tmp_path / "p.tiff", region, mpp=0.499, compression=compression, tile=128)
    with openslide.OpenSlide(out) as reference, tiffslide.TiffSlide(out) as slide:
        assert reference.level_count == slide.level_count == 5
        assert reference.level_dimensions == slide.level_dimensions
        assert reference.level_downsamples == pytest.approx(slide.level_downsamples)
        assert float(reference.properties["openslide.mpp-x"]) == pytest.approx(0.499, abs=1e-6)
        assert float(reference.properties["openslide.mpp-y"]) == pytest.approx(0.499, abs=1e-6)
        for level, size in enumerate(reference.level_dimensions):
            ours = slide.read_region((0, 0), level, size, as_array=True)
            assert np.array_equal(ours, np.asarray(reference.read_region((0, 0), level, size).convert("RGB"))), level
        box = (37, 211), (301, 97)
        assert np.array_equal(slide.read_region(box[0], 0, box[1], as_array=True),
                              np.asarray(reference.read_region(box[0], 0, box[1]).convert("RGB")))
