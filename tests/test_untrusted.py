"""Dataset folders may come from anyone: their manifests' shard paths are checked before any reader opens them."""

import gzip
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from htd_toolkit.errors import UserError


def hostile_copy(prepared: Path, tmp_path: Path, path: str) -> Path:
    folder = tmp_path / "hostile"
    shutil.copytree(prepared, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["path"] = path
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def readers():
    from htd_toolkit.data.folder import read_manifest
    from htd_toolkit.data.sources import load_maps
    from htd_toolkit.evaluate.sets import load_set
    from htd_toolkit.models.training_data import TrainingStream
    from htd_toolkit.publish.contents import folder_kind
    from htd_toolkit.publish.dataset import verify_bundle

    return {
        "training": lambda f: next(iter(TrainingStream(f, 64, 2, 32, "adapter", shuffle_buffer=1))),
        "evaluate": lambda f: load_set(f, "train"),
        "generate maps": lambda f: load_maps(f, "train"),
        "push": lambda f: (folder_kind(f), verify_bundle(f, read_manifest(f))),
    }


@pytest.mark.parametrize("reader", ["training", "evaluate", "generate maps", "push"])
@pytest.mark.parametrize("path, message", [
    ("pipe:touch {marker}; cat data/train-00000.tar", "not a plain relative path"),
    ("https://example.org/train-00000.tar", "not a plain relative path"),
    ("../outside.tar", "not a plain relative path"),
    ("/etc/passwd", "not a plain relative path"),
    ("data/link.tar", "leads out of the folder"),
    ("data/train-00000.tar.gz", "compressed"),
])
def test_hostile_shard_paths_are_refused_by_every_reader(prepared, tmp_path, reader, path, message):
    marker = tmp_path / "pwned"
    folder = hostile_copy(prepared, tmp_path, path.format(marker=marker))
    (tmp_path / "outside.tar").write_bytes((folder / "data" / "train-00000.tar").read_bytes())
    (folder / "data" / "link.tar").symlink_to(tmp_path / "outside.tar")
    (folder / "data" / "train-00000.tar.gz").write_bytes(gzip.compress((folder / "data" / "train-00000.tar").read_bytes()))
    with pytest.raises(UserError, match=message) as raised:
        readers()[reader](folder)
    assert str(folder / "manifest.json") in str(raised.value) and "\n" not in str(raised.value)
    assert not marker.exists()


def test_recipe_refuses_a_pipe_shard_in_one_line(prepared, tmp_path, capsys, tiny_base):
    from htd_toolkit.recipes.train_controlnet import cli as train

    marker = tmp_path / "pwned"
    folder = hostile_copy(prepared, tmp_path, f"pipe:touch {marker}; cat data/train-00000.tar")
    code = train(["--pretrained_model_name_or_path", str(tiny_base), "--train_data_dir", str(folder),
                  "--output_dir", str(tmp_path / "model"), "--resolution", "64", "--max_train_steps", "1",
                  "--report_to", "none", "--dataloader_num_workers", "0", "--validation_steps", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "not a plain relative path" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def test_the_recipe_refuses_a_push_into_a_public_repo_before_training(prepared, tmp_path, capsys, monkeypatch,
                                                                      tiny_base):
    from htd_toolkit.recipes.train_controlnet import cli as train
    from huggingface_hub import HfApi

    from htd_toolkit.testing.hubserver import USER_TOKEN

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    HfApi(token=USER_TOKEN).create_repo("user/open-model", private=False)
    code = train(["--pretrained_model_name_or_path", str(tiny_base), "--train_data_dir", str(prepared),
                  "--output_dir", str(tmp_path / "model"), "--resolution", "64", "--max_train_steps", "1",
                  "--push_to_hub", "--hub_model_id", "user/open-model"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "user/open-model is a public model repo: pass --public to push into it" in err
    assert not (tmp_path / "model" / "htd_config.json").exists()


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<ASAP_Annotations><Annotations><Annotation Name="&lol4;" Type="Polygon" PartOfGroup="Tumor"><Coordinates>
<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="9" Y="0"/><Coordinate Order="2" X="9" Y="9"/>
</Coordinates></Annotation></Annotations></ASAP_Annotations>"""


def camelyon_xml(x: str) -> str:
    return ('<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="Tumor"><Coordinates>'
            f'<Coordinate Order="0" X="{x}" Y="0"/><Coordinate Order="1" X="9" Y="0"/>'
            '<Coordinate Order="2" X="9" Y="9"/></Coordinates></Annotation></Annotations></ASAP_Annotations>')


@pytest.mark.parametrize("text, message", [(BILLION_LAUGHS, "declares entities"),
                                           (camelyon_xml("nan"), "non-finite or absurd"),
                                           (camelyon_xml("1e300"), "non-finite or absurd")])
def test_hostile_camelyon_xml_is_refused_in_one_line(tmp_path, text, message):
    from htd_toolkit.annotations.base import AnnotationError
    from htd_toolkit.annotations.camelyon16 import Camelyon16XML

    path = tmp_path / "tumor_001.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message) as raised:
        Camelyon16XML(path)
    assert str(raised.value).startswith("tumor_001.xml: ") and "\n" not in str(raised.value)


def test_killing_prepare_leaves_no_worker_running(prepared, cc0_pyramid, tmp_path):
    """kill -9 of `prepare --workers 2` once its workers run: they end with it (no orphans extracting)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.annotation_files import write_camelyon16

    (tmp_path / "slides").mkdir()
    (tmp_path / "ann").mkdir()
    for index in range(6):
        shutil.copy(cc0_pyramid, tmp_path / "slides" / f"tumor_00{index}.tif")
        write_camelyon16(tmp_path / "ann", f"tumor_00{index}")
    cmd = [sys.executable, "-m", "htd_toolkit.cli", "prepare", "annotated", "--slides", str(tmp_path / "slides"),
           "--annotations", str(tmp_path / "ann"), "--format", "camelyon16", "--out", str(tmp_path / "out"),
           "--mpp", "0.5", "--patch-size", "64", "--stride", "16", "--workers", "2"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 120, []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = [p for p in psutil.Process(parent.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        time.sleep(0.2)
    assert len(workers) == 2, "the workers did not start"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]


def folder_state(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def test_a_prepared_folder_is_pushed_only_when_asked_as_a_private_training_dataset(prepared, tmp_path, capsys,
                                                                                  monkeypatch, hf_cache, hub):
    from datasets import load_dataset
    from huggingface_hub import HfApi

    from htd_toolkit.testing.hubserver import USER_TOKEN
    from tests.helpers import run_cli

    folder = tmp_path / "prepared"
    shutil.copytree(prepared, folder)
    before = folder_state(folder)
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    code, _, err = run_cli(["push", str(folder), "user/prepared-by-mistake"], capsys)
    assert code == 1 and "prepared training data (real patches), not a synthetic bundle" in err
    assert err.count("\n") == 1 and folder_state(folder) == before
    api = HfApi(token=USER_TOKEN)
    assert not api.repo_exists("user/prepared-by-mistake", repo_type="dataset")

    code, _, err = run_cli(["push", str(folder), "user/training-data", "--training-data"], capsys)
    assert code == 0, err
    assert api.dataset_info("user/training-data").private is True
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = {s["path"] for s in manifest["shards"] + manifest["crop_bank"]}
    files = set(api.list_repo_files("user/training-data", repo_type="dataset")) - {".gitattributes"}
    assets = {p.relative_to(folder).as_posix() for p in (folder / "assets").glob("*.png")}
    assert files == {"README.md", "manifest.json", "id2label.json"} | shards | assets
    assert not (folder / "README.md").exists()  # the card was made for the upload, the folder is unchanged
    rows = load_dataset("user/training-data", split="validation", token=USER_TOKEN, cache_dir=str(hf_cache))
    assert len(rows) == manifest["splits"]["validation"] and set(rows.column_names) >= {"png", "mask.png", "json"}


def test_training_data_goes_into_a_public_repo_only_with_an_explicit_public(prepared, tmp_path, capsys, monkeypatch,
                                                                           hub):
    from huggingface_hub import HfApi

    from htd_toolkit.testing.hubserver import USER_TOKEN
    from tests.helpers import run_cli

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    api = HfApi(token=USER_TOKEN)
    api.create_repo("user/open-data", repo_type="dataset", private=False)
    code, _, err = run_cli(["push", str(prepared), "user/open-data", "--training-data"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert ("user/open-data is a public dataset repo: pass --public to push into it, or make it private on the "
            "Hub first (the folder holds real patient-derived patches)") in err
    assert api.list_repo_files("user/open-data", repo_type="dataset") == [".gitattributes"]
    code, _, err = run_cli(["push", str(prepared), "user/open-data", "--training-data", "--public"], capsys)
    assert code == 0 and "user/open-data: a public dataset repo" in err
    assert "manifest.json" in api.list_repo_files("user/open-data", repo_type="dataset")


def hostile_hub_dataset(hub, prepared: Path, repo_id: str, *names: str, repo_type: str = "dataset",
                        allow_patterns=("manifest.json", "id2label.json", "data/*", "crop_bank/*")) -> None:
    """`prepared` as a Hub repo that also holds files under `names`, as a hostile Hub could list them (the test
    server itself refuses such paths in a commit)."""
    from huggingface_hub import HfApi

    from htd_toolkit.testing.hubserver import USER_TOKEN

    api = HfApi(token=USER_TOKEN)
    api.create_repo(repo_id, repo_type=repo_type)
    api.upload_folder(folder_path=prepared, repo_id=repo_id, repo_type=repo_type, allow_patterns=list(allow_patterns))
    state = hub.state
    with state.lock:
        meta = state.load_meta(repo_type, repo_id)
        tree = dict(meta["commits"][meta["refs"]["main"]]["tree"])
        tree.update({name: state.tree_entry(b"written outside", lfs=False) for name in names})
        state.add_commit(meta, "main", tree, "hostile names", "user")
        state.save_meta(repo_type, repo_id, meta)


HOSTILE_NAMES = ("../../x", "data/../../../y")


def test_a_hub_training_dataset_with_a_path_out_of_the_cache_is_one_line(prepared, tmp_path, capsys, monkeypatch,
                                                                           hub, tiny_base):
    from htd_toolkit.recipes.train_controlnet import cli as train

    from htd_toolkit.testing.hubserver import USER_TOKEN

    hostile_hub_dataset(hub, prepared, "user/hostile-training", *HOSTILE_NAMES)
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    monkeypatch.setenv("HTD_CACHE", str(tmp_path / "deep" / "cache"))
    code = train(["--pretrained_model_name_or_path", str(tiny_base), "--dataset_name", "user/hostile-training",
                  "--output_dir", str(tmp_path / "model"), "--resolution", "64", "--max_train_steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "user/hostile-training: the repo holds a file named '../../x', not a plain relative path" in err
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert not written & {"x", "y", "manifest.json"}  # nothing downloaded, nothing outside the cache


def test_evaluate_refuses_a_hub_set_with_a_path_out_of_the_cache(prepared, hub):
    from htd_toolkit.evaluate.sets import load_set

    hostile_hub_dataset(hub, prepared, "user/hostile-eval", *HOSTILE_NAMES)
    with pytest.raises(UserError) as raised:
        load_set("user/hostile-eval", "train")
    assert str(raised.value) == ("user/hostile-eval: the repo holds a file named '../../x', not a plain relative "
                                 "path; refused before downloading anything")


def test_a_hub_model_repo_with_a_path_out_of_the_cache_is_one_line(model_dir, hub, monkeypatch):
    from htd_toolkit.models.htd_model import model_folder
    from htd_toolkit.testing.hubserver import USER_TOKEN

    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    hostile_hub_dataset(hub, model_dir, "user/hostile-model", *HOSTILE_NAMES, repo_type="model", allow_patterns=("*",))
    with pytest.raises(UserError) as raised:
        model_folder("user/hostile-model")
    assert str(raised.value) == ("user/hostile-model: the repo holds a file named '../../x', not a plain relative "
                                 "path; refused before downloading anything")


def prepare_args(prepared: Path, out: Path, *extra: str) -> list[str]:
    root = prepared.parent
    return ["prepare", "annotated", "--slides", str(root / "slides"), "--annotations", str(root / "ann"),
            "--format", "camelyon16", "--out", str(out), "--mpp", "2.0", "--patch-size", "128", "--stride", "64",
            "--split", "0.5,0.5,0", *extra]


def test_prepare_never_deletes_or_overwrites_files_it_did_not_write(prepared, tmp_path, capsys):
    from tests.helpers import run_cli

    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    assert run_cli(prepare_args(prepared, out), capsys)[0] == 0  # its own folder: resumed, nothing refused
    strays = {"data/my_precious.tar": b"mine", "data/train-00007.tar": b"also mine",
              "crop_bank/c009-00000.tar.bak": b"backup"}
    for name, data in strays.items():
        (out / name).write_bytes(data)
    before = folder_state(out)
    code, _, err = run_cli(prepare_args(prepared, out), capsys)
    assert code == 1 and err.count("\n") == 1 and "holds files prepare annotated did not write" in err
    assert "data/my_precious.tar" in err and "--overwrite" in err
    assert folder_state(out) == before

    code, _, err = run_cli(prepare_args(prepared, out, "--overwrite"), capsys)
    assert code == 0, err
    assert not any((out / name).exists() for name in strays)  # asked for: its own names are replaced
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((prepared / "manifest.json").read_text())["shards"]


def test_a_shard_written_before_a_kill_is_known_as_prepares_own(prepared, tmp_path, capsys):
    """A run killed while assembling leaves complete shards and no new manifest: they are in the journal,
    so the resumed run is not refused."""
    from tests.helpers import run_cli

    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    (out / "manifest.json").unlink()
    assert (out / "data" / "train-00000.tar").exists()
    code, _, err = run_cli(prepare_args(prepared, out), capsys)
    assert code == 0, err
    (out / ".work" / "written.txt").unlink()
    (out / "manifest.json").unlink()
    code, _, err = run_cli(prepare_args(prepared, out), capsys)
    assert code == 1 and "data/train-00000.tar" in err  # without the journal it would not be


@pytest.mark.parametrize("command", ["unannotated", "embed", "cluster", "pseudo-maps"])
def test_unannotated_stages_refuse_a_foreign_out(tmp_path, capsys, sample_slide, command):
    from tests.helpers import run_cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"years of work")
    args = ["prepare", "unannotated"] if command == "unannotated" else [command]
    code, _, err = run_cli([*args, "--slides", str(sample_slide), "--out", str(out)], capsys)
    assert code == 1 and err.count("\n") == 1 and "holds files prepare unannotated did not write (thesis.docx)" in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx"]


@pytest.mark.parametrize("case", ["file", "read-only"])
def test_out_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys, sample_slide, case):
    import os

    from tests.helpers import run_cli

    out = tmp_path / "out"
    if case == "file":
        out.write_text("a file")
    else:
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):  # root writes anywhere a mode allows: use a read-only file system
            out = Path("/sys/htd-toolkit-test-out")
    code, _, err = run_cli(["embed", "--slides", str(sample_slide), "--out", str(out)], capsys)
    if case == "read-only" and out.parent == tmp_path:
        out.chmod(0o700)
    expected = "exists and is not a folder" if case == "file" else "cannot write there"
    assert code == 1 and err.count("\n") == 1 and expected in err and "Traceback" not in err


PREPARE = ["prepare", "annotated", "--slides", "SLIDES", "--annotations", "ANN", "--format", "camelyon16"]
UNANNOTATED = ["prepare", "unannotated", "--slides", "SLIDES"]
GENERATE = ["generate", "--model", "MODEL", "--maps", "MAPS", "--num-samples", "2"]
EVALUATE = ["evaluate", "--real", "REAL", "--synthetic", "SYN"]


@pytest.mark.parametrize("args, message", [
    ([*PREPARE, "--mpp", "nan"], "--mpp nan: expected a finite number"),
    ([*PREPARE, "--mpp", "inf"], "--mpp inf: expected a finite number"),
    ([*PREPARE, "--mpp", "1e-6"], "--mpp 1e-06: expected a finite number at least 0.01"),
    ([*PREPARE, "--split", "nan,1,1"], "--split 'nan,1,1': expected three comma-separated ratios"),
    ([*PREPARE, "--split", "0,0,0"], "--split '0,0,0': expected three comma-separated ratios"),
    ([*PREPARE, "--tissue-threshold", "nan"], "--tissue-threshold nan: expected a finite number"),
    ([*PREPARE, "--max-patches-per-slide", "-1"], "--max-patches-per-slide -1: expected a finite number at least 1"),
    ([*PREPARE, "--windows-per-slide", "-10"], "--windows-per-slide -10"),
    ([*PREPARE, "--stride", "0"], "--stride 0: expected a finite number at least 1"),
    ([*PREPARE, "--stride", "-64"], "--stride -64"),
    ([*PREPARE, "--crops-per-class", "-3"], "--crops-per-class -3"),
    ([*PREPARE, "--classes", "tumour,tumour"], "expected distinct, non-empty comma-separated class names"),
    ([*PREPARE, "--classes", "tumour,,stroma"], "expected distinct, non-empty comma-separated class names"),
    ([*PREPARE, "--slide-shard", "3/2"], "--slide-shard '3/2': expected INDEX/COUNT"),
    ([*UNANNOTATED, "--tile-size", "0"], "--tile-size 0: expected a finite number at least 8"),
    ([*UNANNOTATED, "--batch-size", "0"], "--batch-size 0"),
    ([*UNANNOTATED, "--k", "1"], "--num-clusters must be between 2 and 254"),  # --k: the short alias
    ([*GENERATE, "--guidance", "nan"], "--guidance-scale nan: expected a finite number"),
    ([*GENERATE, "--guidance-scale", "101"], "--guidance-scale 101.0: expected a finite number at least 0 and at most 100"),
    ([*GENERATE, "--steps", "0"], "--num-inference-steps 0: expected a whole number at least 1"),
    ([*GENERATE, "--num-inference-steps", "-3"], "--num-inference-steps -3"),
    ([*GENERATE, "--batch-size", "0"], "--batch-size 0"),
    ([*GENERATE, "--scheduler", "foo"], "unknown --scheduler 'foo'"),
    ([*EVALUATE, "--limit", "0"], "--limit 0: expected a finite number at least 2"),
    ([*EVALUATE, "--epochs", "0"], "--epochs 0"),
    ([*EVALUATE, "--k", "0"], "--k 0"),
])
def test_bad_numbers_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    from tests.helpers import run_cli

    out = tmp_path / "out"
    target = out / "metrics.json" if args[0] == "evaluate" else out
    code, _, err = run_cli([*args, "--out", str(target)], capsys)
    assert code == 1 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_patch_larger_than_the_slide_is_said_not_an_empty_dataset(prepared, tmp_path, capsys):
    from tests.helpers import run_cli

    code, _, err = run_cli([*prepare_args(prepared, tmp_path / "big")[:-8], "--mpp", "8", "--patch-size", "4096"],
                           capsys)
    assert code == 1 and "is smaller than one 4096-px patch at 8.0 µm/px" in err
    assert not (tmp_path / "big" / "manifest.json").exists()


def tampered_copy(prepared: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "tampered"
    shutil.copytree(prepared, folder)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if case == "not JSON":
        manifest_path.write_text("{ this is not json")
        return folder
    if case == "no classes":
        del manifest["classes"]
    elif case == "shards a string":
        manifest["shards"] = "data/train-00000.tar"
    elif case == "wrong sha256":
        manifest["shards"][0]["sha256"] = "0" * 64
    elif case == "truncated shard":
        shard = folder / manifest["shards"][0]["path"]
        shard.write_bytes(shard.read_bytes()[:3000])
    manifest_path.write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("reader", ["training", "evaluate", "generate maps", "push"])
@pytest.mark.parametrize("case, message", [
    ("not JSON", "not a readable JSON manifest (JSONDecodeError)"),
    ("no classes", "no list of classes"),
    ("shards a string", "no list of shards"),
    ("wrong sha256", "does not match its sha256"),
    ("truncated shard", "does not match its sha256"),
])
def test_broken_manifests_and_shards_are_one_line_for_every_reader(prepared, tmp_path, reader, case, message):
    folder = tampered_copy(prepared, tmp_path, case)
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        readers()[reader](folder)
    assert "manifest.json" in str(caught.value) and "\n" not in str(caught.value)


def edited_copy(prepared: Path, tmp_path: Path, edit) -> tuple[Path, Path]:
    """A copy of `prepared` whose first shard has `edit(members)` applied to every sample (its manifest record
    updated to match), and that shard's path."""
    import hashlib

    from htd_toolkit.data.shards import read_tar, tar_bytes

    folder = tmp_path / "edited"
    shutil.copytree(prepared, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    record = manifest["shards"][0]
    samples = [(key, dict(members)) for key, members in read_tar(folder / record["path"])]
    for _, members in samples:
        edit(members)
    data = tar_bytes([(key, list(members.items())) for key, members in samples])
    (folder / record["path"]).write_bytes(data)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, folder / record["path"]


@pytest.mark.parametrize("reader", ["evaluate", "generate maps", "training"])
def test_mask_values_that_are_no_class_are_one_line(prepared, tmp_path, reader):
    import numpy as np

    from tests.helpers import png_bytes

    folder, _ = edited_copy(prepared, tmp_path, lambda m: m.update({"mask.png": png_bytes(np.full((8, 8), 7, np.uint8))}))
    with pytest.raises(UserError, match=r"mask value 7 is not a class index \(K = 3, 255 = ignore\)"):
        readers()[reader](folder)


def hostile_member(case: str) -> tuple[str, bytes | None]:
    """(member, bytes) for a hostile sample; None removes the member."""
    import numpy as np

    from tests.helpers import png_bytes, png_header

    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)  # compresses little: worth truncating
    mask, image = png_bytes(np.ones((64, 64), np.uint8)), png_bytes(noise)
    return {"20000 x 20000 mask": ("mask.png", png_header(20000, 20000)),
            "9000 x 9000 mask": ("mask.png", png_header(9000, 9000)),
            "truncated mask": ("mask.png", mask[:len(mask) // 2]),
            "mask not an image": ("mask.png", b"%PDF-1.4 not an image"),
            "3-channel mask": ("mask.png", png_bytes(np.ones((64, 64, 3), np.uint8))),
            "no mask": ("mask.png", None),
            "20000 x 20000 image": ("png", png_header(20000, 20000)),
            "truncated image": ("png", image[:len(image) // 2])}[case]


def replace_member(members: dict, name: str, data: bytes | None) -> None:
    members.pop(name)
    if data is not None:
        members[name] = data


MASK_CASES = [
    ("20000 x 20000 mask", "an image of more than 178,956,970 px; the toolkit reads images of at most 8192 x 8192 px"),
    ("9000 x 9000 mask", "an image of 9000 x 9000 px; the toolkit reads images of at most 8192 x 8192 px"),
    ("truncated mask", "the image is cut short or corrupt"),
    ("mask not an image", "not a PNG, JPEG, WEBP image"),
    ("3-channel mask", "a mask of 64 x 64 px with 3 channels; a mask is one channel of class ids"),
    ("no mask", "the sample has no mask.png member"),
]
IMAGE_CASES = [("20000 x 20000 image", "an image of more than 178,956,970 px"),
               ("truncated image", "the image is cut short or corrupt")]


@pytest.mark.parametrize("reader, case, message",
                         [(reader, *case) for reader in ("evaluate", "generate maps", "training") for case in MASK_CASES]
                         + [(reader, *case) for reader in ("evaluate", "training") for case in IMAGE_CASES])
def test_hostile_images_in_a_shard_are_one_line_naming_it(prepared, tmp_path, reader, case, message):
    """Every image a reader decodes is checked from its header before decoding (no PIL decompression-bomb
    traceback, no allocation), and a missing, truncated or foreign member is one line naming shard and member
    (generate reads the masks only)."""
    name, data = hostile_member(case)
    folder, shard = edited_copy(prepared, tmp_path, lambda members: replace_member(members, name, data))
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        readers()[reader](folder)
    assert str(shard) in str(caught.value) and "\n" not in str(caught.value)
    assert data is None or f".{name})" in str(caught.value)


def test_a_hostile_image_read_in_a_dataloader_worker_is_still_one_line(prepared, tmp_path):
    """The recipe reads its training data in DataLoader workers (2 by default): torch re-raises a worker's error
    with the worker's traceback as its message; a UserError keeps its own line."""
    from torch.utils.data import DataLoader

    from htd_toolkit.models.training_data import TrainingStream, collate_samples

    name, data = hostile_member("20000 x 20000 image")
    folder, shard = edited_copy(prepared, tmp_path, lambda members: replace_member(members, name, data))
    loader = DataLoader(TrainingStream(folder, 64, 2, 32, "adapter", shuffle_buffer=1), batch_size=2, num_workers=1,
                        collate_fn=collate_samples)
    with pytest.raises(UserError) as caught:
        next(iter(loader))
    assert str(caught.value).startswith(f"{shard} (") and "\n" not in str(caught.value)
    assert "an image of more than 178,956,970 px" in str(caught.value)


@pytest.mark.parametrize("case, message", [
    ("20000 x 20000 image", "an image of more than 178,956,970 px"),
    ("no mask", "the sample has no mask.png member"),
])
def test_reader_study_make_refuses_hostile_samples_in_one_line(prepared, tmp_path, capsys, case, message):
    from tests.helpers import run_cli

    name, data = hostile_member(case)
    folder, shard = edited_copy(prepared, tmp_path, lambda members: replace_member(members, name, data))
    code, _, err = run_cli(["reader-study", "make", "--real", str(folder), "--synthetic", str(prepared),
                            "--real-split", "train", "--num-images", "4", "--out", str(tmp_path / "study")], capsys)
    assert code == 1 and message in err and str(shard) in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case, message", [
    ("20000 x 20000 mask", "--map {path}: an image of more than 178,956,970 px; the toolkit reads images of at most"),
    ("9000 x 9000 mask", "--map {path}: an image of 9000 x 9000 px"),
    ("truncated mask", "--map {path}: the image is cut short or corrupt"),
    ("mask not an image", "--map {path}: not a PNG image"),
])
def test_a_hostile_map_png_for_generate_slide_is_one_line(tmp_path, case, message):
    from htd_toolkit.generate.slide import read_map_grid

    path = tmp_path / "map.png"
    path.write_bytes(hostile_member(case)[1])
    with pytest.raises(UserError, match=re.escape(message.format(path=path))):
        read_map_grid(path, 3)


@pytest.mark.parametrize("case, message", [
    ("truncated", "not a readable tar file (truncated or corrupt"),
    ("8 GiB member", "declares 8589934592 bytes"),
])
def test_broken_tars_are_one_line(tmp_path, case, message):
    import io
    import tarfile

    from htd_toolkit.data.shards import read_tar

    path = tmp_path / "train-00000.tar"
    if case == "truncated":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo("k1.png")
            info.size = 5000
            tar.addfile(info, io.BytesIO(b"x" * 5000))
        path.write_bytes(buffer.getvalue()[:2000])
    else:
        info = tarfile.TarInfo("k1.png")
        info.size = 8 << 30
        path.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 1024)
    with pytest.raises(UserError, match=re.escape(message)):
        list(read_tar(path))


@pytest.mark.parametrize("kind, message", [
    (tarfile.DIRTYPE, "is a directory"),
    (tarfile.SYMTYPE, "is a symbolic link"),
    (tarfile.LNKTYPE, "is a hard link"),
    (tarfile.CHRTYPE, "is a character device"),
    (tarfile.BLKTYPE, "is a block device"),
    (tarfile.FIFOTYPE, "is a FIFO"),
])
def test_tar_members_that_are_not_regular_files_are_one_line(tmp_path, kind, message):
    import io

    from htd_toolkit.data.shards import read_tar

    path = tmp_path / "train-00000.tar"
    with tarfile.open(path, mode="w") as tar:
        info = tarfile.TarInfo("k1.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))
        odd = tarfile.TarInfo("k1.mask.png")
        odd.type, odd.linkname = kind, "k1.png"
        tar.addfile(odd)
    with pytest.raises(UserError, match=re.escape(f"{path}: member 'k1.mask.png' {message}; a shard holds regular "
                                                  "files only")):
        list(read_tar(path))


@pytest.mark.parametrize("case, message", [
    ("feature not an object", "every GeoJSON feature must be an object"),
    ("one-point polygon", "a Polygon ring with 1 point(s); a ring needs at least 3"),
    ("huge vertex", "a Polygon vertex is not finite or beyond"),
])
def test_bad_geojson_is_one_line(tmp_path, case, message):
    from htd_toolkit.annotations.geojson import geometry_polygons, read_features

    path = tmp_path / "slide.geojson"
    ring = {"one-point polygon": [[10, 10]], "huge vertex": [[0, 0], [1e300, 0], [0, 5], [0, 0]]}.get(case)
    features = ["not a feature"] if ring is None else [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"classification": {"name": "tumour"}}}]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.raises(UserError, match=re.escape(message)):
        for feature in read_features(path):
            geometry_polygons(feature["geometry"], path)


def test_a_folder_named_like_a_slide_is_not_a_slide(tmp_path):
    from htd_toolkit.patches.annotated import find_slides

    (tmp_path / "slides" / "case.svs").mkdir(parents=True)
    with pytest.raises(UserError, match="no slides found"):
        find_slides([tmp_path / "slides"])


@pytest.mark.parametrize("text, message", [
    ("{", "Expecting property name"),
    ("[1, 2]", "not a JSON object"),
    ('{"classes": [{"index": 0, "name": "b"}, {"index": 1, "name": "t"}]}', "base_model"),
    ('{"base_model": "org/sd", "classes": [{"index": 3, "name": "t"}]}', "indexes 0, 1, ..., K-1"),
    ('{"base_model": "org/sd", "classes": [{"index": 0, "name": "b"}, {"index": 1, "name": "t"}], '
     '"resolution": -8}', "resolution -8 is not a positive multiple of 8"),
])
def test_a_model_folder_with_a_malformed_config_is_one_line(prepared, tmp_path, capsys, text, message):
    """Model folders come from Hub repos too: their htd_config.json is checked, not trusted."""
    from tests.helpers import run_cli

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "htd_config.json").write_text(text)
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "model"), "--maps", str(prepared),
                            "--num-samples", "1", "--out", str(tmp_path / "bundle")], capsys)
    assert code == 1 and "htd_config.json: not a valid HTD model config" in err and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- Output folders (issue 27): continued only by the command that wrote them, with the same options; an
# input is never an output; --overwrite removes only what htd-toolkit wrote, never a folder holding an input,
# the current directory, the home folder or /.

def copy_of(prepared: Path, tmp_path: Path, name: str = "out") -> Path:
    shutil.copytree(prepared, tmp_path / name)
    return tmp_path / name


def stub_model(tmp_path: Path) -> Path:
    """A folder that passes for a model until its config is read, which happens after --out is checked."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "htd_config.json").write_text("{}")
    return tmp_path / "model"


def generate_args(model: Path, maps: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--maps", str(maps), "--num-samples", "2", "--out", str(out), *extra]


def refused(args: list[str], capsys, message: str) -> str:
    from tests.helpers import run_cli

    code, _, err = run_cli(args, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", ["maps", "crop bank", "model", "folder holding the maps"])
def test_generate_never_writes_into_what_it_reads(prepared, tmp_path, capsys, case, overwrite):
    maps = copy_of(prepared, tmp_path / "inputs", "maps")
    model = stub_model(tmp_path)
    out = {"maps": maps, "crop bank": maps, "model": model, "folder holding the maps": tmp_path / "inputs"}[case]
    extra = ["--crop-bank", str(maps / "crop_bank")] if case == "crop bank" else []
    before = folder_state(tmp_path)
    refused(generate_args(model, maps, out, *extra, *(["--overwrite"] if overwrite else [])), capsys,
            "an input is never an output, --overwrite or not")
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("command, message", [
    ("generate", "holds the output of `prepare annotated`, which `generate` does not continue"),
    ("prepare unannotated", "holds the output of `prepare annotated`, which `prepare unannotated` does not continue"),
    ("pretrain-base", "holds the output of `prepare annotated`, which `pretrain-base` does not continue"),
    ("prepare annotated", "holds a `prepare annotated` run with other options (patch_size = 128 there, not 64)"),
])
def test_a_folder_is_continued_only_by_its_command_with_its_options(prepared, sample_slide, tmp_path, capsys,
                                                                  command, message):
    out = copy_of(prepared, tmp_path)
    args = {"generate": generate_args(stub_model(tmp_path), prepared, out),
            "prepare unannotated": ["prepare", "unannotated", "--slides", str(sample_slide), "--out", str(out)],
            "pretrain-base": ["pretrain-base", "--slides", str(sample_slide), "--out", str(out), "--steps", "1"],
            "prepare annotated": [*prepare_args(prepared, out)[:-6], "--patch-size", "64", *prepare_args(prepared, out)[-4:]]}
    before = folder_state(out)
    err = refused(args[command], capsys, message)
    assert "pass --overwrite" in err
    assert folder_state(out) == before


def test_overwrite_removes_only_what_the_toolkit_wrote(prepared, tmp_path, capsys):
    from tests.helpers import run_cli

    out = copy_of(prepared, tmp_path)
    (out / "notes.txt").write_text("mine")
    (tmp_path / "victim.txt").write_text("outside")
    (tmp_path / "target.tar").write_text("outside, linked")
    (out / "data" / "link.tar").symlink_to(tmp_path / "target.tar")
    with open(out / ".work" / "written.txt", "a") as journal:  # a folder may come from anyone
        journal.write("../victim.txt\n/etc/hostname\ndata/link.tar\n")
    old_work = {p.name for p in (out / ".work").iterdir() if p.is_dir()}
    args = [*prepare_args(prepared, out)[:-6], "--patch-size", "64", *prepare_args(prepared, out)[-4:]]
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert (tmp_path / "victim.txt").read_text() == "outside" and (tmp_path / "target.tar").exists()
    assert not (out / "data" / "link.tar").is_symlink()  # the journal's link is removed, never followed
    assert not old_work & {p.name for p in (out / ".work").iterdir()}  # the other run's work is gone
    assert json.loads((out / "manifest.json").read_text())["config"]["patch_size"] == 64
    refused(args, capsys, "holds files prepare annotated did not write (notes.txt)")  # the user's, still refused


@pytest.mark.parametrize("case", ["pretrain-base slides", "prepare annotations", "current directory", "home"])
def test_overwrite_never_clears_an_input_the_current_directory_or_home(prepared, cc0_pyramid, tmp_path, capsys,
                                                                      monkeypatch, case):
    if case == "pretrain-base slides":
        (tmp_path / "slides").mkdir()
        shutil.copy(cc0_pyramid, tmp_path / "slides" / "a.tif")
        args = ["pretrain-base", "--slides", str(tmp_path / "slides" / "a.tif"), "--out", str(tmp_path / "slides"),
                "--steps", "1"]
        watched, message = tmp_path, "an input is never an output"
    elif case == "prepare annotations":
        out = tmp_path / "work"
        ann = shutil.copytree(prepared.parent / "ann", out / "ann")
        args = prepare_args(prepared, out)
        args[args.index("--annotations") + 1] = str(ann)
        watched, message = tmp_path, "an input is never an output"
    else:
        watched = copy_of(prepared, tmp_path)
        monkeypatch.chdir(watched) if case == "current directory" else monkeypatch.setenv("HOME", str(watched))
        args = [*prepare_args(prepared, watched)[:-6], "--patch-size", "64", *prepare_args(prepared, watched)[-4:]]
        message = f"holds {'the current directory' if case == 'current directory' else 'your home folder'}"
    before = folder_state(watched)
    refused([*args, "--overwrite"], capsys, message)
    assert folder_state(watched) == before


@pytest.mark.parametrize("command", ["generate", "prepare annotated", "prepare unannotated"])
def test_out_root_is_one_line(prepared, sample_slide, tmp_path, capsys, command):
    """Without --overwrite: on code that took / as an output, --overwrite would write into it (as root)."""
    args = {"generate": generate_args(stub_model(tmp_path), prepared, Path("/")),
            "prepare annotated": prepare_args(prepared, Path("/")),
            "prepare unannotated": ["prepare", "unannotated", "--slides", str(sample_slide), "--out", "/"]}[command]
    refused(args, capsys, "--out /: the root folder is never an output")


def test_evaluate_never_replaces_a_file_of_its_inputs(prepared, tmp_path, capsys):
    folder = copy_of(prepared, tmp_path)
    before = folder_state(folder)
    refused(["evaluate", "--real", str(folder), "--synthetic", str(folder), "--out", str(folder / "manifest.json"),
             "--overwrite"], capsys, "a file of a folder this run reads; evaluate never replaces it")
    assert folder_state(folder) == before


def test_tiny_base_overwrite_never_clears_the_current_directory(tmp_path, monkeypatch, capsys):
    from htd_toolkit.testing import tiny_base

    (tmp_path / "thesis.docx").write_text("years of work")
    monkeypatch.chdir(tmp_path)
    assert tiny_base.main(["--out", ".", "--overwrite"]) == 2
    assert "holds the current directory" in capsys.readouterr().err
    assert (tmp_path / "thesis.docx").read_text() == "years of work"


def test_prepare_says_when_no_patch_was_kept(prepared, cc0_pyramid, tmp_path, capsys):
    from tests.annotation_files import write_camelyon16, write_geojson
    from tests.helpers import run_cli

    root = tmp_path / "geojson"
    (root / "slides").mkdir(parents=True)
    (root / "ann").mkdir()
    shutil.copy(cc0_pyramid, root / "slides" / "a.tif")
    write_geojson(root / "ann", "a", [])  # a GeoJSON without features
    geojson = ["prepare", "annotated", "--slides", str(root / "slides"), "--annotations", str(root / "ann"),
               "--format", "geojson", "--classes", "tumour", "--out", str(root / "out"), "--mpp", "2.0",
               "--patch-size", "128", "--stride", "64"]
    refused(geojson, capsys, "no patch kept from 1 slide(s), no dataset written; 70 windows tried")
    assert not (root / "out" / "manifest.json").exists()

    root = copy_of(prepared.parent, tmp_path, "camelyon")
    write_camelyon16(root / "ann", "tumor_002", groups=[])  # one slide without regions, one with
    code, _, err = run_cli(prepare_args(root / "data", tmp_path / "mixed"), capsys)
    assert code == 0 and "warning: tumor_002.tif: no patch kept; 70 windows tried" in " ".join(err.split()), err


# generate-slide: the slide's files (O.tif, O.mask.tif, O.geojson, O.json, O.thumbnail.png, O.work/)


@pytest.fixture(scope="module")
def slide_bank(tmp_path_factory) -> Path:
    from htd_toolkit.testing.slides import fixture_crop_bank

    return fixture_crop_bank(tmp_path_factory.mktemp("bank"))


def slide_args(map_path: Path, out: Path, bank: Path, *extra: str) -> list[str]:
    from htd_toolkit.base.shipped import shipped_adapter_model

    return ["generate-slide", "--model", str(shipped_adapter_model()), "--map", str(map_path), "--out", str(out),
            "--crop-bank", str(bank), "--map-mpp", "16", "--steps", "1", *extra]


def write_map(path: Path, glass: bool = False) -> Path:
    import numpy as np
    import tifffile
    from PIL import Image

    from htd_toolkit.testing.slides import fixture_grid

    grid = np.zeros((4, 4), np.uint8) if glass else fixture_grid(4, seed=6)
    tifffile.imwrite(path, grid) if path.suffix == ".tif" else Image.fromarray(grid).save(path)
    return path


@pytest.mark.parametrize("overwrite", [False, True])
def test_generate_slide_never_writes_over_its_map(tmp_path, capsys, slide_bank, overwrite):
    map_path = write_map(tmp_path / "X.tif")
    before = folder_state(tmp_path)
    refused(slide_args(map_path, map_path, slide_bank, *(["--overwrite"] if overwrite else [])), capsys,
            "which the run reads; an input is never an output")
    assert folder_state(tmp_path) == before


def test_generate_slide_keeps_the_users_files_beside_its_slide(tmp_path, capsys, slide_bank):
    from tests.helpers import run_cli

    map_path = write_map(tmp_path / "map.png")
    (tmp_path / "O.json").write_text('{"my": "notes"}')
    (tmp_path / "O.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    before = folder_state(tmp_path)
    refused(slide_args(map_path, tmp_path / "O.tif", slide_bank), capsys,
            "O.geojson, O.json already there, not written by generate-slide with these options")
    assert folder_state(tmp_path) == before
    code, _, err = run_cli(slide_args(map_path, tmp_path / "O.tif", slide_bank, "--overwrite"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "O.json").read_text())["toolkit_version"]


@pytest.mark.parametrize("case, message", [
    ("--tile 63", "--tile 63 and --overlap 15: both must be multiples of the VAE factor"),
    ("all glass", "no tissue (every cell is glass or ignored); nothing to generate"),
])
def test_a_refused_generate_slide_leaves_nothing_behind(tmp_path, capsys, slide_bank, case, message):
    map_path = write_map(tmp_path / "map.png", glass=case == "all glass")
    extra = ["--tile", "63"] if case == "--tile 63" else []
    refused(slide_args(map_path, tmp_path / "O.tif", slide_bank, *extra), capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]


class RunsCode:
    """A pickle that would create `marker` when unpickled: loading it must refuse, never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def rewrite_tensors(path: Path, edit) -> None:
    """Apply `edit(state)` to a safetensors file, keeping its metadata (the LoRA's adapter config)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata=metadata)


def poison_first(state: dict, value: float) -> None:
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = value


def grow_last(state: dict) -> None:
    import torch

    name = sorted(state)[-1]
    state[name] = torch.zeros([side + 1 for side in state[name].shape])


LORA = "pytorch_lora_weights.safetensors"
CONTROLNET = "controlnet/diffusion_pytorch_model.safetensors"
IP = "crop_adapter/ip_adapter.safetensors"
CROP_ENCODER = "crop_adapter/crop_encoder/diffusion_pytorch_model.safetensors"


def hostile_model(folder: Path, case: str, marker: Path) -> None:
    """Make one hostile change to the model folder `folder`."""
    import pickle

    import torch

    edits = {"LoRA NaN": (LORA, lambda s: poison_first(s, float("nan"))),
             "ControlNet inf": (CONTROLNET, lambda s: poison_first(s, float("inf"))),
             "crop adapter NaN": (IP, lambda s: poison_first(s, float("nan"))),
             "crop encoder -inf": (CROP_ENCODER, lambda s: poison_first(s, float("-inf"))),
             "crop adapter int8": (IP, lambda s: s.update({k: v.to(torch.int8) for k, v in s.items()})),
             "crop adapter shape": (IP, grow_last),
             "LoRA shape": (LORA, grow_last),
             "ControlNet shape": (CONTROLNET, grow_last)}
    if case in edits:
        name, edit = edits[case]
        rewrite_tensors(folder / name, edit)
    elif case in ("LoRA truncated", "ControlNet truncated"):
        path = folder / (LORA if case.startswith("LoRA") else CONTROLNET)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif case == "LoRA a pickle":
        (folder / LORA).write_bytes(pickle.dumps(RunsCode(marker)))
    elif case == "ControlNet a .bin":
        (folder / CONTROLNET).unlink()
        (folder / CONTROLNET).with_suffix(".bin").write_bytes(pickle.dumps(RunsCode(marker)))
    else:
        path, key, value = {"conditioning_channels 99": ("controlnet/config.json", "conditioning_channels", 99),
                            "max_crops 1e9": ("htd_config.json", "max_crops", 1e9)}[case]
        config = json.loads((folder / path).read_text())
        config[key] = value
        (folder / path).write_text(json.dumps(config))


@pytest.mark.parametrize("case, file, message", [
    ("LoRA NaN", LORA, "tensor unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight holds "
                       "NaN or infinite values"),
    ("ControlNet inf", CONTROLNET, "tensor controlnet_cond_embedding.blocks.0.bias holds NaN or infinite values"),
    ("crop adapter NaN", IP, "tensor image_proj.norm.bias holds NaN or infinite values"),
    ("crop encoder -inf", CROP_ENCODER, "tensor body.0.bias holds NaN or infinite values"),
    ("crop adapter int8", IP, "tensor image_proj.norm.bias is int8; model weights are floating point"),
    ("crop adapter shape", IP, "does not fit the model (Cannot load because to_v_ip.0.weight expected shape"),
    ("LoRA shape", LORA, "does not fit the model (Error(s) in loading state_dict for UNet2DConditionModel: size "
                         "mismatch"),
    ("ControlNet shape", "controlnet", "does not fit the model (Cannot load because time_embedding.linear_2.weight"),
    ("LoRA truncated", LORA, "not a readable safetensors file (truncated, or another format: a pickle is never loaded)"),
    ("ControlNet truncated", CONTROLNET, "not a readable safetensors file"),
    ("LoRA a pickle", LORA, "not a readable safetensors file (truncated, or another format: a pickle is never loaded)"),
    ("ControlNet a .bin", CONTROLNET, "missing (diffusion_pytorch_model.bin beside it is a pickle, which is never "
                                      "loaded); weights load from safetensors files only"),
    ("conditioning_channels 99", "controlnet/config.json", "conditioning_channels 99, but the map's 3 classes need 3"),
    ("max_crops 1e9", "htd_config.json", "not a valid HTD model config (max_crops 1000000000.0: expected a whole "
                                         "number at least 1 and at most 64)"),
])
def test_hostile_model_folders_are_one_line_naming_the_file(model_dir, tmp_path, case, file, message):
    """Model folders come from Hub repos: weights that are NaN or infinite (black images, exit 0), of a dtype or
    shape that is not the model's, truncated or pickled, and configs that do not fit, are refused in one line
    naming the file, and no pickle runs."""
    from htd_toolkit.models.htd_model import HTDModel

    folder, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(model_dir, folder)
    hostile_model(folder, case, marker)
    with pytest.raises(UserError, match=re.escape(f"{folder / file}: {message}")) as caught:
        HTDModel.from_pretrained(folder)
    assert "\n" not in str(caught.value) and not marker.exists()


def test_generate_with_a_nan_model_is_one_line(model_dir, prepared, tmp_path, capsys):
    from tests.helpers import run_cli

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    hostile_model(folder, "LoRA NaN", tmp_path / "pwned")
    code, _, err = run_cli(["generate", "--model", str(folder), "--maps", str(prepared), "--crop-bank", str(prepared),
                            "--num-samples", "1", "--out", str(tmp_path / "bundle")], capsys)
    assert code == 1 and f"{folder / LORA}: tensor" in err and "holds NaN or infinite values" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bundle" / "manifest.json").exists()


@pytest.mark.parametrize("case, message", [
    ("code pickle", "a pickle holding more than tensors; refused, never unpickled"),
    ("truncated", "not a readable state dict"),
    ("wrong shapes", "does not fit the model (Error(s) in loading state_dict for ResNet: size mismatch for"),
])
def test_an_encoder_checkpoint_that_is_a_pickle_or_damaged_is_one_line(tmp_path, capsys, case, message):
    import pickle

    import torch

    from htd_toolkit.clustering.encoders import get_encoder

    path, marker = tmp_path / "resnet18.pth", tmp_path / "pwned"
    if case == "code pickle":
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    else:
        torch.save({"conv1.weight": torch.zeros(3, 3)}, path)
        if case == "truncated":
            path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        get_encoder(f"timm:resnet18:{path}")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value) and not marker.exists()


def recipe_args(prepared: Path, base: Path, out: Path, *extra: str) -> list[str]:
    from tests.test_training import DEMO

    return ["--config", str(DEMO), "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(prepared),
            "--output_dir", str(out), "--report_to", "none", "--validation_steps", "0", *extra]


@pytest.mark.parametrize("option", ["--adam_beta1", "--adam_beta2"])
def test_an_adam_beta_of_one_is_refused_before_the_model_loads(prepared, tiny_base_sd15, tmp_path, capsys, option):
    from tests.test_training import train

    code = train(recipe_args(prepared, tiny_base_sd15, tmp_path / "m", option, "1.0"))
    err = capsys.readouterr().err
    assert code == 1 and f"{option} 1.0: expected a finite number at least 0 and below 1" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_latest_is_the_latest_complete_checkpoint(prepared, tiny_base_sd15, tmp_path, capsys, caplog):
    """A checkpoint-N folder the run did not write (empty, a half-finished copy) is not `latest`: resuming takes
    the newest complete one and names the others in a warning; they are left as they are."""
    import logging

    from tests.test_training import train

    caplog.set_level(logging.INFO, logger="train_controlnet")
    out = tmp_path / "run"
    assert train(recipe_args(prepared, tiny_base_sd15, out, "--max_train_steps", "1", "--checkpointing_steps", "1")) == 0
    (out / "checkpoint-99").mkdir()
    (out / "checkpoint-50").mkdir()
    shutil.copy(out / "checkpoint-1" / "trainable.safetensors", out / "checkpoint-50")  # a copy cut short
    code = train(recipe_args(prepared, tiny_base_sd15, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                             "--resume_from_checkpoint", "latest"))
    assert code == 0, capsys.readouterr().err
    assert "checkpoint-1 at step 1" in caplog.text
    assert "checkpoint-50, checkpoint-99: not complete checkpoints" in caplog.text
    assert not any((out / "checkpoint-99").iterdir()) and (out / "checkpoint-2" / "trainable.safetensors").exists()


def test_overwrite_never_takes_the_root_folder():
    from htd_toolkit.data.outputs import Claim, claim_folder

    with pytest.raises(UserError, match="--out /: the root folder is never an output"):
        claim_folder(Claim(Path("/"), "prepare annotated", {}, overwrite=True))
