"""Reader-study kit: blinding, statistics against hand-computed cases, simulated raters, the page in a browser."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from htd_toolkit.reader_study import score as scoring
from htd_toolkit.reader_study.make import StudyOptions, make_study
from tests.helpers import run_cli

NUM = 40


@pytest.fixture(scope="module")
def real(cc0_pyramid, tmp_path_factory) -> Path:
    """Real 64-px patches of the CC0 slide (two Camelyon16-style copies), every slide in train."""
    from htd_toolkit.cli import main
    from tests.annotation_files import camelyon_slides

    root = camelyon_slides(cc0_pyramid, tmp_path_factory.mktemp("study-real"), 2)
    assert main(["prepare", "annotated", "--slides", str(root / "slides"), "--annotations", str(root / "ann"),
                 "--format", "camelyon16", "--out", str(root / "data"), "--mpp", "2.0", "--patch-size", "64",
                 "--stride", "32", "--split", "1,0,0"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def bundle(prepared, real, tiny_base_sd15, tmp_path_factory):
    """A synthetic bundle on the real patches' maps from a 2-step model (noise, but a real bundle)."""
    from htd_toolkit.cli import main
    from tests.test_training import demo_args, train

    root = tmp_path_factory.mktemp("study-model")
    assert train(demo_args(tiny_base_sd15, prepared, root / "model", "--max_train_steps", "2",
                           "--checkpointing_steps", "0", "--validation_steps", "0")) == 0
    assert main(["generate", "--model", str(root / "model"), "--maps", str(real), "--crop-bank",
                 str(real / "crop_bank"), "--num-samples", "60", "--out", str(root / "bundle"), "--batch-size", "20",
                 "--steps", "2", "--shard-size", "60"]) == 0
    return root / "bundle"


@pytest.fixture(scope="module")
def study(real, bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "study"
    make_study(StudyOptions(real=str(real), synthetic=str(bundle), out=out, num_images=NUM, show_masks=True,
                            real_split="train", seed=3))
    return out


def key_of(study: Path) -> dict:
    return json.loads((study / "key.json").read_text())


def page_of(study: Path) -> dict:
    """The study data block of index.html: what the page knows."""
    return json.loads((study / "index.html").read_text().split('type="application/json">')[1].split("</script>")[0])


def test_the_study_folder_and_its_mix(study):
    key = key_of(study)
    sources = [image["source"] for image in key["images"].values()]
    assert sources.count("real") == sources.count("synthetic") == NUM // 2
    for stratum in {image["stratum"] for image in key["images"].values()}:  # the same class mix in both sources
        counts = [image["source"] for image in key["images"].values() if image["stratum"] == stratum]
        assert counts.count("real") == counts.count("synthetic")
    page = page_of(study)
    assert page["images"] == sorted(key["images"]) and page["criteria"] == key["criteria"]
    assert sorted(p.stem for p in (study / "images").iterdir()) == sorted(key["images"])
    assert {p.name for p in study.iterdir()} == {"index.html", "images", "key.json", "README.md"}


def png_chunks(data: bytes) -> list[str]:
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunks.append(kind.decode())
        offset += 12 + length
    return chunks


def file_properties(study: Path, key: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per image: what a program can read without looking at pixels, and the truth (1 = synthetic)."""
    listed = page_of(study)["images"]
    rows, truth = [], []
    for image_id, image in key["images"].items():
        path = study / "images" / f"{image_id}.png"
        data = path.read_bytes()
        rows.append([len(data), path.stat().st_mtime, listed.index(image_id), int(image_id[:4], 16),
                     int(image_id[-4:], 16), len(png_chunks(data)), zlib.crc32("".join(png_chunks(data)).encode()),
                     *struct.unpack(">II", data[16:24])])
        truth.append(image["source"] == "synthetic")
    return np.array(rows, float), np.array(truth)


def test_nothing_but_the_pixels_tells_real_from_synthetic(study):
    """Byte size, chunks, mtime and dimensions are the same for every file; a classifier on those and on
    the names and page order does no better than chance, where the same classifier separates the sources
    from the length of the sample keys (the control: a leak a page that named files by key would have)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score

    key = key_of(study)
    features, truth = file_properties(study, key)
    assert all(len(set(features[:, column])) == 1 for column in (0, 1, 5, 6, 7, 8))
    classifier = RandomForestClassifier(n_estimators=50, random_state=0)
    blinded = cross_val_score(classifier, features, truth, cv=5).mean()
    assert blinded <= 0.65, blinded
    control = np.array([[len(image["key"])] for image in key["images"].values()], float)  # sample keys differ
    assert cross_val_score(classifier, control, truth, cv=5).mean() >= 0.95
    for path in study.rglob("*"):
        if path.is_file() and path.name != "key.json":
            text = path.read_bytes()
            assert not any(image["key"].encode() in text for image in key["images"].values()), path
            assert b"tEXt" not in text and b"eXIf" not in text and b"iTXt" not in text


def test_statistics_against_hand_computed_cases():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers, 12 units
    nan = np.nan
    data = np.array([[1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
                     [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]])
    assert scoring.krippendorff_alpha(data) == pytest.approx(0.815, abs=5e-4)
    assert scoring.krippendorff_alpha(data, "nominal") == pytest.approx(0.743, abs=5e-4)
    # Fleiss: counts (3,0) (0,3) (2,1) (1,2): P̄ = (1 + 1 + 1/3 + 1/3) / 4, P_e = 0.5, kappa = 1/3
    calls = [["real"] * 3, ["synthetic"] * 3, ["real", "real", "synthetic"], ["real", "synthetic", "synthetic"]]
    assert scoring.fleiss_kappa(calls) == pytest.approx(1 / 3)
    # 9 of 10 right: two-sided p = 2 · (C(10,9) + C(10,10)) / 2^10
    result = scoring.identification([("real", "real")] * 5 + [("synthetic", "synthetic")] * 4 + [("real", "synthetic")])
    assert result["p_value"] == pytest.approx(2 * 11 / 1024) and result["accuracy"] == 0.9
    assert result["sensitivity"] == 0.8 and result["specificity"] == 1.0
    # Mann-Whitney: every synthetic score above every real one, U = 9, exact two-sided p = 2 / C(6,3)
    compared = scoring.compare_scores([1, 2, 3], [4, 5, 6])
    assert compared["mann_whitney_u"] == 9 and compared["p_value"] == pytest.approx(0.1)
    t975 = 4.302652729749464  # Student t, 2 degrees of freedom
    assert compared["real"]["ci95"] == pytest.approx([2 - t975 / 3 ** 0.5, 2 + t975 / 3 ** 0.5])


def write_ratings(path: Path, key: dict, rater: str, call, scores, flag=lambda i: False, ids=None) -> Path:
    ratings = [{"id": i, "scores": {c: scores(i, c) for c in key["criteria"]}, "call": call(i), "confidence": 3,
                "flag": flag(i), "note": "", "seconds": 1.0} for i in (ids or sorted(key["images"]))]
    path.write_text(json.dumps({"study_id": key["study_id"], "rater": rater, "ratings": ratings}))
    return path


def test_simulated_raters_give_the_expected_statistics(study, tmp_path, capsys):
    key = key_of(study)
    truth = {i: image["source"] for i, image in key["images"].items()}
    rng = np.random.default_rng(7)
    coin = {i: ("real", "synthetic")[int(rng.integers(2))] for i in truth}

    def score_of(image_id: str, criterion: str) -> int:  # varies by image, the same for every rater
        return 1 + int(image_id[:2], 16) % 5

    files = [write_ratings(tmp_path / "right.json", key, "always right", truth.get, score_of,
                           flag=lambda i: truth[i] == "synthetic"),
             write_ratings(tmp_path / "coin.json", key, "coin", coin.get, score_of),
             write_ratings(tmp_path / "twin.json", key, "twin", truth.get, score_of,
                           flag=lambda i: truth[i] == "synthetic")]
    code, _out, err = run_cli(["reader-study", "score", str(study), *map(str, files), "--out", str(tmp_path / "r")],
                             capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    right = results["identification"]["per_rater"]["always right"]
    assert right["accuracy"] == 1.0 and right["p_value"] == pytest.approx(2 * 0.5 ** NUM)
    assert right["sensitivity"] == right["specificity"] == 1.0
    coin_result = results["identification"]["per_rater"]["coin"]
    assert coin_result["p_value"] > 0.05 and abs(coin_result["accuracy"] - 0.5) < 0.2
    assert results["hallucination_flags"]["real"]["rate"] == 0
    assert results["hallucination_flags"]["synthetic"]["rate"] == pytest.approx(2 / 3)
    for criterion in key["criteria"]:  # three raters giving identical scores agree perfectly
        assert results["criteria"][criterion]["krippendorff_alpha_ordinal"] == 1.0
    pair = scoring.score(key, [scoring.read_ratings(f, key) for f in files[::2]])
    assert pair["agreement"]["fleiss_kappa_calls"] == pytest.approx(1.0)
    assert set(results["per_class"]) == {image["stratum_name"] for image in key["images"].values()}
    for name in ("report.md", "scores.png", "accuracy.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    assert "| always right | 40 | 1.000 |" in (tmp_path / "r" / "report.md").read_text()


def test_malformed_and_partial_files_are_named_and_the_rest_scored(study, tmp_path, capsys, caplog):
    key = key_of(study)
    ids = sorted(key["images"])
    good = write_ratings(tmp_path / "partial.json", key, "partial", lambda i: "real", lambda i, c: 3, ids=ids[:7])
    (tmp_path / "broken.json").write_text('{"study_id": ')
    other = write_ratings(tmp_path / "other.json", {**key, "study_id": "0000"}, "other", lambda i: "real", lambda i, c: 3)
    bad = write_ratings(tmp_path / "seven.json", key, "seven", lambda i: "real", lambda i, c: 7)
    csv = tmp_path / "rater.csv"
    csv.write_text("study_id,rater,id," + ",".join(key["criteria"]) + ",call,confidence,flag,note,seconds\n"
                   + "".join(f"{key['study_id']},csv rater,{i}," + ",".join("4" for _ in key["criteria"])
                             + ",synthetic,5,0,\"a, note\",2.0\n" for i in ids[:5]))
    files = [good, tmp_path / "broken.json", other, bad, csv, tmp_path / "missing.json"]
    code, _, err = run_cli(["reader-study", "score", str(study), *map(str, files), "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped: ")]
    assert len(lines) == 4
    assert any("broken.json: malformed JSON" in line for line in lines)
    assert any("other.json: ratings of study '0000'" in line for line in lines)
    assert any("seven.json" in line and "7 is not a score from 1 to 5" in line for line in lines)
    assert any("missing.json: unreadable" in line for line in lines)
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["raters"] == {"partial": {"file": "partial.json", "rated": 7}, "csv rater": {"file": "rater.csv",
                                                                                               "rated": 5}}
    code, _, err = run_cli(["reader-study", "score", str(study), str(tmp_path / "broken.json")], capsys)
    assert code == 1 and "no usable ratings file" in err


def test_update_card_adds_a_reader_study_section(study, bundle, tmp_path, capsys):
    key = key_of(study)
    card_bundle = tmp_path / "bundle"
    shutil.copytree(bundle, card_bundle)
    ratings = write_ratings(tmp_path / "a.json", key, "a", lambda i: "real", lambda i, c: 4)
    code, _, err = run_cli(["reader-study", "score", str(study), str(ratings), "--out", str(tmp_path / "r"),
                            "--update-card", str(card_bundle)], capsys)
    assert code == 0, err
    card = (card_bundle / "README.md").read_text()
    assert "## Reader study" in card and "1 rater(s), 40 images" in card
    assert (card_bundle / "assets" / "reader_study_scores.png").exists()
    assert json.loads((card_bundle / "manifest.json").read_text())["reader_study"]["text"] in card


def test_make_refuses_bad_options(real, bundle, tmp_path, capsys):
    base = ["reader-study", "make", "--real", str(real), "--synthetic", str(bundle), "--real-split", "train"]
    code, _, err = run_cli([*base, "--out", str(tmp_path / "a"), "--num-images", "5000"], capsys)
    assert code == 1 and "lower --num-images" in err
    code, _, err = run_cli([*base, "--out", str(tmp_path / "b"), "--real-fraction", "1.5"], capsys)
    assert code == 1 and "--real-fraction" in err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    code, _, err = run_cli([*base, "--out", str(tmp_path / "c")], capsys)
    assert code == 1 and "not empty" in err


def browser(download_dir: Path):
    """Headless Chromium through Selenium, or a skip saying why not."""
    from selenium import webdriver
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium/chromedriver on this machine (`make test` installs Debian's chromium and "
                    "chromium-driver where it can)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_a_rater_in_a_real_browser(study, tmp_path, capsys):
    """Open index.html from disk, rate every image with the keyboard, export; score reads the export."""
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    key = key_of(study)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = browser(downloads)
    try:
        driver.get((study / "index.html").as_uri())
        driver.find_element(By.ID, "rater").send_keys("Dr Browser", Keys.ENTER)
        body = driver.find_element(By.TAG_NAME, "body")
        shown = []
        for index in range(NUM):
            shown.append(driver.find_element(By.ID, "picture").get_attribute("src").rsplit("/", 1)[1][:-4])
            body.send_keys("4", "3", "5", "2", "4", "s" if index % 2 else "r", *(["f"] if index % 5 == 0 else []))
            body.send_keys(Keys.ARROW_RIGHT)
        assert sorted(shown) == sorted(key["images"]) and shown != sorted(key["images"])  # all, shuffled
        assert f"{NUM} complete" in driver.find_element(By.ID, "progress").text
        driver.find_element(By.ID, "export-json").click()
        for _ in range(50):
            exported = list(downloads.glob("ratings-*.json"))
            if exported:
                break
            time.sleep(0.1)
        assert [p.name for p in exported] == ["ratings-Dr_Browser.json"]
        driver.refresh()  # ratings survive a reload
        driver.find_element(By.ID, "rater").send_keys(Keys.ENTER)
        assert f"{NUM} complete" in driver.find_element(By.ID, "progress").text
    finally:
        driver.quit()
    code, _, err = run_cli(["reader-study", "score", str(study), str(exported[0]), "--out", str(tmp_path / "r")],
                           capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["raters"]["Dr Browser"]["rated"] == NUM
    assert results["criteria"]["realism"]["real"]["mean"] == 4.0
    assert results["criteria"]["diagnostic-quality"]["synthetic"]["mean"] == 2.0
    flagged = results["hallucination_flags"]
    assert flagged["real"]["flagged"] + flagged["synthetic"]["flagged"] == NUM // 5


@pytest.mark.parametrize("text", ["[]", '{"images": [], "criteria": ["x"]}', '"key"'])
def test_a_key_that_is_not_a_study_key_is_one_line(study, tmp_path, capsys, text):
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    (copy / "key.json").write_text(text)
    code, _, err = run_cli(["reader-study", "score", str(copy), str(tmp_path / "none.json")], capsys)
    assert code == 1 and "key.json: not a reader-study key" in err and "Traceback" not in err, err


HOSTILE_NAMES = ["<script>alert(1)</script>", "a | b", "two\nlines", "$\\frac$ *bold* [link](x)"]


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_names_from_files_are_inert_in_the_report(study, tmp_path, capsys):
    """Rater names (the raters' files), class names (the datasets) and the study id (key.json) are text in
    report.md and the card's summary: no HTML, no Markdown, one table cell each."""
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    key = key_of(copy)
    key["study_id"] = "<img src=x onerror=alert(1)>"
    for image in key["images"].values():
        image["stratum_name"] = f"<b>{image['stratum_name']}</b> | x"
    (copy / "key.json").write_text(json.dumps(key))
    files = [write_ratings(tmp_path / f"r{n}.json", key, name, lambda i: "real", lambda i, c: 3)
             for n, name in enumerate(HOSTILE_NAMES)]
    code, _, err = run_cli(["reader-study", "score", str(copy), *map(str, files), "--out", str(tmp_path / "r")],
                           capsys)
    assert code == 0, err
    report = (tmp_path / "r" / "report.md").read_text()
    assert "<script" not in report and "<img" not in report and "<b>" not in report
    assert "&lt;script&gt;" in report
    rows = [line for line in report.splitlines() if line.startswith("|")]
    header = next(line for line in rows if line.startswith("| rater |"))
    per_rater = rows[rows.index(header) + 2:rows.index(header) + 3 + len(HOSTILE_NAMES)]
    assert len(per_rater) == len(HOSTILE_NAMES) + 1 and per_rater[-1].startswith("| **all raters (pooled)** |")
    assert all(unescaped_pipes(line) == unescaped_pipes(header) for line in per_rater)
    assert any("two lines" in line for line in per_rater)
    per_class = rows[rows.index(next(line for line in rows if line.startswith("| class |"))):]
    assert all(unescaped_pipes(line) == 6 for line in per_class)
    assert json.loads((tmp_path / "r" / "results.json").read_text())["raters"].keys() == {
        name.strip() for name in HOSTILE_NAMES}  # the data keep the names as they are


def test_a_rater_named_pooled_keeps_their_own_row(study, tmp_path, capsys):
    key = key_of(study)
    truth = {i: image["source"] for i, image in key["images"].items()}
    files = [write_ratings(tmp_path / "a.json", key, "pooled", lambda i: truth[i], lambda i, c: 3),
             write_ratings(tmp_path / "b.json", key, "b", lambda i: "real", lambda i, c: 3)]
    code, _, err = run_cli(["reader-study", "score", str(study), *map(str, files), "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    accuracy = {line.split("|")[1].strip(): line.split("|")[3].strip()
                for line in (tmp_path / "r" / "report.md").read_text().splitlines() if line.startswith("| ")}
    assert accuracy["pooled"] == "1.000" and accuracy["b"] != "1.000" and accuracy["**all raters (pooled)**"] != "1.000"


def test_the_study_page_escapes_the_title(real, bundle, tmp_path):
    """In the page's text as HTML entities; in its JSON data block with no '<' at all, so neither '</script>' nor
    '<!--<script>' (which would keep the real '</script>' from closing the block) can reach the HTML parser."""
    title = "</title><script>alert(1)</script> <!--<script> & co"
    out = tmp_path / "study"
    make_study(StudyOptions(real=str(real), synthetic=str(bundle), out=out, num_images=4, real_split="train",
                            title=title))
    page = (out / "index.html").read_text()
    assert "<script>alert(1)" not in page and "<!--" not in page
    assert "&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt; &lt;!--&lt;script&gt; &amp; co" in page
    assert page_of(out)["title"] == title  # the data block holds it as data


@pytest.mark.parametrize("rating, problem", [
    ('{"id": "ID", "scores": [1, 2]}', "image ID: scores must map criteria to scores, got [1, 2]"),
    ('{"id": ["x"], "scores": {}}', "a rating without an image id of this study ({'id': ['x'], 'scores': {}})"),
    ('{"id": "ID", "scores": {"realism": Infinity}}', "image ID: realism: inf is not a score from 1 to 5"),
    ('{"id": "ID", "scores": {"realism": 1e400}}', "image ID: realism: inf is not a score from 1 to 5"),
    ('{"id": "ID", "scores": {}, "confidence": -Infinity}', "image ID: confidence: -inf is not a score from 1 to 5"),
    ('{"id": "ID", "scores": {"realism": NaN}}', "image ID: realism: nan is not a score from 1 to 5"),
    ('{"id": {"a": 1}, "scores": {}}', "a rating without an image id of this study ({'id': {'a': 1}, 'scores': {}})"),
])
def test_hostile_ratings_are_one_line_naming_the_file(study, tmp_path, capsys, caplog, rating, problem):
    key = key_of(study)
    image = sorted(key["images"])[0]
    path = tmp_path / "hostile.json"
    path.write_text(f'{{"study_id": "{key["study_id"]}", "rater": "r", "ratings": [{rating.replace("ID", image)}]}}')
    with pytest.raises(scoring.RatingsError) as raised:
        scoring.read_ratings(path, key)
    assert str(raised.value) == f"{path}: {problem.replace('ID', image)}"
    code, _, err = run_cli(["reader-study", "score", str(study), str(path), "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "no usable ratings file" in err and err.count("\n") == 1
    assert [r.getMessage() for r in caplog.records] == [f"skipped: {raised.value}"]


def test_score_refuses_an_out_that_is_a_file(study, tmp_path, capsys):
    ratings = write_ratings(tmp_path / "a.json", key_of(study), "a", lambda i: "real", lambda i, c: 4)
    (tmp_path / "report.md").write_text("my notes")
    code, _, err = run_cli(["reader-study", "score", str(study), str(ratings), "--out", str(tmp_path / "report.md")],
                           capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'report.md'}: exists and is not a folder; --out names a folder" in err
    assert (tmp_path / "report.md").read_text() == "my notes"
