"""The wheel: one top-level package, and the recipe and card templates it ships run from it alone."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path
site = Path(sys.argv[1])
from htd_toolkit.recipes import train_controlnet
from htd_toolkit.publish.cards import template
assert Path(train_controlnet.__file__).is_relative_to(site), train_controlnet.__file__
Path("demo").mkdir()  # an entry of the current directory does not shadow the packaged config
args = train_controlnet.parse_args(["--config", "demo"])
assert Path(args.config).is_relative_to(site) and args.config.name == "demo.yaml", args.config
assert args.resolution == 64  # the demo config's value, not the default
train_controlnet.check_base(args)  # offline: the config's base is the toy base in the wheel
assert Path(args.pretrained_model_name_or_path).is_relative_to(site), args.pretrained_model_name_or_path
assert "load_dataset" in template("dataset_card.md.j2")
print("ok")
"""


def test_the_wheel_holds_one_top_level_package_and_its_recipe_runs_from_it(tmp_path):
    source = tmp_path / "src"  # a copy: an in-tree build would write build/ and *.egg-info into the checkout
    for name in ("htd_toolkit", "recipes", "dataset_cards"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("htd_toolkit-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(next(n for n in names if n.endswith("top_level.txt"))).decode().split()
        archive.extractall(tmp_path / "site")
    assert top_level == ["htd_toolkit"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"htd_toolkit"}
    assert {"htd_toolkit/recipes/train_controlnet.py", "htd_toolkit/recipes/configs/demo.yaml",
            "htd_toolkit/recipes/accelerate/multi_gpu.yaml", "htd_toolkit/dataset_cards/dataset_card.md.j2",
            "htd_toolkit/evaluate/hub_metrics/frechet_distance/frechet_distance.py"} <= set(names)
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    ran = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "site")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert ran.returncode == 0 and ran.stdout.strip().endswith("ok"), ran.stderr[-2000:]
    helped = subprocess.run([sys.executable, "-m", "htd_toolkit.recipes.train_controlnet", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=240)
    assert helped.returncode == 0 and "--config" in helped.stdout and "demo" in helped.stdout


CHECKOUT_CHECK = """
import importlib.util, sys
from pathlib import Path
root = Path(sys.argv[1])
import htd_toolkit.recipes, htd_toolkit.dataset_cards
assert Path(htd_toolkit.recipes.__file__).parent == root / "recipes", htd_toolkit.recipes.__file__
assert Path(htd_toolkit.dataset_cards.__file__).parent == root / "dataset_cards"
assert importlib.util.find_spec("htd_toolkit.recipes.train_controlnet").origin == str(root / "recipes" / "train_controlnet.py")
for name in ("tests", "benchmarks", "htd_toolkit", "docs"):
    assert importlib.util.find_spec("htd_toolkit." + name) is None, name
print("ok")
"""


def test_a_checkout_maps_recipes_and_dataset_cards_into_the_package_and_nothing_else():
    """Run from a checkout without installing (`PYTHONPATH=.`; -S: no site-packages, so no editable install
    answers for it): the package finds the repository's recipes/ and dataset_cards/, and no other folder of
    the checkout becomes importable under its name (`htd_toolkit.tests` was, through a __path__ entry)."""
    ran = subprocess.run([sys.executable, "-S", "-c", CHECKOUT_CHECK, str(ROOT)], cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr[-2000:]
