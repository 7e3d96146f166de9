"""Options several `htd-toolkit` commands share, declared once with one help text each (the pattern of
tiatoolbox's cli/common.py): a command lists `mpp: MppOption = 0.5` and gets the same flag and help
as every other command that takes it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from htd_toolkit.generate import GENERATION_FLAGS
from htd_toolkit.models import MAX_GUIDANCE_SCALE

SlidesOption = Annotated[list[Path], typer.Option("--slides", help="Slide files or folders of slides.")]
DatasetOutOption = Annotated[Path, typer.Option("--out", help="Dataset folder (embeddings, clusters, shards).")]
EncoderOption = Annotated[str, typer.Option(help="NAME[:CHECKPOINT], e.g. uni, uni:/path/ckpt.bin, stain-stats.")]
MppOption = Annotated[float, typer.Option(help="Target resolution, µm per pixel.")]
PatchSizeOption = Annotated[int, typer.Option(help="Patch side in pixels at --mpp.")]
TileSizeOption = Annotated[int, typer.Option(help="Tile side for the encoder, pixels at --mpp.")]
MinFractionOption = Annotated[float, typer.Option(help="Each of ≥ 2 tissue classes covers at least this share of "
                                                       "the tissue.")]
MaxFractionOption = Annotated[float, typer.Option(help="The dominant tissue class covers at most this share of the "
                                                       "tissue.")]
MinTissueOption = Annotated[float, typer.Option(help="Minimum tissue share of a patch.")]
StrideOption = Annotated[int | None, typer.Option(help="Grid stride in pixels at --mpp (default: the patch size).")]
SplitOption = Annotated[str, typer.Option(help="train,validation,test ratios, by slide.")]
ShardSizeOption = Annotated[int, typer.Option(help="Samples per shard.")]
SeedOption = Annotated[int, typer.Option(help="Random seed: the same seed and options give the same bytes.")]
WorkersOption = Annotated[int, typer.Option(help="Slides processed in parallel.")]
KeepGoingOption = Annotated[bool, typer.Option("--keep-going", help="Finish the other slides when one fails.")]
SlideShardOption = Annotated[str | None, typer.Option(help="INDEX/COUNT: process only this share of the slides.")]
NumClustersOption = Annotated[int, typer.Option("--num-clusters", "--k", help="Tissue types (k-means clusters).")]
PerSlideOption = Annotated[int, typer.Option(help="Tiles a slide gives to the k-means fit sample.")]
HierarchicalOption = Annotated[bool, typer.Option("--hierarchical", help="Split high-variance clusters.")]
KeepGlassOption = Annotated[bool, typer.Option(
    "--keep-glass/--no-keep-glass",
    help="Keep the map's background (class 0) real glass: tiles of the model's glass bank (its training "
         "slides' background), pasted at the mask after decoding; the tissue is the model's own (opt-in, "
         "docs/fidelity.md §4); the default leaves it to the model, which may paint tissue there.")]
CentroidsOption = Annotated[Path | None, typer.Option(
    help="Assign with these centroids (another run's clusters/centroids.safetensors) instead of fitting: new "
         "slides get the same tissue-type ids as that run's data and models.")]
BatchSizeOption = Annotated[int, typer.Option(help="Images per batch.")]
# generate and generate-slide: named as HTDPipeline names them (the old flags stay as aliases)
ModelOption = Annotated[str, typer.Option(help="HTD model folder or Hub repo id.")]
RevisionOption = Annotated[str | None, typer.Option(help="Model revision on the Hub.")]
BaseModelOption = Annotated[str | None, typer.Option(help="Base folder for a model trained on a local base.")]
CropBankOption = Annotated[Path | None, typer.Option(help="A prepared folder's crop_bank/.")]
NumInferenceStepsOption = Annotated[int, typer.Option(*(GENERATION_FLAGS[0], "--steps"),
                                                      help="Denoising steps (the pipeline's num_inference_steps).")]
GuidanceScaleOption = Annotated[float, typer.Option(
    *(GENERATION_FLAGS[1], "--guidance"),
    help=f"Classifier-free guidance on the crops (the pipeline's guidance_scale, 0 to {MAX_GUIDANCE_SCALE:g}; 1: none).")]
PublicOption = Annotated[bool, typer.Option("--public", help="Make pushed repos public (default private).")]
CropSizeOption = Annotated[str | None, typer.Option(
    help="MIN,MAX crop-bank crop sides in pixels at --mpp (default: the paper's 50,200 at 512 px, scaled to "
         "--patch-size).")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Write into an --out that holds files this "
                                             "command did not write (they may be replaced or removed).")]
DatasetNameOption = Annotated[str | None, typer.Option(
    help="Source dataset name for the manifest and the cards (e.g. TCGA-BRCA; default: the annotation format's).")]
LicenseOption = Annotated[str | None, typer.Option(
    help="Licence id of the source data, as the Hub spells it (e.g. cc-by-4.0); it goes into the cards.")]
