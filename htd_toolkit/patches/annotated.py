"""`htd-toolkit prepare annotated`: slides + annotations → the dataset folder (docs/formats.md).

Slides are matched to annotations by file stem, split by slide (never by patch), processed in
parallel (`workers` processes, and across processes or machines with `accelerate launch` or
`slide_shard`), and assembled once every slide is done. Finished slides live in
`OUT/.work/<fingerprint>/` and are not redone when the same command runs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path

from htd_toolkit.annotations import FORMATS
from htd_toolkit.annotations.base import annotation_path
from htd_toolkit.annotations.geojson import discover_classes
from htd_toolkit.classes import ClassSpec, classes_from_names
from htd_toolkit.data.folder import SPLITS, assemble
from htd_toolkit.data.outputs import Claim, claim_launched
from htd_toolkit.distributed import barrier, end_with_parent, process_share, world_size
from htd_toolkit.errors import UserError
from htd_toolkit.patches.extract import ExtractConfig, SlideJob, extract_slide, work_paths
from htd_toolkit.privacy import slide_id
from htd_toolkit.wsi.slide import share_cores

logger = logging.getLogger(__name__)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")

# What prepare writes besides its manifest, shards (journaled) and .work/; README.md is the user's card.
PREPARE_OUTPUTS = ("assets/*.png", "embeddings/*", "clusters/*")
PREPARE_USER_FILES = ("README.md",)

@dataclass
class PrepareOptions:
    slides: list[Path]
    annotations: Path
    out: Path
    extract: ExtractConfig
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    shard_size: int = 1000
    workers: int = 1
    keep_going: bool = False
    keep_slide_names: bool = False
    classes: list[str] | None = None  # pin the GeoJSON class list
    slide_shard: tuple[int, int] | None = None  # (index, count) of this process's share
    dataset_name: str | None = None
    license: str | None = None
    overwrite: bool = False  # write into an --out that holds files prepare did not write

    def recorded(self) -> dict:
        """What decides the folder's contents: it is continued only with the same values (paths, workers and
        shares may change)."""
        return {**asdict(self.extract), "split": list(self.split), "shard_size": self.shard_size,
                "keep_slide_names": self.keep_slide_names, "classes": self.classes,
                "dataset_name": self.dataset_name, "license": self.license}


def claim_prepared(options: PrepareOptions, command: str, recorded: dict, inputs: tuple[Path, ...]) -> None:
    """Check and record `--out` before `command` writes there."""
    claim_launched(Claim(options.out, command, recorded, PREPARE_OUTPUTS, PREPARE_USER_FILES, inputs,
                         options.overwrite))


@dataclass
class PrepareReport:
    slides: int = 0
    done: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # slides that gave no patch
    manifest: dict | None = None
    pending: int = 0  # slides other shards still have to do
    main_process: bool = True  # False on the other ranks of an `accelerate launch` run

    @property
    def totals(self) -> dict:
        rejected = Counter()
        for stats in self.done:
            rejected.update(stats["rejected"])
        return {"slides": len(self.done), "tried": sum(s["tried"] for s in self.done),
                "kept": sum(s["kept"] for s in self.done), "crops": sum(s["crops"] for s in self.done),
                "rejected": dict(sorted(rejected.items()))}


def find_slides(paths: list[Path]) -> list[Path]:
    """Slide files among `paths` (files, or folders searched one level deep); PANDA masks excluded."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{path}: no such slide file or folder")
    slides = [p for p in found if not p.stem.endswith("_mask")]
    if not slides:
        raise UserError(f"no slides found in {', '.join(str(p) for p in paths)}")
    return slides


def assign_splits(ids: list[str], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Slide id → split, by slide: a seeded order, cut at the cumulative ratios."""
    total = sum(ratios)
    if total <= 0 or any(r < 0 for r in ratios):
        raise UserError(f"--split needs three non-negative ratios, got {ratios}")
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    bounds = [sum(ratios[:k + 1]) / total for k in range(3)]
    splits = {}
    for position, sid in enumerate(order):
        point = (position + 0.5) / len(order)
        splits[sid] = SPLITS[next(k for k, bound in enumerate(bounds) if point <= bound + 1e-9)]
    return splits


def build_jobs(options: PrepareOptions) -> tuple[list[SlideJob], list[str]]:
    """Jobs for every slide, and a failure line for every annotation file without a slide (when the
    slides were given as folders)."""
    fmt = FORMATS[options.extract.format]
    slides = find_slides(options.slides)
    if not options.annotations.is_dir():
        raise UserError(f"{options.annotations}: annotation folder not found")
    ids = {path: slide_id(path, options.keep_slide_names) for path in slides}
    if len(set(ids.values())) != len(ids):
        raise UserError("two slides share a file name; slide ids would collide")
    splits = assign_splits(sorted(ids.values()), options.split, options.extract.seed)
    jobs = [SlideJob(path, annotation_path(options.annotations, path.stem, fmt.suffixes), ids[path], splits[ids[path]])
            for path in slides]
    if not all(path.is_dir() for path in options.slides):
        return jobs, []  # slides picked one by one: the other annotations are not orphans
    stems = {path.stem for path in slides}
    orphans = [f"{p.name}: annotation without slide (no slide named {annotation_stem(p, fmt.suffixes)}.*)"
               for p in sorted(options.annotations.iterdir())
               if p.name.endswith(fmt.suffixes) and annotation_stem(p, fmt.suffixes) not in stems]
    return jobs, orphans


def annotation_stem(path: Path, suffixes: tuple[str, ...]) -> str:
    return next(path.name[:-len(s)] for s in suffixes if path.name.endswith(s))


def resolve_classes(options: PrepareOptions, jobs: list[SlideJob]) -> list[ClassSpec]:
    fmt = FORMATS[options.extract.format]
    if options.extract.format != "geojson":
        return list(fmt.classes)
    if options.classes:
        return classes_from_names(options.classes)
    return discover_classes([job.annotation for job in jobs if job.annotation is not None],
                            dict(options.extract.class_map), options.extract.include_detections)


def attempt(job: SlideJob, config: ExtractConfig, classes: list[ClassSpec], work: Path) -> tuple[dict | None, str | None]:
    """(stats, None) when the slide is done, (None, one-line reason naming the file) when it failed."""
    marker = work / f"{job.slide_id}.failed"  # lets the merging process tell failed from unfinished
    try:
        stats = extract_slide(job, config, classes, work).to_dict()
    except UserError as err:
        message = str(err) if job.path.name in str(err) else f"{job.path.name}: {err}"
        marker.write_text(message)
        return None, message
    marker.unlink(missing_ok=True)
    return stats, None


def start_worker(cores: int, parent_pid: int) -> None:
    """Worker set-up: end with the parent (a killed `prepare` leaves no extracting orphans), share the cores."""
    end_with_parent(parent_pid)
    share_cores(cores)


def run_jobs(jobs: list[SlideJob], options: PrepareOptions, classes: list[ClassSpec], work: Path,
             report: PrepareReport, progress=None) -> None:
    """Extract every job not done yet; failures are collected (and stop the run unless keep_going)."""
    todo = [job for job in jobs if not work_paths(work, job.slide_id)[2].exists()]
    report.done += [load_stats(work, job) for job in jobs if job not in todo]
    if progress:
        progress(len(jobs) - len(todo))
    args = (repeat(options.extract), repeat(classes), repeat(work))
    pool = None
    if options.workers > 1:  # each process decodes tiles with its share of the cores
        cores = max(1, (os.cpu_count() or 1) // options.workers)
        pool = ProcessPoolExecutor(options.workers, mp_context=get_context("spawn"), initializer=start_worker,
                                   initargs=(cores, os.getpid()))
    results = pool.map(attempt, todo, *args) if pool else map(attempt, todo, *args)
    try:
        for stats, error in results:
            if progress:
                progress(1)
            if error is None:
                report.done.append(stats)
                continue
            report.failures.append(error)
            if not options.keep_going:
                break
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def no_patch(path: Path, stats: dict) -> str:
    return f"{path.name}: no patch kept; {rejections(stats)}"


def rejections(stats: dict) -> str:
    """'70 windows tried: 52 low_tissue, 18 single_class'."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in stats["rejected"].items())
    return f"{stats['tried']} windows tried" + (f": {reasons}" if reasons else "")


def load_stats(work: Path, job: SlideJob) -> dict:
    return json.loads(work_paths(work, job.slide_id)[2].read_text())


def prepare_annotated(options: PrepareOptions, progress_factory=None) -> PrepareReport:
    """Run the whole stage; returns what was done. Raises UserError for input that stops everything."""
    claim_prepared(options, "prepare annotated", options.recorded(), (*options.slides, options.annotations))
    jobs, orphans = build_jobs(options)
    report = PrepareReport(slides=len(jobs), failures=list(orphans))
    if orphans and not options.keep_going:
        return report
    classes = resolve_classes(options, jobs)
    for job in jobs:
        if job.annotation is None and not FORMATS[options.extract.format].missing_ok:
            report.failures.append(f"{job.path.name}: no annotation file found in {options.annotations.name}/")
    if report.failures and not options.keep_going:
        return report
    jobs = [job for job in jobs if job.annotation is not None or FORMATS[options.extract.format].missing_ok]
    return extract_and_assemble(options, jobs, classes, report, progress_factory)


def extract_and_assemble(options: PrepareOptions, jobs: list[SlideJob], classes: list[ClassSpec],
                         report: PrepareReport, progress_factory=None, extra_config: dict | None = None) -> PrepareReport:
    """Extract this process's share of `jobs` (resumably) and, once every slide is done, write the folder."""
    fingerprint = options.extract.fingerprint({"split": options.split, "classes": [c.name for c in classes],
                                               "keep_names": options.keep_slide_names})
    work = options.out / ".work" / fingerprint
    work.mkdir(parents=True, exist_ok=True)
    index, count = process_share(*(options.slide_shard or (0, 1)))
    share = [replace(job, process=index) for job in jobs[index::count]]
    progress = progress_factory(len(share)) if progress_factory else None
    run_jobs(share, options, classes, work, report, progress)
    if world_size() > 1:
        barrier()
        if index != 0:
            report.main_process = False
            return report
    if report.failures and not options.keep_going:
        return report
    done = [job for job in jobs if work_paths(work, job.slide_id)[2].exists()]
    report.pending = len([job for job in jobs if job not in done and not (work / f"{job.slide_id}.failed").exists()])
    if report.pending:
        return report  # other shards are still working; the last run without --slide-shard merges
    all_stats = [load_stats(work, job) for job in done]
    report.done = all_stats
    report.warnings = [no_patch(job.path, stats) for job, stats in zip(done, all_stats, strict=True)
                       if not stats["kept"]]
    if done and not report.totals["kept"]:
        raise UserError(f"{options.out}: no patch kept from {len(done)} slide(s), no dataset written; "
                        f"{rejections(report.totals)} (an annotation without regions, or --min-tissue, "
                        "--min-fraction and --max-fraction too strict?)")
    fmt = FORMATS[options.extract.format]
    default_name, default_license = fmt.dataset
    source = {"name": options.dataset_name or default_name, "license": options.license or default_license,
              "format": options.extract.format}
    config = {**asdict(options.extract), "split": list(options.split), "shard_size": options.shard_size,
              "keep_slide_names": options.keep_slide_names, **(extra_config or {})}
    stats = {**report.totals, "slides": [{k: s[k] for k in ("slide_id", "split", "tried", "kept", "crops",
                                                            "rejected", "mpp_source")} for s in all_stats]}
    slides = [(job.slide_id, job.split, *work_paths(work, job.slide_id)[:2]) for job in done]
    report.manifest = assemble(options.out, slides, classes, options.shard_size, source, config, stats)
    return report
