"""`htd-toolkit demo`: the whole user path offline on the CC0 sample slide, in well under a minute.

sample slide → pyramidal TIFF → Camelyon16-style annotations drawn on it → prepare → the toy H&E
base shipped in the package → a few training steps → a small bundle with its card → `load_dataset`
on it (→ push, when asked). The base was trained from scratch on this one slide (docs/fidelity.md):
its images are H&E-coloured tissue-like patches, not realistic tissue.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from htd_toolkit.data.outputs import claim_output
from htd_toolkit.errors import UserError
from htd_toolkit.terminal import console

# Tumour polygons over the CC0 skin slide's tissue (level-0 pixels): a rectangle with a hole, and a triangle.
SLIDE_NAME = "CMU-1-Small-Region"  # the CC0 sample slide both demo slides are cut from
TUMOUR_XML = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
<Annotation Name="tumour 1" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58"><Coordinates>
<Coordinate Order="0" X="1000" Y="1000"/><Coordinate Order="1" X="1600" Y="1000"/>
<Coordinate Order="2" X="1600" Y="1900"/><Coordinate Order="3" X="1000" Y="1900"/></Coordinates></Annotation>
<Annotation Name="normal island" Type="Polygon" PartOfGroup="_2" Color="#64FE2E"><Coordinates>
<Coordinate Order="0" X="1200" Y="1300"/><Coordinate Order="1" X="1400" Y="1300"/>
<Coordinate Order="2" X="1400" Y="1500"/><Coordinate Order="3" X="1200" Y="1500"/></Coordinates></Annotation>
<Annotation Name="tumour 2" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58"><Coordinates>
<Coordinate Order="0" X="900" Y="2300"/><Coordinate Order="1" X="1500" Y="2200"/>
<Coordinate Order="2" X="1300" Y="2800"/></Coordinates></Annotation>
</Annotations><AnnotationGroups/></ASAP_Annotations>
"""


def step(message: str) -> None:
    console.print(f"[bold]demo[/bold] {message}")


def run_demo(out: Path, push_to_hub: str | None = None, public: bool = False, samples: int = 16,
             unannotated: bool = False) -> dict[str, Path]:
    from datasets import load_dataset

    from htd_toolkit.base.shipped import shipped_base
    from htd_toolkit.recipes.train_controlnet import main as train
    from htd_toolkit.recipes.train_controlnet import training_args
    from htd_toolkit.wsi.pyramid import write_slide_region
    from htd_toolkit.wsi.sample_slide import sample_slide_path

    out = Path(out)
    paths = {name: out / name for name in ("slides", "annotations", "prepared", "model", "bundle")}
    claim_output(out, "the demo", (*(f"{name}/*" for name in paths), ".datasets-cache/*"))
    for name in ("slides", "annotations"):
        paths[name].mkdir(parents=True, exist_ok=True)
    step("fetching the CC0 sample slide (CMU-1-Small-Region.svs)")
    slide = sample_slide_path()
    step("writing it as a 4-level pyramidal TIFF" + ("" if unannotated else " and drawing tumour annotations on it"))
    for index in (1, 2):  # two slides, so that the split by slide gives train and validation
        target = paths["slides"] / f"skin_00{index}.tif"
        if not target.exists():
            write_slide_region(slide, target)
        (paths["annotations"] / f"skin_00{index}.xml").write_text(TUMOUR_XML)
    prepare(paths, unannotated)
    step("training LoRA + ControlNet + crop adapter for a few steps on the toy H&E base shipped in the package "
         "(the demo cannot download a real one)")
    shutil.rmtree(paths["model"], ignore_errors=True)
    _ok(train(training_args("demo", pretrained_model_name_or_path=str(shipped_base()),
                            train_data_dir=str(paths["prepared"]), output_dir=str(paths["model"]),
                            report_to="tensorboard")), "training")
    step(f"generating a bundle of {samples} images with masks and a dataset card")
    generate(paths, samples, push_to_hub, public)
    step("loading the bundle back with datasets.load_dataset")
    # its own cache: datasets keys local folders by their card, so another bundle's cache could answer
    rows = load_dataset(str(paths["bundle"]), split="train", cache_dir=str(out / ".datasets-cache"))
    step(f"{len(rows)} rows, columns {', '.join(rows.column_names)}")
    return paths


def prepare(paths: dict[str, Path], unannotated: bool) -> None:
    """64-px patches at 1 µm/px of the two slides (one train, one validation) and the crop bank."""
    from htd_toolkit.patches.annotated import PrepareOptions, prepare_annotated
    from htd_toolkit.patches.extract import ExtractConfig
    from htd_toolkit.patches.unannotated import UnannotatedOptions, prepare_unannotated
    from htd_toolkit.terminal import print_prepare_report, slide_progress

    options = PrepareOptions(slides=[paths["slides"]], annotations=paths["annotations"], out=paths["prepared"],
                             extract=ExtractConfig(format="pseudo" if unannotated else "camelyon16", mpp=1.0,
                                                   patch_size=64, stride=32), split=(0.5, 0.5, 0.0),
                             dataset_name=SLIDE_NAME, license="cc0-1.0")
    with slide_progress() as progress:
        if unannotated:
            step("prepare unannotated: tile embeddings (stain-stats) → k-means (k = 3) → pseudo-semantic maps")
            options.annotations = paths["prepared"]
            report = prepare_unannotated(UnannotatedOptions(prepare=options, encoder="stain-stats", k=3,
                                                            tile_size=16), progress_factory=progress)
        else:
            step("prepare: heterogeneous patches (20–80 % tumour over tissue) and the crop bank")
            report = prepare_annotated(options, progress)
    print_prepare_report(report, paths["prepared"])
    if report.failures:
        raise UserError(f"the demo's prepare step failed: {report.failures[0]}")


def generate(paths: dict[str, Path], samples: int, push_to_hub: str | None, public: bool) -> None:
    from htd_toolkit.generate.bundle import GenerateOptions, generate_bundle
    from htd_toolkit.publish.dataset import push_bundle, write_card
    from htd_toolkit.terminal import shard_progress

    options = GenerateOptions(model=str(paths["model"]), maps=paths["prepared"],
                              crop_bank=paths["prepared"] / "crop_bank", num_samples=samples, out=paths["bundle"],
                              batch_size=8, steps=10, shard_size=8)
    with shard_progress() as progress:
        manifest = generate_bundle(options, progress)
    write_card(paths["bundle"], manifest)
    if push_to_hub:
        for kind, url in push_bundle(paths["bundle"], push_to_hub, public=public, model=str(paths["model"])).items():
            step(f"pushed the {kind}: {url}")


def _ok(code: int, what: str) -> None:
    if code != 0:
        raise UserError(f"the demo's {what} step failed (exit status {code})")


NEXT_STEPS = """
Next, with a real base and your slides:
  htd-toolkit prepare annotated --slides SLIDES/ --annotations XML/ --format camelyon16 --out data/camelyon16-htd
  accelerate launch -m htd_toolkit.recipes.train_controlnet --config camelyon16 \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5
  htd-toolkit generate --model models/htd-camelyon16 --maps data/camelyon16-htd \\
      --crop-bank data/camelyon16-htd/crop_bank --num-samples 10000 --out bundle/ --push-to-hub ORG/NAME
"""


def print_summary(paths: dict[str, Path]) -> None:
    console.print("\n[bold]demo finished[/bold] (toy H&E base trained on one CC0 slide: H&E-coloured, not realistic)")
    for name, label in (("prepared", "prepared patches"), ("model", "model folder"), ("bundle", "bundle")):
        console.print(f"  {label:17s} {paths[name]}")
    console.print(f"  {'validation grids':17s} {paths['model'] / 'validation'}")
    console.print(f"  {'sample grid':17s} {paths['bundle'] / 'assets' / 'sample_grid.png'}")
    console.print(f"  {'tensorboard':17s} tensorboard --logdir {paths['model'] / 'logs'}")
    console.print(NEXT_STEPS, highlight=False)
