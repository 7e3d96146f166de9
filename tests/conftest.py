"""Shared fixtures: the local Hub test server, the real CC0 slide, tiny SD bases.

The Hub server starts before any test module imports huggingface_hub or datasets, because both
read HF_ENDPOINT at import; `point_clients_at` covers the
case where something imported them earlier.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from htd_toolkit.testing import hubserver

_HUB_ROOT = Path(tempfile.mkdtemp(prefix="htd-hub-"))
_HUB = hubserver.serve(_HUB_ROOT)
os.environ.update({
    "HF_ENDPOINT": _HUB.url,
    "HF_HOME": str(_HUB_ROOT / "hf-home"),
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "HTD_SLIDE_KEY": "test-installation-key",  # slide ids: stable across runs, no write to the user's config
    "HTD_CONFIG": str(_HUB_ROOT / "htd-config"),
})
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN"):
    os.environ.pop(var, None)
hubserver.point_clients_at(_HUB.url)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker: two workers on two cores, no oversubscription
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_unconfigure(config):
    _HUB.shutdown()
    shutil.rmtree(_HUB_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def hub() -> hubserver.HubServer:
    """The running test server; `hub.state` has the fault switch and the request log."""
    return _HUB


@pytest.fixture
def hf_cache(tmp_path) -> Path:
    """A fresh client cache, so a test never reads what another one downloaded."""
    return tmp_path / "hf-cache"


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    """The CC0 slide CMU-1-Small-Region.svs (`make test` fetches it before pytest runs)."""
    from htd_toolkit.wsi.sample_slide import sample_slide_path

    return sample_slide_path()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from htd_toolkit.testing.tiny_base import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("tiny-base") / "base", layout="min")


@pytest.fixture(scope="session")
def cc0_pyramid(sample_slide, tmp_path_factory) -> Path:
    """The whole CC0 slide as a lossless 4-level pyramidal TIFF (0.499 µm/px)."""
    from htd_toolkit.wsi.pyramid import write_slide_region

    return write_slide_region(sample_slide, tmp_path_factory.mktemp("cc0") / "cc0.tif")


@pytest.fixture(scope="session")
def tiny_base_sd15(tmp_path_factory) -> Path:
    from htd_toolkit.testing.tiny_base import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("tiny-sd15") / "base", layout="sd15")


@pytest.fixture(scope="session")
def prepared(cc0_pyramid, tmp_path_factory) -> Path:
    """A prepared Camelyon16-style dataset folder from the CC0 slide: two slides (train + validation)."""
    from htd_toolkit.cli import main
    from tests.annotation_files import camelyon_slides

    root = camelyon_slides(cc0_pyramid, tmp_path_factory.mktemp("prepared"), 2)
    out = root / "data"
    code = main(["prepare", "annotated", "--slides", str(root / "slides"), "--annotations", str(root / "ann"),
                 "--format", "camelyon16", "--out", str(out), "--mpp", "2.0", "--patch-size", "128",
                 "--stride", "64", "--split", "0.5,0.5,0"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def model_dir(prepared, tiny_base_sd15, tmp_path_factory) -> Path:
    """An HTD model (tiny SD1.5-layout base, 2 steps) trained on `prepared`: Camelyon16 classes, 128 px at 2 µm/px."""
    from tests.test_training import demo_args, train

    out = tmp_path_factory.mktemp("model") / "m"
    assert train(demo_args(tiny_base_sd15, prepared, out, "--max_train_steps", "2", "--checkpointing_steps", "0",
                           "--validation_steps", "0")) == 0
    return out
