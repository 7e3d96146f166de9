"""`htd-toolkit reader-study score`: raters' exported files + key.json → report.md, results.json, plots.

Statistics come from scipy (binomial test, t intervals, Mann–Whitney U), krippendorff (ordinal alpha)
and statsmodels (Fleiss' kappa); this module only arranges the data for them. Ratings files come from
raters and the key's names from datasets: a file that cannot be used is one line naming it, and every
name written into report.md (or a plot) is inert text there.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from htd_toolkit.data.folder import write_manifest
from htd_toolkit.data.outputs import writable_folder
from htd_toolkit.errors import UserError
from htd_toolkit.files import write_atomic

logger = logging.getLogger(__name__)
CHANCE = 0.5  # a coin flip's accuracy at telling real from synthetic
CALLS = ("real", "synthetic")
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~#$])")  # what Markdown (or a table cell, or math) would read


@dataclass
class Rating:
    id: str
    scores: dict[str, int] = field(default_factory=dict)
    call: str | None = None
    confidence: int | None = None
    flag: bool = False
    note: str = ""


@dataclass
class Rater:
    name: str
    path: Path
    ratings: dict[str, Rating]


class RatingsError(UserError):
    """A ratings file that cannot be used; the message names the file."""


def read_key(study: Path) -> dict:
    path = Path(study) / "key.json"
    try:
        key = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read the study key ({type(err).__name__}); score needs the key.json "
                        "that `reader-study make` wrote") from err
    if not isinstance(key, dict) or not isinstance(key.get("images"), dict) or not key.get("criteria"):
        raise UserError(f"{path}: not a reader-study key (no images or criteria)")
    return key


def read_ratings(path: Path, key: dict) -> Rater:
    """One rater's export (JSON or CSV), checked against the key; RatingsError names the file."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise RatingsError(f"{path}: unreadable ({type(err).__name__})") from err
    study, rater, rows = parse_json(text, path) if text.lstrip().startswith("{") else parse_csv(text, path, key)
    if study != key["study_id"]:
        raise RatingsError(f"{path}: ratings of study {study!r}, not of this study ({key['study_id']})")
    if not isinstance(rater, str) or not rater.strip():
        raise RatingsError(f"{path}: no rater name")
    ratings = {}
    for row in rows:
        rating = check_rating(row, key, path)
        ratings[rating.id] = rating
    if not ratings:
        raise RatingsError(f"{path}: no ratings")
    return Rater(rater.strip(), Path(path), ratings)


def parse_json(text: str, path: Path) -> tuple[str, str, list[dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RatingsError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict) or not isinstance(data.get("ratings"), list):
        raise RatingsError(f"{path}: not a ratings export (no 'ratings' list)")
    return data.get("study_id"), data.get("rater"), data["ratings"]


def parse_csv(text: str, path: Path, key: dict) -> tuple[str, str, list[dict]]:
    rows = list(csv.DictReader(text.splitlines()))
    needed = {"study_id", "rater", "id", "call", "confidence", "flag", "note", *key["criteria"]}
    if not rows or not needed <= set(rows[0]):
        raise RatingsError(f"{path}: not a ratings export (CSV needs the columns {', '.join(sorted(needed))})")
    if len({(r["study_id"], r["rater"]) for r in rows}) != 1:
        raise RatingsError(f"{path}: rows of more than one study or rater")
    parsed = [{"id": r["id"], "scores": {c: r[c] for c in key["criteria"] if r[c]}, "call": r["call"] or None,
               "confidence": r["confidence"] or None, "flag": r["flag"] in ("1", "true", "True"), "note": r["note"]}
              for r in rows]
    return rows[0]["study_id"], rows[0]["rater"], parsed


def check_rating(row, key: dict, path: Path) -> Rating:
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        raise RatingsError(f"{path}: a rating without an image id of this study ({str(row)[:60]})")
    if row["id"] not in key["images"]:
        raise RatingsError(f"{path}: a rating of an image this study does not have ({str(row)[:60]})")
    scores = row.get("scores") or {}
    if not isinstance(scores, dict):
        raise RatingsError(f"{path}: image {row['id']}: scores must map criteria to scores, got {str(scores)[:40]}")
    rating = Rating(row["id"], flag=bool(row.get("flag")), note=str(row.get("note") or ""))
    for criterion, value in scores.items():
        if criterion not in key["criteria"]:
            raise RatingsError(f"{path}: image {row['id']}: unknown criterion {criterion!r}")
        rating.scores[criterion] = one_to_five(value, f"{path}: image {row['id']}: {criterion}")
    if row.get("call") not in (None, *CALLS):
        raise RatingsError(f"{path}: image {row['id']}: call {row.get('call')!r} is neither real nor synthetic")
    rating.call = row.get("call")
    if row.get("confidence") is not None:
        rating.confidence = one_to_five(row["confidence"], f"{path}: image {row['id']}: confidence")
    return rating


def one_to_five(value, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity, or 1e400
        number = None
    if number is None or str(value).strip() not in {str(number), f"{number}.0"} or not 1 <= number <= 5:
        raise RatingsError(f"{where}: {value!r} is not a score from 1 to 5")
    return number


def identification(pairs: list[tuple[str, str]]) -> dict:
    """(call, truth) pairs → accuracy with a two-sided binomial test against chance, sensitivity
    (synthetic called synthetic) and specificity (real called real)."""
    from scipy.stats import binomtest

    n = len(pairs)
    correct = sum(call == truth for call, truth in pairs)
    synthetic = [call for call, truth in pairs if truth == "synthetic"]
    real = [call for call, truth in pairs if truth == "real"]
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None,
            "p_value": binomtest(correct, n, CHANCE).pvalue if n else None,
            "sensitivity": synthetic.count("synthetic") / len(synthetic) if synthetic else None,
            "specificity": real.count("real") / len(real) if real else None}


def mean_with_interval(values: list[int], level: float = 0.95) -> dict:
    from scipy import stats

    values = np.asarray(values, float)
    if len(values) == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = float(values.mean())
    if len(values) < 2 or values.std() == 0:
        return {"n": len(values), "mean": mean, "ci95": [mean, mean]}
    low, high = stats.t.interval(level, len(values) - 1, loc=mean, scale=stats.sem(values))
    return {"n": len(values), "mean": mean, "ci95": [float(low), float(high)]}


def compare_scores(real: list[int], synthetic: list[int]) -> dict:
    """Means with 95 % t intervals, and a two-sided Mann–Whitney U test of synthetic against real."""
    from scipy.stats import mannwhitneyu

    out = {"real": mean_with_interval(real), "synthetic": mean_with_interval(synthetic)}
    if real and synthetic:
        test = mannwhitneyu(synthetic, real, alternative="two-sided")
        out["mann_whitney_u"], out["p_value"] = float(test.statistic), float(test.pvalue)
    return out


def krippendorff_alpha(matrix: np.ndarray, level: str = "ordinal") -> float | None:
    """Alpha of a raters × images matrix (NaN where a rater did not rate); None when undefined (under two
    raters, no image rated twice, or a single value used throughout)."""
    import krippendorff

    usable = matrix[:, (~np.isnan(matrix)).sum(axis=0) >= 2]
    if usable.shape[1] == 0 or len(np.unique(usable[~np.isnan(usable)])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=usable, level_of_measurement=level))


def fleiss_kappa(calls: list[list[str]]) -> float | None:
    """Fleiss' kappa (statsmodels) of the real/synthetic calls, one list per image, every image called by
    the same raters; None when undefined (under two raters, or one call used throughout)."""
    from statsmodels.stats.inter_rater import fleiss_kappa as kappa

    table = np.array([[unit.count(c) for c in CALLS] for unit in calls])
    if len(table) == 0 or table.sum(axis=1)[0] < 2 or (table.sum(axis=0) == 0).any():
        return None
    return float(kappa(table, method="fleiss"))


def score(key: dict, raters: list[Rater]) -> dict:
    truth = {image_id: image["source"] for image_id, image in key["images"].items()}
    criteria = key["criteria"]
    results: dict = {"study_id": key["study_id"], "images": len(truth),
                     "raters": {r.name: {"file": r.path.name, "rated": len(r.ratings)} for r in raters}}
    per_rater = {}
    for rater in raters:
        pairs = [(x.call, truth[x.id]) for x in rater.ratings.values() if x.call]
        per_rater[rater.name] = identification(pairs)
    pooled = [(x.call, truth[x.id]) for r in raters for x in r.ratings.values() if x.call]
    results["identification"] = {"chance": CHANCE, "per_rater": per_rater, "pooled": identification(pooled)}
    results["criteria"] = {}
    ids = sorted(truth)
    for criterion in criteria:
        values = {source: [x.scores[criterion] for r in raters for x in r.ratings.values()
                           if criterion in x.scores and truth[x.id] == source] for source in CALLS}
        matrix = np.array([[r.ratings[i].scores.get(criterion, np.nan) if i in r.ratings else np.nan for i in ids]
                           for r in raters], float)
        results["criteria"][criterion] = {**compare_scores(values["real"], values["synthetic"]),
                                          "krippendorff_alpha_ordinal": krippendorff_alpha(matrix)}
    called_by_all = [[r.ratings[i].call for r in raters] for i in ids
                     if all(i in r.ratings and r.ratings[i].call for r in raters)]
    results["agreement"] = {"fleiss_kappa_calls": fleiss_kappa(called_by_all) if len(raters) >= 2 else None,
                            "images_called_by_every_rater": len(called_by_all)}
    results["hallucination_flags"] = {}
    for source in CALLS:
        rated = [x for r in raters for x in r.ratings.values() if truth[x.id] == source]
        results["hallucination_flags"][source] = {"rated": len(rated), "flagged": sum(x.flag for x in rated),
                                                  "rate": sum(x.flag for x in rated) / len(rated) if rated else None}
    if key.get("show_masks"):
        results["per_class"] = per_class(key, raters, criteria[0])
    return results


def per_class(key: dict, raters: list[Rater], criterion: str) -> dict:
    """By dominant class: identification accuracy and mean `criterion` score, real and synthetic."""
    out = {}
    for name in sorted({image["stratum_name"] for image in key["images"].values()}):
        members = {i for i, image in key["images"].items() if image["stratum_name"] == name}
        ratings = [(x, key["images"][x.id]["source"]) for r in raters for x in r.ratings.values() if x.id in members]
        out[name] = {"identification": identification([(x.call, truth) for x, truth in ratings if x.call]),
                     criterion: {source: mean_with_interval([x.scores[criterion] for x, truth in ratings
                                                             if truth == source and criterion in x.scores])
                                 for source in CALLS}}
    return out


def score_study(study: Path, files: list[Path], out: Path | None = None, update_card: Path | None = None) -> dict:
    """Score every usable ratings file (a malformed one is named in one warning line and skipped)."""
    key = read_key(study)
    raters: list[Rater] = []
    for path in files:
        try:
            rater = read_ratings(path, key)
        except RatingsError as err:
            logger.warning("skipped: %s", err)
            continue
        if any(r.name == rater.name for r in raters):
            logger.warning("skipped: %s: rater %r already scored from another file", path, rater.name)
            continue
        raters.append(rater)
    if not raters:
        raise UserError("no usable ratings file: nothing to score")
    results = score(key, raters)
    out = Path(out) if out is not None else Path(study) / "report"
    writable_folder(out, "--out")
    write_atomic(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    write_plots(key, raters, results, out)
    write_atomic(out / "report.md", report_markdown(results).encode())
    if update_card is not None:
        update_bundle_card(Path(update_card), results, out)
    return results


def md(value) -> str:
    """`value` as inert text on one line of Markdown: runs of whitespace (newlines too) as one space, `& < >`
    as HTML entities, and the characters Markdown gives meaning (`|` included) backslash-escaped."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def plot_text(value) -> str:
    """`value` as a matplotlib label: `$` would start mathtext (and a malformed formula raises)."""
    return str(value).replace("$", r"\$")


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def p_text(value) -> str:
    return "n/a" if value is None else (f"{value:.2g}" if value < 0.001 else f"{value:.3f}")


def interval(part: dict) -> str:
    low, high = part["ci95"] or (None, None)
    return f"{fmt(part['mean'], 2)} [{fmt(low, 2)}, {fmt(high, 2)}]"


def summary_markdown(results: dict) -> str:
    """The short version, for a dataset card."""
    pooled = results["identification"]["pooled"]
    lines = [f"{len(results['raters'])} rater(s), {results['images']} images (real and synthetic, blinded). "
             f"Real vs synthetic identified with accuracy {fmt(pooled['accuracy'])} (chance 0.5, binomial "
             f"p = {p_text(pooled['p_value'])}, n = {pooled['n']}).", "",
             "| criterion | real mean [95 % CI] | synthetic mean [95 % CI] | Mann–Whitney p | Krippendorff α |",
             "|---|---|---|---|---|"]
    for name, c in results["criteria"].items():
        lines.append(f"| {md(name)} | {interval(c['real'])} | {interval(c['synthetic'])} | {p_text(c.get('p_value'))} | "
                     f"{fmt(c['krippendorff_alpha_ordinal'])} |")
    flags = results["hallucination_flags"]
    lines += ["", f"Hallucination/artefact flags: real {fmt(flags['real']['rate'])}, synthetic "
                  f"{fmt(flags['synthetic']['rate'])} of ratings."]
    return "\n".join(lines) + "\n"


def report_markdown(results: dict) -> str:
    lines = [f"# Reader study report (study {md(results['study_id'])})", "", summary_markdown(results),
             "## Real vs synthetic, per rater", "",
             "| rater | calls | accuracy | binomial p | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    rows = [(md(name), r) for name, r in results["identification"]["per_rater"].items()]
    for name, r in [*rows, ("**all raters (pooled)**", results["identification"]["pooled"])]:  # raters' names are escaped
        lines.append(f"| {name} | {r['n']} | {fmt(r['accuracy'])} | {p_text(r['p_value'])} | {fmt(r['sensitivity'])} | "
                     f"{fmt(r['specificity'])} |")
    agreement = results["agreement"]
    lines += ["", f"Fleiss' κ of the calls: {fmt(agreement['fleiss_kappa_calls'])} over "
                  f"{agreement['images_called_by_every_rater']} images every rater called. Sensitivity: synthetic "
                  "images called synthetic; specificity: real images called real.", "",
              "![score distributions](scores.png)", "", "![accuracy per rater](accuracy.png)", ""]
    if "per_class" in results:
        criterion = next(iter(results["criteria"]))
        lines += ["## Per dominant class", "", f"| class | calls | accuracy | {md(criterion)} real | {md(criterion)} synthetic |",
                  "|---|---|---|---|---|"]
        for name, c in results["per_class"].items():
            lines.append(f"| {md(name)} | {c['identification']['n']} | {fmt(c['identification']['accuracy'])} | "
                         f"{fmt(c[criterion]['real']['mean'], 2)} | {fmt(c[criterion]['synthetic']['mean'], 2)} |")
    return "\n".join(lines) + "\n"


def write_plots(key: dict, raters: list[Rater], results: dict, out: Path) -> None:
    """scores.png: each criterion's score distribution, real vs synthetic; accuracy.png: per rater."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = {i: image["source"] for i, image in key["images"].items()}
    criteria = key["criteria"]
    fig, axes = plt.subplots(1, len(criteria), figsize=(3.2 * len(criteria), 2.8), squeeze=False)
    for ax, criterion in zip(axes[0], criteria, strict=True):
        for offset, source, colour in ((-0.2, "real", "#4c72b0"), (0.2, "synthetic", "#dd8452")):
            values = [x.scores[criterion] for r in raters for x in r.ratings.values()
                      if criterion in x.scores and truth[x.id] == source]
            counts = np.bincount(values, minlength=6)[1:] / max(1, len(values))
            ax.bar(np.arange(1, 6) + offset, counts, width=0.4, label=source, color=colour)
        ax.set_title(plot_text(criterion))
        ax.set_xticks(range(1, 6))
        ax.set_xlabel("score")
    axes[0][0].set_ylabel("share of ratings")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)
    per_rater = results["identification"]["per_rater"]
    scores = [*per_rater.values(), results["identification"]["pooled"]]  # by position: a rater may be named pooled
    accuracy = [r["accuracy"] or 0 for r in scores]
    labels = [plot_text(n) for n in per_rater] + ["all raters"]
    fig, ax = plt.subplots(figsize=(max(3.5, 0.8 * len(labels) + 1.5), 2.8))
    ax.bar(range(len(labels)), accuracy, tick_label=labels, color=["#4c72b0"] * len(per_rater) + ["#55a868"])
    ax.axhline(CHANCE, color="#c44e52", linestyle="--", label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("real vs synthetic accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


def update_bundle_card(bundle: Path, results: dict, report: Path) -> None:
    """The summary and the score plot into a local bundle's dataset card (section "Reader study")."""
    from htd_toolkit.publish.dataset import read_bundle_manifest, write_card
    from htd_toolkit.publish.hub import published_repos

    if not bundle.is_dir():
        raise UserError(f"--update-card: {bundle} is not a local bundle folder")
    manifest = read_bundle_manifest(bundle)
    manifest["reader_study"] = {"text": summary_markdown(results)}
    write_manifest(bundle, manifest)
    (bundle / "assets").mkdir(exist_ok=True)
    write_atomic(bundle / "assets" / "reader_study_scores.png", (report / "scores.png").read_bytes())
    write_card(bundle, manifest, repo_id=published_repos(bundle).get("dataset"))
