"""Push a synthetic slide set (`generate-slide`'s slide, mask, regions, provenance, thumbnail) as a dataset repo
with a card. Only those files are uploaded, never the work folder or anything else beside the slide."""

from __future__ import annotations

import json
from pathlib import Path

from htd_toolkit.data.slide_files import SlideFiles
from htd_toolkit.errors import UserError


def slide_card(files: SlideFiles, provenance: dict) -> str:
    width, height = provenance["size"]
    model = provenance["options"]["model"]
    classes = ", ".join(f"{c['index']} {c['name']}" for c in provenance["classes"])
    rows = [f"| `{files.image.name}` | the synthetic slide: tiled pyramidal TIFF, {provenance['mpp']} µm/px at level 0 |",
            f"| `{files.mask.name}` | its class ids, a pyramid aligned pixel for pixel (level k = level 0 every 2^k px) |",
            f"| `{files.regions.name}` | the regions as GeoJSON polygons in level-0 pixels (QuPath: File › Import objects) |",
            f"| `{files.provenance.name}` | provenance: model, map checksum, every crop, seeds, options |",
            f"| `{files.thumbnail.name}` | the slide beside its map |"]
    return "\n".join([
        "---", "license: other", "tags:", "- synthetic", "- histopathology", "- whole-slide-image", "- htd-toolkit",
        "---", "", f"# Synthetic whole-slide image ({width} x {height} px)", "",
        f"Made by htd-toolkit `generate-slide` with the model `{model}` from a class map: "
        "the mask is the map itself, exact by construction. It is synthetic tissue, not a patient's slide; "
        "how realistic it is depends on the model.", "",
        f"![slide beside its map]({files.thumbnail.name})", "",
        "| file | what it holds |", "|---|---|", *rows, "",
        f"Classes: {classes}. Windows of {provenance['windows']['side']} px overlapping by "
        f"{provenance['windows']['overlap']} px, {provenance['windows']['denoised']} of {provenance['windows']['all']} "
        f"denoised (the rest is background); {provenance['options']['steps']} DDIM steps, guidance "
        f"{provenance['options']['guidance']}, seed {provenance['options']['seed']}.", ""])


def push_slide(out: Path, repo_id: str, public: bool = False, token: str | None = None) -> str:
    """Upload the slide set and its card in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from htd_toolkit.publish.hub import hub_reason, open_repo, report_visibility, with_retries

    files = SlideFiles(Path(out))
    missing = [p.name for p in files.outputs() if not p.is_file()]
    if missing:
        raise UserError(f"{out}: not a finished slide set (missing {', '.join(missing)})")
    provenance = json.loads(files.provenance.read_text())
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=p) for p in files.outputs()]
    operations.append(CommitOperationAdd(path_in_repo="README.md",
                                         path_or_fileobj=slide_card(files, provenance).encode()))
    api = HfApi(token=token)
    try:
        visibility = open_repo(api, repo_id, "dataset", public)
        commit = with_retries(lambda: api.create_commit(repo_id, operations, repo_type="dataset",
                                                        commit_message="Upload synthetic slide"),
                              f"upload to {repo_id}")
    except HfHubHTTPError as err:
        raise UserError(f"push to {repo_id} failed: {hub_reason(err)}") from err
    report_visibility(repo_id, "dataset", visibility, public)
    return getattr(commit, "commit_url", str(commit))
