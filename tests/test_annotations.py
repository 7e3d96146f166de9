"""Rasterisers: exact pixels for known polygons, class semantics and bad files of each format."""

import re

import numpy as np
import pytest
import tiffslide

from htd_toolkit.annotations import FORMATS, AnnotationError
from htd_toolkit.annotations.base import rasterize
from htd_toolkit.annotations.geojson import GeoJSONAnnotations, discover_classes
from htd_toolkit.errors import UserError
from tests.annotation_files import closed, feature, write_camelyon16, write_geojson, write_panda_mask

SQUARE = np.array([(10, 20), (50, 20), (50, 60), (10, 60)], float)  # x 10..50, y 20..60
HOLE = np.array([(20, 30), (30, 30), (30, 40), (20, 40)], float)


def test_square_with_hole_is_exact_at_full_and_half_resolution():
    mask = rasterize([(SQUARE, [HOLE])], (0, 0, 100, 80), 100, 80)
    expected = np.zeros((80, 100), bool)
    expected[20:60, 10:50] = True
    expected[30:40, 20:30] = False
    assert np.array_equal(mask, expected)
    half = rasterize([(SQUARE, [HOLE])], (0, 0, 100, 80), 50, 40)
    assert np.array_equal(half, expected[::2, ::2])


def test_polygon_crossing_the_box_border_is_clipped():
    box = (30, 40, 40, 40)  # x 30..70, y 40..80: the square's lower-right part lies inside
    mask = rasterize([(SQUARE, [])], box, 40, 40)
    expected = np.zeros((40, 40), bool)
    expected[0:20, 0:20] = True
    assert np.array_equal(mask, expected)
    beyond = np.array([(-500, -500), (60, -500), (60, 25), (-500, 25)], float)  # past the slide's top-left
    assert rasterize([(beyond, [])], (0, 0, 100, 80), 100, 80).sum() == 60 * 25


def test_x_and_y_are_not_swapped():
    wide = np.array([(0, 0), (40, 0), (40, 10), (0, 10)], float)
    mask = rasterize([(wide, [])], (0, 0, 50, 50), 50, 50)
    assert mask[:10, :40].all() and mask.sum() == 400


def test_camelyon16_groups(tmp_path):
    path = write_camelyon16(tmp_path, "tumor_001", [("Tumor", SQUARE.tolist()), ("_2", HOLE.tolist()),
                                                    ("_1", [(70, 0), (80, 0), (80, 10), (70, 10)]),
                                                    ("Exclusion", [(72, 2), (74, 2), (74, 4), (72, 4)])])
    source = FORMATS["camelyon16"](path, (100, 80))
    tissue = np.zeros((80, 100), bool)
    tissue[:, :60] = True
    labels = source.label_box((0, 0, 100, 80), 100, 80, tissue)
    assert labels[25, 15] == 2 and labels[35, 25] == 1  # tumour, and the _2 hole is normal tissue
    assert labels[5, 5] == 1 and labels[5, 65] == 0  # tissue outside tumour, background
    assert labels[5, 75] == 2 and labels[3, 73] == 0  # _1 is tumour, Exclusion is cut out (no tissue there)
    assert [c.name for c in source.classes] == ["background", "normal", "tumor"]


@pytest.mark.parametrize("text, message", [
    ("<ASAP_Annotations><Annotations><Annotation", "malformed ASAP XML"),
    ("<Other/>", "not an ASAP annotation file"),
])
def test_camelyon16_malformed(tmp_path, text, message):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=f"bad.xml: {message}"):
        FORMATS["camelyon16"](path, (100, 100))


def test_camelyon16_unknown_group_names_the_class(tmp_path):
    path = write_camelyon16(tmp_path, "t", [("Metastasis??", SQUARE.tolist())])
    with pytest.raises(AnnotationError, match=r"t.xml: unknown class name 'Metastasis\?\?'"):
        FORMATS["camelyon16"](path, (100, 100))


def test_geojson_classes_first_seen_holes_and_colours(tmp_path):
    a = write_geojson(tmp_path, "a", [feature("Tumor", [closed(SQUARE), closed(HOLE)], color=[200, 0, 0]),
                                      feature(None, [closed(HOLE)])])
    b = write_geojson(tmp_path, "b", [feature("Stroma", [closed(HOLE)]), feature("Tumor", [closed(HOLE)])])
    classes = discover_classes([b, a])  # files in sorted order: a first
    assert [(c.index, c.name) for c in classes] == [(0, "background"), (1, "Tumor"), (2, "Stroma")]
    assert classes[1].color == "#c80000"
    labels = GeoJSONAnnotations(a, classes=classes).label_box((0, 0, 100, 80), 100, 80)
    assert (labels == 1).sum() == 40 * 40 - 10 * 10 and labels[35, 25] == 0


@pytest.mark.parametrize("color", [["a", "b", "c"], [300, -5, 0], [float("nan"), 0, 0], [1e300, 0, 0], {"r": 1}])
def test_geojson_colours_that_are_not_rgb_are_ignored(tmp_path, color):
    """A malformed colour was a ValueError traceback or a colour string like '#12c-500' in the manifest."""
    path = write_geojson(tmp_path, "c", [feature("Tumor", [closed(SQUARE)], color=color)])
    classes = discover_classes([path])
    assert classes[1].name == "Tumor" and classes[1].color != "#12c-500"
    assert re.fullmatch(r"#[0-9a-f]{6}", classes[1].color), classes[1].color  # the default palette's


def test_geojson_unknown_class_with_pinned_list(tmp_path):
    from htd_toolkit.classes import classes_from_names

    path = write_geojson(tmp_path, "s", [feature("Necrosis", [closed(SQUARE)])])
    with pytest.raises(AnnotationError, match=r"s.geojson: unknown class name 'Necrosis' \(known: Tumor, Stroma\)"):
        GeoJSONAnnotations(path, classes=classes_from_names(["Tumor", "Stroma"]))


def test_geojson_malformed(tmp_path):
    path = tmp_path / "m.geojson"
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match=r"m\.geojson: malformed GeoJSON"):
        GeoJSONAnnotations(path)


def test_panda_mask_red_channel_nearest_and_size_check(tmp_path):
    labels = np.zeros((256, 384), np.uint8)
    labels[:, 100:200] = 3
    labels[50:60, 300:310] = 5
    path = write_panda_mask(tmp_path / "x_mask.tiff", labels)
    with tiffslide.TiffSlide(path) as mask:
        assert mask.level_count == 3
    source = FORMATS["panda-radboud"](path, (384, 256))
    assert np.array_equal(source.label_box((0, 0, 384, 256), 384, 256), labels)
    coarse = source.label_box((0, 0, 384, 256), 96, 64)  # read from a nearest-neighbour level: no blends
    assert set(np.unique(coarse)) <= {0, 3, 5}
    with pytest.raises(AnnotationError, match=r"x_mask\.tiff: mask value 5 is not a panda-karolinska class"):
        FORMATS["panda-karolinska"](path, (384, 256)).label_box((0, 0, 384, 256), 384, 256)
    with pytest.raises(AnnotationError, match=r"x_mask.tiff: mask is 384x256 but its slide is 400x256"):
        FORMATS["panda-radboud"](path, (400, 256))


def test_geojson_multipolygon_and_bare_feature_list(tmp_path):
    import json

    second = SQUARE.copy()
    second[:, 0] += 45  # x 55..95
    feature = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
               "geometry": {"type": "MultiPolygon", "coordinates": [[closed(SQUARE)], [closed(second)]]}}
    path = tmp_path / "multi.geojson"
    path.write_text(json.dumps([feature]))  # QuPath can export a bare list of features
    labels = GeoJSONAnnotations(path).label_box((0, 0, 100, 80), 100, 80)
    assert (labels == 1).sum() == 2 * 40 * 40 and labels[30, 60] == 1 and labels[30, 52] == 0


def test_scanline_rasteriser_draws_the_pixels_skimage_draws():
    """Random polygons: generic, on the half-pixel grid and on integer points (ties with pixel centres)."""
    from skimage.draw import polygon as draw_polygon

    from htd_toolkit.annotations.base import polygon_mask

    rng = np.random.default_rng(0)
    for trial in range(600):
        n, h, w = int(rng.integers(3, 40)), int(rng.integers(1, 50)), int(rng.integers(1, 50))
        if trial % 3 == 0:
            rows, cols = rng.uniform(-20, h + 20, n), rng.uniform(-20, w + 20, n)
        elif trial % 3 == 1:
            rows, cols = rng.integers(-10, h + 10, n) - 0.5, rng.integers(-10, w + 10, n) - 0.5
        else:
            rows, cols = rng.integers(-10, h + 10, n) * 0.5, rng.integers(-10, w + 10, n) * 0.5
        expected = np.zeros((h, w), bool)
        expected[draw_polygon(rows, cols, shape=(h, w))] = True
        assert np.array_equal(polygon_mask(rows, cols, h, w), expected), trial


# Real-file variants, recreated: renamed Camelyon16 groups and splines, QuPath 0.2-0.4 GeoJSON quirks.

def test_renamed_camelyon16_groups_take_a_role_from_the_class_map(tmp_path):
    groups = [("metastasis", SQUARE.tolist()), ("negative", HOLE.tolist())]
    path = write_camelyon16(tmp_path, "tumor_009", groups)
    with pytest.raises(AnnotationError, match=r"unknown class name 'metastasis'.*--class-map metastasis=tumor"):
        FORMATS["camelyon16"](path, (100, 80))
    source = FORMATS["camelyon16"](path, (100, 80), class_map={"metastasis": "tumor", "negative": "exclude"})
    labels = source.label_box((0, 0, 100, 80), 100, 80, np.ones((80, 100), bool))
    reference = FORMATS["camelyon16"](write_camelyon16(tmp_path, "ref", [("Tumor", SQUARE.tolist()),
                                                                         ("_2", HOLE.tolist())]), (100, 80))
    assert np.array_equal(labels, reference.label_box((0, 0, 100, 80), 100, 80, np.ones((80, 100), bool)))
    assert labels[25, 15] == 2 and labels[35, 25] == 1
    with pytest.raises(UserError, match="'lesion' is not a camelyon16 class"):
        FORMATS["camelyon16"](path, (100, 80), class_map={"metastasis": "lesion"})


def test_camelyon16_splines_are_drawn_through_their_control_points(tmp_path):
    from tests.annotation_files import asap_xml

    (tmp_path / "s.xml").write_text(asap_xml([("Tumor", SQUARE.tolist())], kind="Spline"))
    labels = FORMATS["camelyon16"](tmp_path / "s.xml", (100, 80)).label_box((0, 0, 100, 80), 100, 80)
    assert np.array_equal(labels == 2, rasterize([(SQUARE, [])], (0, 0, 100, 80), 100, 80))


def test_class_map_parses_and_refuses_malformed_items():
    from htd_toolkit.annotations.base import parse_class_map

    assert parse_class_map("Metastasis=tumor, negative = exclude,") == (("metastasis", "tumor"), ("negative", "exclude"))
    for bad in ("tumor", "=tumor", "a="):
        with pytest.raises(UserError, match="is not GROUP=CLASS"):
            parse_class_map(bad)


def qupath_feature(classification, rings, object_type="annotation", legacy_id=None, geometry="Polygon"):
    """A feature as a QuPath version writes it: 0.3+ puts objectType in properties, 0.2 names the object
    type in the feature id and colours classes with a signed ARGB int (colorRGB)."""
    props = {"classification": classification}
    if legacy_id is None:
        props["objectType"] = object_type
    out = {"type": "Feature", "geometry": {"type": geometry, "coordinates": rings}, "properties": props}
    if legacy_id is not None:
        out["id"] = legacy_id
    return out


def test_qupath_exports_of_every_version(tmp_path):
    square, hole = closed(SQUARE.tolist()), closed(HOLE.tolist())
    cell = closed([(60, 10), (70, 10), (70, 20), (60, 20)])
    features = [
        qupath_feature({"name": "Tumor", "colorRGB": -3670016}, [square], legacy_id="PathAnnotationObject"),  # 0.2
        qupath_feature("{'name': 'Stroma', 'color': [0, 150, 0]}", [hole]),  # a str()-ed dict
        qupath_feature({"name": "Lymphocyte"}, [cell], object_type="cell"),  # 0.4 cell: not a region
        qupath_feature({"name": "Tumor"}, [cell], legacy_id="PathDetectionObject"),  # 0.2 detection
        qupath_feature({"name": "Necrosis"}, [65, 70], geometry="Point"),  # a class with points only
    ]
    path = write_geojson(tmp_path, "s", features)
    classes = discover_classes([path])
    assert [(c.name, c.color) for c in classes[1:]] == [("Tumor", "#c80000"), ("Stroma", "#009600")]
    labels = GeoJSONAnnotations(path, classes=classes).label_box((0, 0, 100, 80), 100, 80)
    assert labels[25, 15] == 1 and labels[35, 25] == 2 and labels[15, 65] == 0
    with_cells = discover_classes([path], include_detections=True)
    assert [c.name for c in with_cells[1:]] == ["Tumor", "Stroma", "Lymphocyte"]
    cells = GeoJSONAnnotations(path, classes=with_cells, include_detections=True)
    assert cells.label_box((0, 0, 100, 80), 100, 80)[15, 65] == 3  # the cell, drawn over the detection
    merged = discover_classes([path], class_map={"stroma": "exclude", "tumor": "Cancer"})
    assert [c.name for c in merged[1:]] == ["Cancer"]
    labels = GeoJSONAnnotations(path, classes=merged, class_map={"stroma": "exclude", "tumor": "Cancer"}
                                ).label_box((0, 0, 100, 80), 100, 80)
    assert labels[25, 15] == 1 and labels[35, 25] == 1  # the stroma hole is no longer drawn over the tumour


def test_panda_class_map_merges_and_drops_classes(tmp_path):
    labels = np.zeros((80, 100), np.uint8)
    labels[:, :20], labels[:, 20:40], labels[:, 40:60] = 1, 4, 5
    path = write_panda_mask(tmp_path / "p_mask.tiff", labels)
    source = FORMATS["panda-radboud"](path, (100, 80), class_map={"gleason 5": "gleason 4", "1": "exclude"})
    out = source.label_box((0, 0, 100, 80), 100, 80)
    assert (out[:, :20] == 0).all() and (out[:, 20:60] == 4).all()
    source.close()
    with pytest.raises(UserError, match="'gleason 6' is not a panda-radboud class name or mask value"):
        FORMATS["panda-radboud"](path, (100, 80), class_map={"gleason 6": "gleason 4"})
