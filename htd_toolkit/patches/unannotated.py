"""`htd-toolkit prepare unannotated` and its stages `embed`, `cluster`, `pseudo-maps` (the paper's §2.2–2.3).

1. embed: tissue tiles of each slide → encoder features (`OUT/embeddings/`), resumable per slide;
2. cluster: k-means on a per-slide diversity sample (`--per-slide` tiles a slide), centroids saved
   with the encoder spec (`OUT/clusters/centroids.safetensors`), every tile assigned
   (`OUT/clusters/assignments/`), a gallery of the tiles nearest each centroid (`OUT/assets/`);
3. pseudo-maps: the annotated path's sampling on the cluster maps → the same dataset folder, with
   classes background + k tissue types.
Under `accelerate launch` slides are split between processes for 1 and 3; 2 runs on the main one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from htd_toolkit.annotations.pseudo import cluster_classes, write_assignment
from htd_toolkit.classes import centroids_digest
from htd_toolkit.clustering.embed import embed_slide, read_embeddings
from htd_toolkit.clustering.encoders import public_spec
from htd_toolkit.clustering.kmeans import KMeans
from htd_toolkit.distributed import barrier, process_share
from htd_toolkit.errors import UserError
from htd_toolkit.patches.annotated import (
    PrepareOptions,
    PrepareReport,
    assign_splits,
    claim_prepared,
    extract_and_assemble,
    find_slides,
)
from htd_toolkit.patches.extract import SlideJob
from htd_toolkit.privacy import slide_id

logger = logging.getLogger(__name__)
CENTROIDS = Path("clusters") / "centroids.safetensors"
# The options each stage's output depends on: a folder is continued by any stage whose options agree.
STAGE_OPTIONS = {"embed": ("encoder", "mpp", "tile_size"),
                 "cluster": ("encoder", "mpp", "tile_size", "k", "per_slide", "hierarchical", "seed", "centroids"),
                 "pseudo-maps": ("encoder", "k", "mpp", "seed", "patch_size", "stride", "min_fraction",
                                 "max_fraction", "min_tissue", "crop_size", "split", "shard_size", "dataset_name",
                                 "license")}


@dataclass
class UnannotatedOptions:
    prepare: PrepareOptions  # slides, out, extraction (format "pseudo"), split, workers, keep_going...
    encoder: str = "stain-stats"
    k: int = 100
    tile_size: int = 224
    per_slide: int = 1000
    hierarchical: bool = False
    batch_size: int = 64
    centroids: Path | None = None  # another run's centroids to assign with, instead of fitting
    report: PrepareReport = field(default_factory=PrepareReport)

    def recorded(self, stages: tuple[str, ...]) -> dict:
        """The options `stages` depend on, by name."""
        values = {**self.prepare.recorded(), "encoder": self.encoder, "k": self.k, "tile_size": self.tile_size,
                  "per_slide": self.per_slide, "hierarchical": self.hierarchical,
                  "centroids": centroids_digest(given_centroids(self).centroids.cpu().numpy()) if self.centroids else None}
        return {key: values[key] for stage in stages for key in STAGE_OPTIONS[stage]}


def slide_jobs(options: UnannotatedOptions) -> list[SlideJob]:
    prep = options.prepare
    slides = find_slides(prep.slides)
    ids = {path: slide_id(path, prep.keep_slide_names) for path in slides}
    if len(set(ids.values())) != len(ids):
        raise UserError("two slides share a file name; slide ids would collide")
    splits = assign_splits(sorted(ids.values()), prep.split, prep.extract.seed)
    assignments = prep.out / "clusters" / "assignments"
    return [SlideJob(path, assignments / f"{ids[path]}.npz", ids[path], splits[ids[path]]) for path in slides]


def is_main() -> bool:
    return process_share(0, 1)[0] == 0


def run_embed(options: UnannotatedOptions, jobs: list[SlideJob], progress=None) -> None:
    """Embed this process's slides that are not embedded yet; failures are recorded in the report."""
    from htd_toolkit.clustering.encoders import get_encoder

    index, count = process_share(*(options.prepare.slide_shard or (0, 1)))
    todo = [job for job in jobs[index::count] if not embedding_path(options, job).exists()]
    if not todo:
        return
    encoder = get_encoder(options.encoder)
    prep = options.prepare
    for job in todo:
        try:
            embed_slide(job.path, job.slide_id, encoder, prep.out, options.tile_size, prep.extract.mpp,
                        options.batch_size, public_spec(options.encoder))
        except UserError as err:
            options.report.failures.append(str(err) if job.path.name in str(err) else f"{job.path.name}: {err}")
            if not prep.keep_going:
                return
        if progress:
            progress(1)


def embedding_path(options: UnannotatedOptions, job: SlideJob) -> Path:
    return options.prepare.out / "embeddings" / f"{job.slide_id}.safetensors"


def check_fitted_k(options: UnannotatedOptions) -> None:
    """The maps' classes come from the fitted centroids: --k must be theirs."""
    path = options.prepare.out / CENTROIDS
    if path.exists() and (fitted := KMeans.load(path).k) != options.k:
        raise UserError(f"{path}: the centroids were fitted with k = {fitted}, not --k {options.k}; "
                        f"pass --k {fitted} (or remove the clusters folder and cluster again)")


def run_cluster(options: UnannotatedOptions, jobs: list[SlideJob]) -> KMeans:
    """Fit k-means on the per-slide diversity sample (unless the centroids exist), then assign every tile."""
    out, seed = options.prepare.out, options.prepare.extract.seed
    done = [job for job in jobs if embedding_path(options, job).exists()]
    if not done:
        raise UserError(f"{out}: no embeddings; run `htd-toolkit embed` first")
    path = out / CENTROIDS
    if options.centroids and not path.exists():
        model = given_centroids(options, read_embeddings(embedding_path(options, done[0]))[0].shape[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
    if path.exists():
        model = KMeans.load(path)
        if model.meta.get("encoder") != public_spec(options.encoder) or model.k != options.k:
            raise UserError(f"{path}: centroids were fitted with encoder {model.meta.get('encoder')!r} and "
                            f"k = {model.k}; remove the clusters folder to refit")
    else:
        model = fit_centroids(options, done, seed)
    sha = centroids_digest(model.centroids.cpu().numpy())
    for job in done:
        write_slide_assignment(options, job, model, sha)
    return model


def given_centroids(options: UnannotatedOptions, dim: int | None = None) -> KMeans:
    """`--centroids`, checked before anything is written: an htd-toolkit centroids file fitted with this
    encoder and k (the rows it holds, not what its metadata says), of the embeddings' width `dim` if given."""
    path = options.centroids
    if not path.is_file():
        raise UserError(f"--centroids {path}: no such file")
    try:
        model = KMeans.load(path)
    except UserError as err:
        raise UserError(f"--centroids {err}".replace("; delete it to make it again", "")) from err
    if model.meta.get("encoder") != public_spec(options.encoder) or model.k != options.k:
        raise UserError(f"--centroids {path}: {model.k} centroids of encoder {model.meta.get('encoder')!r}, not "
                        f"--k {options.k} of {public_spec(options.encoder)!r}")
    if dim is not None and model.centroids.shape[1] != dim:
        raise UserError(f"--centroids {path}: centroids of {model.centroids.shape[1]} dimensions for embeddings "
                        f"of {dim}")
    return model


def fit_centroids(options: UnannotatedOptions, jobs: list[SlideJob], seed: int) -> KMeans:
    rng = np.random.default_rng(seed)
    sample, meta = [], {}
    for job in jobs:
        features, _, meta = read_embeddings(embedding_path(options, job))
        take = rng.choice(len(features), min(options.per_slide, len(features)), replace=False)
        sample.append(features[np.sort(take)])
    sample = np.concatenate(sample)
    if len(sample) < options.k:
        raise UserError(f"only {len(sample)} tissue tiles for k = {options.k} clusters; lower --k or add slides")
    model = KMeans(k=options.k, seed=seed, hierarchical=options.hierarchical).fit(sample)
    model.save(options.prepare.out / CENTROIDS, encoder=public_spec(options.encoder), mpp=meta.get("mpp"),
               tile_size=options.tile_size, fit_samples=len(sample), per_slide=options.per_slide)
    return KMeans.load(options.prepare.out / CENTROIDS)


def write_slide_assignment(options: UnannotatedOptions, job: SlideJob, model: KMeans, sha: str) -> None:
    if job.annotation.exists():
        with np.load(job.annotation) as data:
            if str(data["centroids"]) == sha:
                return
    features, cells, meta = read_embeddings(embedding_path(options, job))
    labels, _ = model.predict(features)
    grid = np.zeros((meta["rows"], meta["columns"]), np.uint8)
    grid[cells[:, 1], cells[:, 0]] = labels + 1
    write_assignment(job.annotation, grid, meta["tile0"], sha)


def cluster_gallery(options: UnannotatedOptions, jobs: list[SlideJob], model: KMeans, per_cluster: int = 4,
                    tile: int = 48) -> Path:
    """assets/cluster_gallery.png: for each cluster, the tiles nearest its centroid."""
    from htd_toolkit.wsi.slide import Slide

    best: dict[int, list[tuple[float, SlideJob, int, int, int]]] = {}
    for job in jobs:
        if not embedding_path(options, job).exists():
            continue
        features, cells, meta = read_embeddings(embedding_path(options, job))
        labels, dists = model.predict(features)
        for i in np.argsort(dists):
            entries = best.setdefault(int(labels[i]), [])
            if len(entries) < per_cluster:
                entries.append((float(dists[i]), job, int(cells[i, 0]), int(cells[i, 1]), meta["tile0"]))
    columns = 10
    cell = tile * 2
    rows = -(-model.k // columns)
    canvas = np.full((rows * (cell + 4), columns * (cell + 4), 3), 255, np.uint8)
    for cluster in range(model.k):
        r, c = divmod(cluster, columns)
        for n, (_, job, col, row, tile0) in enumerate(sorted(best.get(cluster, []), key=lambda e: e[0])):
            with Slide(job.path) as slide:
                pixels = slide.read_box(col * tile0, row * tile0, tile0, tile0, options.prepare.extract.mpp, tile, tile)
            y, x = r * (cell + 4) + (n // 2) * tile, c * (cell + 4) + (n % 2) * tile
            canvas[y:y + tile, x:x + tile] = pixels
    path = options.prepare.out / "assets" / "cluster_gallery.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def prepare_unannotated(options: UnannotatedOptions, stages=("embed", "cluster", "pseudo-maps"),
                        progress_factory=None) -> PrepareReport:
    if options.centroids and "cluster" in stages:
        given_centroids(options)  # before the folder is claimed: a bad file leaves nothing behind
    claim_prepared(options.prepare, "prepare unannotated", options.recorded(tuple(stages)),
                   tuple(options.prepare.slides))
    jobs = slide_jobs(options)
    report = options.report
    report.slides = len(jobs)
    if "embed" in stages:
        progress = progress_factory(len(jobs)) if progress_factory else None
        run_embed(options, jobs, progress)
        barrier()
        if report.failures and not options.prepare.keep_going:
            return report
    failed = {job.slide_id for job in jobs if not embedding_path(options, job).exists()}
    if "cluster" in stages:
        if is_main():
            model = run_cluster(options, jobs)
            cluster_gallery(options, jobs, model)
        barrier()
    if "pseudo-maps" in stages:
        check_fitted_k(options)
        classes = cluster_classes(options.k)
        usable = [job for job in jobs if job.slide_id not in failed and job.annotation.exists()]
        if not usable:
            raise UserError(f"{options.prepare.out}: no cluster assignments; run `htd-toolkit cluster` first")
        extra = {"encoder": public_spec(options.encoder), "k": options.k, "tile_size": options.tile_size,
                 "per_slide": options.per_slide, "hierarchical": options.hierarchical,
                 "centroids": centroids_digest(KMeans.load(options.prepare.out / CENTROIDS).centroids.cpu().numpy())}
        return extract_and_assemble(options.prepare, usable, classes, report, progress_factory, extra)
    return report


def centroid_summary(out: Path) -> dict:
    model = KMeans.load(out / CENTROIDS)
    return {k: v for k, v in model.meta.items() if isinstance(v, (int, float, str))} | {"k": model.k}

