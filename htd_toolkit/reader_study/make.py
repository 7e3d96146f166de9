"""`htd-toolkit reader-study make`: a blinded study folder from a real and a synthetic set.

Blinding: every image, real or synthetic, goes through the same steps (RGB array → one size → outline
when masks are shown → an uncompressed PNG with no text chunk), so files differ only in their pixels:
the same byte size, chunks and modification time for all, names drawn at random, listed in the page
sorted by name. Which id is which source lives in `key.json` only. Each rater sees the images in an
order shuffled from their name, in the page.
"""

from __future__ import annotations

import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader
from PIL import Image

from htd_toolkit import __version__
from htd_toolkit.classes import PALETTE, check_same_names
from htd_toolkit.errors import UserError, check_number
from htd_toolkit.evaluate.sets import ImageSet, load_set
from htd_toolkit.files import write_atomic

CRITERIA = ("realism", "morphology", "staining", "diagnostic-quality")
IMAGE_TIME = 946684800  # every image's modification time (2000-01-01): no write order to read


@dataclass
class StudyOptions:
    real: str
    synthetic: str
    out: Path
    num_images: int = 120
    real_fraction: float = 0.5
    criteria: tuple[str, ...] = CRITERIA
    show_masks: bool = False
    seed: int = 0
    real_split: str = "validation"
    synthetic_split: str = "train"
    size: int | None = None  # display side; default: the smaller of the two sets'
    title: str = "Tissue image reader study"

    def check(self) -> None:
        check_number("--num-images", self.num_images, 2, 10000)
        check_number("--real-fraction", self.real_fraction, 0, 1, above=True)
        check_number("--size", self.size, 32, 4096)
        if self.real_fraction >= 1:
            raise UserError("--real-fraction must be below 1: the study needs synthetic images")
        if not self.criteria or any(not c.replace("-", "").isalnum() for c in self.criteria):
            raise UserError(f"--criteria: give names of letters, digits and dashes, got {','.join(self.criteria)!r}")


@dataclass
class Drawn:
    source: str  # "real" or "synthetic"
    index: int  # into its set
    stratum: int  # dominant tissue class
    classes: list[int] = field(default_factory=list)


def dominant_class(mask: np.ndarray, num_classes: int) -> int:
    """The tissue class covering most pixels (0 when the patch has no tissue)."""
    counts = np.bincount(mask[mask < num_classes].ravel(), minlength=num_classes)[1:num_classes]
    return int(np.argmax(counts)) + 1 if counts.sum() else 0


def draw(real: ImageSet, synthetic: ImageSet, options: StudyOptions, rng: np.random.Generator) -> list[Drawn]:
    """`num_images` images, `real_fraction` of them real, with the same mix of dominant classes in both
    sources (strata both sources have, in proportion to the synthetic set's mix)."""
    k = len(real.classes)
    strata = {name: [dominant_class(m, k) for m in s.masks] for name, s in (("real", real), ("synthetic", synthetic))}
    common = sorted(set(strata["real"]) & set(strata["synthetic"]))
    if not common:
        raise UserError("the real and synthetic sets share no dominant tissue class: nothing to compare")
    wanted = {"real": round(options.num_images * options.real_fraction)}
    wanted["synthetic"] = options.num_images - wanted["real"]
    pools = {name: {c: [i for i, s in enumerate(strata[name]) if s == c] for c in common} for name in strata}
    weights = np.array([len(pools["synthetic"][c]) for c in common], float)
    chosen = []
    for name in ("real", "synthetic"):
        share = allocate(wanted[name], weights / weights.sum(), [len(pools[name][c]) for c in common])
        for stratum, count in zip(common, share, strict=True):
            picks = rng.choice(pools[name][stratum], count, replace=False) if count else []
            chosen += [Drawn(name, int(i), stratum) for i in picks]
    return chosen


def allocate(total: int, shares: np.ndarray, available: list[int]) -> list[int]:
    """`total` split by `shares` (largest remainder), never above `available`; one line when too few."""
    if total > sum(available):
        raise UserError(f"asked for {total} images of one source, but only {sum(available)} have a dominant class "
                        "the other source also has: lower --num-images")
    counts = np.minimum(np.floor(shares * total).astype(int), available)
    while counts.sum() < total:
        room = np.array(available) - counts
        gap = np.where(room > 0, shares * total - counts, -np.inf)
        counts[int(np.argmax(gap))] += 1
    return counts.tolist()


def outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with each region's border drawn in its class colour (2 px)."""
    edge = np.zeros(mask.shape, bool)
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:-1] |= mask[1:] != mask[:-1]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, 1:] != mask[:, :-1]
    colours = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in PALETTE], np.uint8)
    out = image.copy()
    out[edge] = colours[mask[edge] % len(colours)]
    return out


def study_image(image: np.ndarray, mask: np.ndarray, size: int, show_masks: bool) -> Image.Image:
    """The one way every study image is made, whatever its source."""
    picture, labels = Image.fromarray(np.ascontiguousarray(image)).convert("RGB"), Image.fromarray(mask)
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.Resampling.BICUBIC)
        labels = labels.resize((size, size), Image.Resampling.NEAREST)
    if show_masks:
        picture = Image.fromarray(outline(np.asarray(picture), np.asarray(labels)))
    return picture


def png_bytes(picture: Image.Image) -> bytes:
    """Uncompressed PNG, no text or colour chunks: its size depends on the image size only."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=0, optimize=False)
    return buffer.getvalue()


def random_ids(count: int, rng: np.random.Generator) -> list[str]:
    ids: set[str] = set()
    while len(ids) < count:
        ids.add(rng.bytes(6).hex())
    return sorted(ids)


def make_study(options: StudyOptions) -> dict:
    """Write STUDY/index.html, images/, key.json and README.md; returns the key."""
    options.check()
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: not empty; a study folder is written once (choose a new --out)")
    real = load_set(options.real, options.real_split)
    synthetic = load_set(options.synthetic, options.synthetic_split)
    check_same_names(real.classes, real.name, synthetic.classes, synthetic.name)
    size = options.size or min(real.images.shape[1], synthetic.images.shape[1])
    rng = np.random.default_rng(options.seed)
    drawn = draw(real, synthetic, options, rng)
    ids = random_ids(len(drawn), rng)
    order = rng.permutation(len(drawn))  # ids are sorted: pair them with the drawn images in random order
    sets = {"real": real, "synthetic": synthetic}
    (out / "images").mkdir(parents=True, exist_ok=True)
    key = {"toolkit_version": __version__, "seed": options.seed, "criteria": list(options.criteria),
           "show_masks": options.show_masks, "classes": real.classes, "size": size,
           "sets": {"real": {"name": real.name, "split": options.real_split},
                    "synthetic": {"name": synthetic.name, "split": options.synthetic_split}},
           "images": {}}
    for image_id, position in zip(ids, order, strict=True):
        item = sets[drawn[position].source]
        picture = study_image(item.images[drawn[position].index], item.masks[drawn[position].index], size,
                              options.show_masks)
        path = out / "images" / f"{image_id}.png"
        write_atomic(path, png_bytes(picture))
        os.utime(path, (IMAGE_TIME, IMAGE_TIME))
        key["images"][image_id] = {"source": drawn[position].source, "key": item.keys[drawn[position].index],
                                   "stratum": drawn[position].stratum,
                                   "stratum_name": real.classes[drawn[position].stratum]}
    key["study_id"] = rng.bytes(8).hex()
    write_atomic(out / "key.json", (json.dumps(key, indent=2) + "\n").encode())
    page = {"study_id": key["study_id"], "title": options.title, "criteria": list(options.criteria),
            "images": ids, "show_masks": options.show_masks}
    study_json = script_json(page)
    write_atomic(out / "index.html", render("page.html.j2", study_json=study_json, title=html.escape(options.title)))
    write_atomic(out / "README.md", render("README.md.j2", criteria=options.criteria, count=len(ids),
                                           show_masks=options.show_masks, study_id=key["study_id"]))
    return key


def script_json(data) -> str:
    """JSON for a `<script type="application/json">` block, with `<`, `>` and `&` as JSON escapes: no
    `</script>` can end the block early and no `<!--<script>` can keep its real end from closing it."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(template: str, **values) -> bytes:
    env = Environment(loader=PackageLoader("htd_toolkit.reader_study", "templates"), autoescape=False,
                      keep_trailing_newline=True)
    return env.get_template(template).render(**values).encode()
