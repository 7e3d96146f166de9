"""The heterogeneity rule pinned at its boundaries (docs/formats.md): fractions of tissue, not of the patch."""

import warnings

import numpy as np
import pytest

from htd_toolkit.data.labels import class_counts
from htd_toolkit.patches.extract import ExtractConfig
from htd_toolkit.patches.heterogeneity import HeterogeneityRule


def verdict(rule: HeterogeneityRule, background: int, *tissue: int) -> str | None:
    counts = np.array([background, *tissue])
    return rule.reject_reason(counts, int(counts.sum()))


def test_the_defaults_are_the_papers_rule():
    config = ExtractConfig(format="camelyon16")
    assert config.rule == HeterogeneityRule(0.2, 0.8, 0.5) == HeterogeneityRule()


@pytest.mark.parametrize("minor, expected", [(190, "single_class"), (200, None), (210, None)])
def test_minor_class_at_twenty_percent_of_tissue(minor, expected):
    assert verdict(HeterogeneityRule(), 0, minor, 1000 - minor) == expected


@pytest.mark.parametrize("major, expected", [(790, None), (800, None), (810, "dominant_class"), (900, "dominant_class")])
def test_dominant_class_at_eighty_percent_of_tissue(major, expected):
    """With min_fraction 0.2 two classes ≥ 0.2 leave the dominant ≤ 0.8, so the dominant test is pinned
    with a lower min_fraction, where it alone decides."""
    assert verdict(HeterogeneityRule(min_fraction=0.05), 0, 1000 - major, major) == expected


def test_fractions_are_of_tissue_not_of_the_patch():
    """Half the patch is background: 100 + 400 tissue pixels are 20 % / 80 % of the tissue (accepted),
    though the minor class is 10 % of the patch."""
    rule = HeterogeneityRule(min_tissue=0.4)
    assert verdict(rule, 500, 100, 400) is None
    assert verdict(rule, 500, 95, 405) == "single_class"
    assert verdict(HeterogeneityRule(min_fraction=0.05, min_tissue=0.4), 500, 90, 410) == "dominant_class"


@pytest.mark.parametrize("background, expected", [(490, None), (500, None), (510, "low_tissue")])
def test_tissue_share_at_half_the_patch(background, expected):
    tissue = 1000 - background
    assert verdict(HeterogeneityRule(), background, tissue // 2, tissue - tissue // 2) == expected


def test_no_tissue_with_min_tissue_zero_is_low_tissue_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verdict(HeterogeneityRule(min_tissue=0), 1000, 0, 0) == "low_tissue"


def test_class_counts_skip_the_ignore_value():
    labels = np.array([[0, 1, 2], [255, 2, 2]], np.uint8)
    assert class_counts(labels, 3).tolist() == [1, 1, 3]
