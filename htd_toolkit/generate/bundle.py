"""`htd-toolkit generate`: an HTD model + prepared maps + crop bank → a synthetic bundle (docs/formats.md).

Sample i is a pure function of (options, i): map i mod M of the chosen split, crops drawn from the
bank with a generator seeded by (seed, i), starting noise from its own seed. Shard s holds samples
[s·size, (s+1)·size); a finished shard is recorded in `.work/shards/`, so an interrupted run resumes
at the first unfinished shard and ends byte-identical to an uninterrupted one. Under
`accelerate launch` each process takes every world-th shard and the main process writes one manifest;
`--shard I/N` (array jobs) gives job I the I-th of N contiguous ranges of shards. With a `HubStream`
(publish/stream.py) each finished shard is uploaded while the next ones are generated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from htd_toolkit import __version__
from htd_toolkit.classes import (
    FINGERPRINT,
    ID2LABEL,
    check_same_classes,
    check_same_names,
    names_by_index,
    write_id2label,
)
from htd_toolkit.data.folder import (
    MANIFEST,
    read_manifest,
    split_shards,
    write_manifest,
)
from htd_toolkit.data.labels import class_fractions, classes_present
from htd_toolkit.data.outputs import WORK, Claim, claim_launched, given_back_if_stopped, record_written
from htd_toolkit.data.sources import CropBank, MapEntry, crop_bank_for, crop_bank_sha256, load_maps
from htd_toolkit.distributed import barrier, process_share
from htd_toolkit.errors import UserError, check_number
from htd_toolkit.files import write_json
from htd_toolkit.generate import GENERATION_FLAGS
from htd_toolkit.generate.writer import (
    DOMINANT_BINS,
    FORMATS,
    GRID_SAMPLES,
    ShardWriter,
    record_path,
    shard_path,
)
from htd_toolkit.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, check_generation_settings
from htd_toolkit.models.folder import model_sha256
from htd_toolkit.seeding import derive_seed

logger = logging.getLogger(__name__)
BUNDLE_OUTPUTS = ("README.md", "assets/*.png")  # besides its manifest, shards and .work/


@dataclass
class GenerateOptions:
    model: str
    maps: Path
    crop_bank: Path | None
    num_samples: int
    out: Path
    revision: str | None = None
    maps_split: str = "train"
    batch_size: int = 8
    steps: int = NUM_INFERENCE_STEPS
    guidance: float = GUIDANCE_SCALE
    seed: int = 0
    shard_size: int = 1000
    image_format: str = "png"
    license: str | None = None
    base_model: str | None = None
    scheduler: str = "unipc"
    keep_glass: bool = False  # keep the map's background the model's real glass (models/background.py): opt-in
    compile: bool = False  # torch.compile the UNet and ControlNet (pays off over many batches on a GPU)
    overwrite: bool = False  # write into an --out that holds files generate did not write
    auto_batch_size: bool = False  # start at batch_size, shrink it on out-of-memory (x 0.9, accelerate's rule)
    job: tuple[int, int] = (0, 1)  # --shard I/N: this job makes the I-th of N contiguous ranges of shards

    def check(self) -> None:
        """One line for the first number that is NaN, infinite or out of range, or an unknown scheduler."""
        from htd_toolkit.models.pipeline import SCHEDULERS

        for option, value in (("--num-samples", self.num_samples), ("--batch-size", self.batch_size),
                              ("--shard-size", self.shard_size)):
            check_number(option, value, 1)
        check_generation_settings(self.steps, self.guidance, GENERATION_FLAGS)
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown --scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")

    def fingerprint(self) -> dict:
        """What determines the bytes: every option but paths and batching."""
        keep = ("model", "revision", "maps_split", "num_samples", "steps", "guidance", "seed", "shard_size",
                "image_format", "scheduler", "keep_glass")
        return {k: v for k, v in asdict(self).items() if k in keep}


def sample_seed(seed: int, index: int) -> int:
    return derive_seed(seed, "sample", index)


def model_name(model: str, folder: Path) -> str:
    """`repo@sha` for a Hub model (the snapshot folder is named by the commit), `local:NAME` otherwise."""
    if Path(model).exists():
        return f"local:{Path(model).resolve().name}"
    return f"{model}@{folder.name}"


def model_identity(model: str, folder: Path, base_model: str | None = None) -> dict:
    """What names the model in a run's options: its `model_name`, and for a local folder, whose name says
    nothing of what it holds, `model_sha256` too (a model retrained in place makes other images); with
    --base-model, the base its weights sit on instead of the recorded one (a digest of its files when it is
    local; always named, as options are compared on the keys both runs name)."""
    identity = {"model": model_name(model, folder),
                "base_model": model_sha256(Path(base_model)) if local_paths(base_model) else base_model}
    if Path(model).exists():
        identity["model_sha256"] = model_sha256(folder)
    return identity


def check_output(options: GenerateOptions, fingerprint: dict, model: Path) -> None:
    """Claim --out for this bundle (continued only with the same options; never a folder the run reads)."""
    inputs = (options.maps, options.crop_bank, model, *local_paths(options.base_model))
    claim_launched(Claim(options.out, "generate", fingerprint, BUNDLE_OUTPUTS, (), inputs, options.overwrite))
    (options.out / WORK / "shards").mkdir(parents=True, exist_ok=True)


def checked_inputs(options: GenerateOptions, folder: Path):
    """The maps (entries, manifest), the model's config and the crop bank, each checked against the others: one
    line naming the file for the first that does not fit."""
    from htd_toolkit.models.htd_model import HTDConfig

    entries, maps_manifest = load_maps(options.maps, options.maps_split)
    config = HTDConfig.load(folder)
    check_same_names(config.classes, "the model", maps_manifest["classes"], str(options.maps))
    check_same_classes(config.class_fingerprint, f"model {options.model}", maps_manifest.get(FINGERPRINT),
                       f"maps {options.maps}")
    bank = crop_bank_for(config.crop_mode, options.crop_bank)
    if bank is not None:
        check_same_classes(config.class_fingerprint, f"model {options.model}", bank.fingerprint,
                           f"crop bank {bank.folder}")
        names = names_by_index(config.classes)
        for cls in sorted(needed_classes(entries, options.num_samples, config.max_crops)):
            bank.draw(cls, np.random.default_rng(0), names.get(cls))  # fails now, naming the class
    return entries, maps_manifest, config, bank


def maps_digest(maps: Path, split: str) -> str:
    """What names the maps in the bundle's options: a digest of their split's shard checksums (a folder may move
    or be renamed; other maps under the same path are another bundle, never continued into this one)."""
    checksums = sorted(record["sha256"] for record in split_shards(read_manifest(maps), split))
    return hashlib.sha256("\n".join(checksums).encode()).hexdigest()[:16]


def local_paths(name: str | None) -> tuple[Path, ...]:
    """`name` as a path when it names something on this machine (a base folder rather than a Hub id)."""
    return (Path(name),) if name and Path(name).exists() else ()


def needed_classes(entries: list[MapEntry], count: int, max_crops: int) -> set[int]:
    return {c for entry in entries[:count] for c in classes_present(entry.labels(), max_crops)}


def conditions_for(index: int, seed: int, entries: list[MapEntry], bank: CropBank | None, config,
                   names: dict[int, str]):
    """(map entry, labels, crops by class, crop records) of sample `index`."""
    entry = entries[index % len(entries)]
    labels = entry.labels()
    if labels.shape != (config.resolution, config.resolution):  # the model's resolution; labels stay labels
        labels = np.asarray(Image.fromarray(labels).resize((config.resolution,) * 2, Image.Resampling.NEAREST))
    classes = classes_present(labels, config.max_crops)
    if bank is None:
        return entry, labels, {}, [{"class": c, "key": "", "box": [0, 0, 0]} for c in classes]
    crops, records = bank.draw_crops(classes, np.random.default_rng(derive_seed(seed, "crops", index)), names)
    return entry, labels, crops, records


def job_shards(shards: int, job: tuple[int, int], rank: int, world: int) -> list[int]:
    """The shards this process makes: job I of N takes the I-th contiguous range of the shards (so its sample
    indices are a range too), and each process of its launch every world-th of those."""
    index, count = job
    first, last = index * shards // count, (index + 1) * shards // count
    return list(range(first + rank, last, world))


def generate_bundle(options: GenerateOptions, progress=None, stream=None) -> dict | None:
    """Generate (or finish) the bundle; returns the manifest on the main process when every shard is on this
    machine. With `stream` (a `publish.stream.HubStream`), shards are committed to the Hub as they finish and
    shards already committed there are not made again."""
    from htd_toolkit.models.htd_model import model_folder
    from htd_toolkit.models.pipeline import HTDPipeline

    options.check()
    if options.image_format not in FORMATS:
        raise UserError(f"unknown --image-format {options.image_format!r}: choose png, jpg or webp")
    folder = model_folder(options.model, options.revision)
    fingerprint = {**options.fingerprint(), **model_identity(options.model, folder, options.base_model),
                   "maps_sha256": maps_digest(options.maps, options.maps_split),
                   "crop_bank_sha256": crop_bank_sha256(options.crop_bank)}
    with given_back_if_stopped(options.out):
        check_output(options, fingerprint, folder)
        entries, maps_manifest, config, bank = checked_inputs(options, folder)
    names = names_by_index(config.classes)
    rank, world = process_share()
    shards = math.ceil(options.num_samples / options.shard_size)
    sizes = {s: min(options.shard_size, options.num_samples - s * options.shard_size) for s in range(shards)}
    mine = job_shards(shards, options.job, rank, world)
    header = manifest_header(options, config, maps_manifest, fingerprint)
    committed = stream.open(header, mine) if stream is not None else set()
    todo = [s for s in mine if s not in committed and not shard_done(options.out, s)]
    if stream is not None:
        stream.upload_finished([s for s in mine if s not in committed and s not in todo])
    if progress:
        progress(len(mine) - len(todo), total=len(mine))
    throughput_path(options.out, rank).unlink(missing_ok=True)  # no stale timing from an earlier run
    try:
        if todo:
            pipe = HTDPipeline.for_inference(folder, base_model=options.base_model, scheduler=options.scheduler)
            if options.compile:
                pipe.compile()
            timing = generate_shards(pipe, todo, sizes, entries, bank, names, options, fingerprint["model"],
                                     progress, stream)
            timing = replace(timing, process=rank, processes=world, shards=todo)
            write_json(throughput_path(options.out, rank), asdict(timing))
    finally:
        if stream is not None:
            stream.close()  # commits what is uploaded, also when generation stopped
    if world > 1:
        barrier()
        if rank != 0:
            return None
    if stream is not None and not all(shard_done(options.out, s) for s in sizes):
        return None  # the bundle is on the Hub; this machine holds a part of it
    return finish_manifest(options, header, sizes)


@dataclass
class Throughput:
    """Wall-clock of one process's generation: the first batch pays warm-up and compilation, the rest is steady."""

    images: int = 0
    batch_size: int = 0
    first_batch_images: int = 0
    first_batch_s: float = 0.0
    total_s: float = 0.0  # until the last shard is on disk
    process: int = 0  # which process of how many wrote which shards
    processes: int = 1
    shards: list[int] = field(default_factory=list)

    @property
    def steady_images_per_s(self) -> float | None:
        rest = self.images - self.first_batch_images
        return rest / (self.total_s - self.first_batch_s) if rest and self.total_s > self.first_batch_s else None

    def summary(self) -> str:
        line = f"{self.images} images in {self.total_s:.1f} s at batch size {self.batch_size}"
        if self.steady_images_per_s:
            line += (f": {self.steady_images_per_s:.2f} images/s after the first batch "
                     f"(first batch {self.first_batch_s:.1f} s, warm-up and compilation included)")
        return line


def generate_shards(pipe, todo: list[int], sizes: dict[int, int], entries, bank, names, options: GenerateOptions,
                    name: str, progress, stream=None) -> Throughput:
    """`run_shards` at --batch-size, or with --auto-batch-size at smaller ones after out-of-memory errors."""

    def generate_at(batch_size: int) -> Throughput:
        left = [shard for shard in todo if not shard_done(options.out, shard)]  # a retry skips finished ones
        return run_shards(pipe, left, sizes, entries, bank, names, replace(options, batch_size=batch_size), name,
                          progress, stream)

    try:
        if options.auto_batch_size:  # accelerate's helper: a smaller batch after each out-of-memory
            from accelerate.utils import find_executable_batch_size

            return find_executable_batch_size(generate_at, starting_batch_size=options.batch_size)()
        return generate_at(options.batch_size)
    except torch.OutOfMemoryError as err:
        raise UserError(f"out of GPU memory at --batch-size {options.batch_size}: lower it (or add "
                        "--auto-batch-size); finished shards are kept and the same command resumes after them") from err
    except RuntimeError as err:
        if "No executable batch size found" not in str(err):
            raise
        raise UserError("out of GPU memory even at batch size 1; finished shards are kept") from err


def throughput_path(out: Path, rank: int = 0) -> Path:
    return out / WORK / f"throughput-{rank}.json"


def read_throughput(out: Path, rank: int = 0) -> Throughput | None:
    """The last run's timing of process `rank`, or None when it generated nothing."""
    path = throughput_path(out, rank)
    return Throughput(**json.loads(path.read_text())) if path.exists() else None


def shard_done(out: Path, shard: int) -> bool:
    """A recorded shard whose file is there at its recorded size. Shards only appear complete (written
    under a temporary name, then renamed), so this needs no re-hash; `push` verifies the sha256s."""
    record, path = record_path(out, shard), shard_path(out, shard)
    if not (record.exists() and path.exists()):
        return False
    return json.loads(record.read_text()).get("size") == path.stat().st_size


def batch_plan(todo: list[int], sizes: dict[int, int], shard_size: int, batch_size: int) -> list[tuple[int, list[int]]]:
    """(shard, sample indices) of every batch, in order; a batch never spans two shards."""
    plan = []
    for shard in todo:
        indices = list(range(shard * shard_size, shard * shard_size + sizes[shard]))
        plan += [(shard, indices[first:first + batch_size]) for first in range(0, len(indices), batch_size)]
    return plan


def run_shards(pipe, todo: list[int], sizes: dict[int, int], entries, bank, names, options: GenerateOptions,
               name: str, progress, stream=None) -> Throughput:
    """Denoise batch after batch; the next batch's maps and crops are read on a thread meanwhile, and
    finished images are encoded and written by the shard writer's thread (and handed to `stream`'s uploader,
    which may hold a shard's first batch until the local disk has room)."""
    config = pipe.htd_config
    plan = batch_plan(todo, sizes, options.shard_size, options.batch_size)

    def prepare(batch: list[int]):
        items = [conditions_for(i, options.seed, entries, bank, config, names) for i in batch]
        return items, pipe.conditioning([labels for _, labels, _, _ in items], [crops for _, _, crops, _ in items])

    writer = ShardWriter(options.out, options.image_format, sizes, on_written=stream.add if stream else None,
                         grid_keys=frozenset(f"syn-{i:08d}" for i in range(min(GRID_SAMPLES, options.num_samples))))
    timing, began = Throughput(batch_size=options.batch_size), time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="htd-conditions") as reader:
            upcoming = reader.submit(prepare, plan[0][1]) if plan else None
            for step, (shard, batch) in enumerate(plan):
                items, cond = upcoming.result()
                if stream is not None and (step == 0 or plan[step - 1][0] != shard):
                    stream.wait_for_room()
                if step + 1 < len(plan):
                    upcoming = reader.submit(prepare, plan[step + 1][1])
                seeds = [sample_seed(options.seed, i) for i in batch]
                images = pipe(conditioning=cond, generator=pipe.seeded(seeds), num_inference_steps=options.steps,
                              guidance_scale=options.guidance, keep_glass=options.keep_glass, output_type="np").images
                if not timing.images:
                    timing.first_batch_images, timing.first_batch_s = len(batch), time.perf_counter() - began
                timing.images += len(batch)
                writer.put(shard, [(f"syn-{i:08d}", image, labels,
                                    sample_meta(entry, labels, records, seed, options, config, name))
                                   for i, image, (entry, labels, _, records), seed
                                   in zip(batch, images, items, seeds, strict=True)])
                if progress and (step + 1 == len(plan) or plan[step + 1][0] != shard):
                    progress(1)
    finally:
        writer.close()
    timing.total_s = time.perf_counter() - began
    return timing


def sample_meta(entry: MapEntry, labels: np.ndarray, crops: list[dict], seed: int, options: GenerateOptions, config,
                name: str) -> dict:
    meta = entry.meta
    return {"source": "synthetic", "slide": meta.get("slide", ""), "x": meta.get("x", 0), "y": meta.get("y", 0),
            "level0_size": meta.get("level0_size", 0), "mpp": meta.get("mpp", 0.0),
            "class_fractions": class_fractions(labels, len(config.classes)), "seed": seed, "steps": options.steps,
            "guidance": float(options.guidance), "crop_mode": config.crop_mode, "model": name,
            "map_key": entry.key, "crops": crops}


def bundle_stats(records: list[dict], classes: list[dict]) -> dict:
    """Per-class pixel fractions and presence over the generated samples, and the dominant-class histogram,
    added up from the shards' records (in shard order, so any set of machines gets the same numbers)."""
    count = sum(record["samples"] for record in records)
    stats = [record["stats"] for record in records]
    sums = np.sum([s["fraction_sums"] for s in stats], axis=0)
    present = np.sum([s["present_in"] for s in stats], axis=0)
    counts = np.sum([s["dominant_counts"] for s in stats], axis=0)
    edges = np.linspace(0.0, 1.0, DOMINANT_BINS + 1)
    return {
        "per_class": [{"index": c["index"], "name": c["name"], "mean_fraction": round(float(sums[k] / count), 4),
                       "present_in": int(present[k])} for k, c in enumerate(classes)],
        "dominant_fraction_histogram": {"edges": [round(float(e), 2) for e in edges],
                                        "counts": [int(n) for n in counts]},
    }


def manifest_header(options: GenerateOptions, config, maps_manifest: dict, fingerprint: dict) -> dict:
    """Everything in the manifest but the shards and what is added up from them."""
    source = maps_manifest.get("source", {})
    return {
        "toolkit_version": __version__,
        "source": {"name": "htd-synthetic", "license": options.license or source.get("license", "other"),
                   "model": fingerprint["model"], "base_model": config.base_model,
                   "maps": {"name": source.get("name"), "split": options.maps_split},
                   "source_datasets": [source["name"]] if source.get("name") else []},
        "classes": config.classes,
        **({FINGERPRINT: config.class_fingerprint} if config.class_fingerprint else {}),
        "config": {**fingerprint, "crop_mode": config.crop_mode, "batch_size": options.batch_size},
    }


def bundle_manifest(header: dict, records: list[dict]) -> dict:
    """The manifest of the shards `records` name (all of them: the bundle's; fewer: what a repo holds so far)."""
    return {**header, "splits": {"train": sum(record["samples"] for record in records)}, "shards": records,
            "stats": bundle_stats(records, header["classes"])}


def finish_manifest(options: GenerateOptions, header: dict, sizes: dict[int, int]) -> dict:
    missing = [s for s in sizes if not shard_done(options.out, s)]
    if missing:
        raise UserError(f"{options.out}: {len(missing)} shard(s) are not finished; run the same command again")
    manifest = bundle_manifest(header, [json.loads(record_path(options.out, s).read_text()) for s in sorted(sizes)])
    for name in (ID2LABEL, MANIFEST):
        record_written(options.out, options.out / name)
    write_id2label(options.out, manifest["classes"])
    write_manifest(options.out, manifest)
    return manifest
