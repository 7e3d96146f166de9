"""The real huggingface_hub and datasets clients against the local Hub test server, over HTTP."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from datasets import load_dataset
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from htd_toolkit.testing.hubserver import OTHER_TOKEN, READ_TOKEN, USER_TOKEN
from tests.helpers import slide_samples, write_wds_shard

CARD = """---
license: cc0-1.0
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.tar
---
# test bundle
"""


@pytest.fixture
def api() -> HfApi:
    return HfApi(token=USER_TOKEN)


def make_bundle(folder, sample_slide, shards=2, per_shard=3):
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(CARD)
    samples = []
    for shard in range(shards):
        part = slide_samples(sample_slide, per_shard, offset=shard * per_shard)
        write_wds_shard(folder / "data" / f"train-{shard:05d}.tar", part)
        samples += part
    return samples


def assert_rows_match(rows, samples):
    assert len(rows) == len(samples)
    by_key = {row["__key__"]: row for row in rows}
    for key, image, mask, meta in samples:
        row = by_key[key]
        assert np.array_equal(np.asarray(row["png"]), image)
        assert row["mask.png"].mode == "L"
        assert np.array_equal(np.asarray(row["mask.png"]), mask)
        assert row["json"] == meta


def test_create_repo_types_visibility_and_exist_ok(api, hub):
    for repo_type in ("dataset", "model"):
        for private in (True, False):
            name = f"user/create-{repo_type}-{private}"
            url = api.create_repo(name, repo_type=repo_type, private=private)
            assert url.repo_id == name
            info = api.repo_info(name, repo_type=repo_type)
            assert info.private is private
            assert api.create_repo(name, repo_type=repo_type, exist_ok=True).repo_id == name
            with pytest.raises(HfHubHTTPError) as err:
                api.create_repo(name, repo_type=repo_type)
            assert err.value.response.status_code == 409


def test_webdataset_bundle_round_trip_is_pixel_exact(api, sample_slide, tmp_path, hf_cache, hub):
    samples = make_bundle(tmp_path / "bundle", sample_slide)
    api.create_repo("user/wds", repo_type="dataset")
    api.upload_folder(folder_path=tmp_path / "bundle", repo_id="user/wds", repo_type="dataset")
    # the tars went over the LFS basic transfer, the card inline
    files = {f.path: f for f in api.list_repo_tree("user/wds", repo_type="dataset", recursive=True)
             if f.path.endswith((".tar", ".md"))}
    assert files["data/train-00000.tar"].lfs is not None and files["README.md"].lfs is None
    rows = list(load_dataset("user/wds", split="train", cache_dir=str(hf_cache)))
    assert_rows_match(rows, samples)
    streamed = list(load_dataset("user/wds", split="train", streaming=True))
    assert_rows_match(streamed, samples)


def test_model_snapshot_is_byte_exact(api, tmp_path, hf_cache):
    folder = tmp_path / "model"
    (folder / "controlnet").mkdir(parents=True)
    files = {"README.md": b"---\nlibrary_name: diffusers\n---\n# m\n", "htd_config.json": b'{"k": 3}',
             "controlnet/diffusion_pytorch_model.safetensors": np.random.default_rng(0).bytes(200_000)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    api.create_repo("user/mdl")
    api.upload_folder(folder_path=folder, repo_id="user/mdl")
    local = snapshot_download("user/mdl", cache_dir=hf_cache, token=USER_TOKEN)
    for name, data in files.items():
        assert (tmp_path.joinpath(local, name)).read_bytes() == data
    assert api.model_info("user/mdl").sha == Path(local).name


def test_second_commit_changes_revision_and_old_revision_still_loads(api, sample_slide, tmp_path, hf_cache):
    samples = make_bundle(tmp_path / "bundle", sample_slide)
    api.create_repo("user/revs", repo_type="dataset")
    api.upload_folder(folder_path=tmp_path / "bundle", repo_id="user/revs", repo_type="dataset")
    old = api.dataset_info("user/revs").sha
    new_card = CARD.replace("data/train-*.tar", "data/train-00000.tar")
    api.upload_file(path_or_fileobj=new_card.encode(), path_in_repo="README.md", repo_id="user/revs",
                    repo_type="dataset")
    new = api.dataset_info("user/revs").sha
    assert new != old
    old_card = hf_hub_download("user/revs", "README.md", repo_type="dataset", revision=old, cache_dir=hf_cache)
    assert Path(old_card).read_text() == CARD
    card = hf_hub_download("user/revs", "README.md", repo_type="dataset", cache_dir=hf_cache)
    assert Path(card).read_text() == new_card
    assert_rows_match(list(load_dataset("user/revs", split="train", revision=old, cache_dir=str(hf_cache))), samples)
    assert len(load_dataset("user/revs", split="train", cache_dir=str(tmp_path / "c2"))) == 3


def test_private_repo_refuses_anonymous_and_other_users(api, sample_slide, tmp_path, hub):
    make_bundle(tmp_path / "bundle", sample_slide, shards=1)
    api.create_repo("user/secret", repo_type="dataset", private=True)
    api.upload_folder(folder_path=tmp_path / "bundle", repo_id="user/secret", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).dataset_info("user/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=OTHER_TOKEN).dataset_info("user/secret")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("user/secret", split="train", token=False, cache_dir=str(tmp_path / "anon"))
    with pytest.raises(DatasetNotFoundError):
        load_dataset("user/secret", split="train", token=OTHER_TOKEN, cache_dir=str(tmp_path / "other"))
    url = f"{hub.url}/datasets/user/secret/resolve/main/README.md"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url)
    assert err.value.code == 401
    rows = load_dataset("user/secret", split="train", token=USER_TOKEN, cache_dir=str(tmp_path / "owner"))
    assert len(rows) == 3


def test_read_only_token_cannot_write(api, tmp_path):
    reader = HfApi(token=READ_TOKEN)
    with pytest.raises(HfHubHTTPError) as err:
        reader.create_repo("user/ro", repo_type="dataset")
    assert err.value.response.status_code == 403
    api.create_repo("user/ro", repo_type="dataset")
    assert reader.dataset_info("user/ro").id == "user/ro"
    with pytest.raises(HfHubHTTPError) as err:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/ro", repo_type="dataset")
    assert err.value.response.status_code == 403
    assert reader.whoami()["name"] == "user"


def test_fault_switch_fails_the_next_requests_then_recovers(api, hub):
    api.create_repo("user/faulty", repo_type="dataset")
    hub.state.fail_next("commit", count=1, status=500)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id="user/faulty", repo_type="dataset")
    assert err.value.response.status_code == 500
    api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id="user/faulty", repo_type="dataset")
    # the same switch over HTTP, for tests that run the CLI in a subprocess
    fault = json.dumps({"endpoint": "info", "count": 2, "status": 503}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no fault
        urllib.request.urlopen(urllib.request.Request(f"{hub.url}/_test/fault", method="POST", data=fault))
    assert refused.value.code == 401
    request = urllib.request.Request(f"{hub.url}/_test/fault", method="POST", data=fault,
                                     headers={"Authorization": f"Bearer {USER_TOKEN}"})
    urllib.request.urlopen(request).read()
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(f"{hub.url}/api/datasets/user/faulty")
        assert http_err.value.code == 503
    assert json.load(urllib.request.urlopen(f"{hub.url}/api/datasets/user/faulty"))["id"] == "user/faulty"


def test_clients_default_configuration_with_xet_enabled(api, hub, sample_slide, tmp_path, monkeypatch):
    """Xet left on (the clients' default): the server marks every file regular, so uploads go inline."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(hub.state, "all_regular", True)
    samples = make_bundle(tmp_path / "bundle", sample_slide, shards=1)
    api.create_repo("user/xet", repo_type="dataset")
    api.upload_folder(folder_path=tmp_path / "bundle", repo_id="user/xet", repo_type="dataset")
    assert not any(path.endswith("xet-write-token/main") for _, path in hub.state.request_log)
    assert_rows_match(list(load_dataset("user/xet", split="train", cache_dir=str(tmp_path / "c"))), samples)


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "..", ".hidden", "x--y"])
def test_repo_names_cannot_leave_the_server_root(hub, name):
    # raw HTTP: huggingface_hub checks names before sending, a hostile client does not
    request = urllib.request.Request(f"{hub.url}/api/repos/create", method="POST",
                                     data=json.dumps({"name": name, "type": "dataset"}).encode(),
                                     headers={"Authorization": f"Bearer {USER_TOKEN}"})
    before = set(hub.state.root.rglob("meta.json"))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400 and set(hub.state.root.rglob("meta.json")) == before


def test_visibility_changes_through_update_repo_settings(api):
    api.create_repo("user/flip", repo_type="dataset", private=False)
    api.update_repo_settings("user/flip", repo_type="dataset", private=True)
    assert api.repo_info("user/flip", repo_type="dataset").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).repo_info("user/flip", repo_type="dataset")
    api.update_repo_settings("user/flip", repo_type="dataset", visibility="public")
    assert HfApi(token=False).repo_info("user/flip", repo_type="dataset").private is False
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=OTHER_TOKEN).update_repo_settings("user/flip", repo_type="dataset", private=True)
    assert err.value.response.status_code == 403


@pytest.fixture
def own_hub(tmp_path):
    """A server rooted at tmp_path/hub, so that `../../secret.txt` from its object store is tmp_path/secret.txt."""
    from htd_toolkit.testing.hubserver import serve

    (tmp_path / "secret.txt").write_text("patient list")
    server = serve(tmp_path / "hub")
    yield server
    server.shutdown()


def raw(server, method: str, path: str, body: bytes | None = None, token: str | None = USER_TOKEN,
        headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one request as a hostile client sends it; a dropped connection raises."""
    request = urllib.request.Request(f"{server.url}{path}", method=method, data=body,
                                     headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def commit_body(*lines: dict) -> bytes:
    header = {"key": "header", "value": {"summary": "hostile", "description": ""}}
    return "\n".join(json.dumps(line) for line in (header, *lines)).encode()


def create_raw_repo(server, name: str = "victim") -> None:
    status, _ = raw(server, "POST", "/api/repos/create", json.dumps({"name": name, "type": "model"}).encode())
    assert status == 200


def test_lfs_object_ids_cannot_leave_the_object_store(own_hub):
    create_raw_repo(own_hub)
    outside = {"oid": "../../secret.txt", "size": 12}
    for oid in ("../../secret.txt", "../../nothing-here.txt"):
        status, answer = raw(own_hub, "POST", "/user/victim.git/info/lfs/objects/batch",
                             json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": 12}]}).encode())
        assert status == 400 and b"actions" not in answer  # the same answer whether the file exists or not
    status, _ = raw(own_hub, "POST", "/api/models/user/victim/commit/main",
                    commit_body({"key": "lfsFile", "value": {"path": "leak.txt", "algo": "sha256", **outside}}))
    assert status == 400
    status, _ = raw(own_hub, "GET", "/user/victim/resolve/main/leak.txt")
    assert status == 404
    status, _ = raw(own_hub, "PUT", f"/lfs-upload/{own_hub.state.upload_secret}/..%2F..%2Fsecret.txt",
                    b"patient list")
    assert status == 400 and (own_hub.state.root.parent / "secret.txt").read_text() == "patient list"


@pytest.mark.parametrize("path", ["../escape.txt", "a/../../b.txt", "/etc/passwd", "a//b.txt", "a/./b.txt", "",
                                  "back\\slash.txt", "nul\x00.txt"])
def test_repo_file_paths_are_plain_relative_paths(own_hub, path):
    create_raw_repo(own_hub)
    content = {"path": path, "content": "eA==", "encoding": "base64"}
    status, answer = raw(own_hub, "POST", "/api/models/user/victim/commit/main",
                         commit_body({"key": "file", "value": content}))
    assert status == 400 and b"path" in answer
    files = HfApi(endpoint=own_hub.url, token=USER_TOKEN).list_repo_files("user/victim")
    assert files == [".gitattributes"]


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/models/user/victim/commit/main", b"{not json"),
    ("POST", "/api/models/user/victim/commit/main", b'["a list"]'),
    ("POST", "/api/models/user/victim/commit/main", b'{"key": "file"}'),
    ("POST", "/api/models/user/victim/commit/main", b'{"key": "header", "value": "a string"}'),
    ("POST", "/api/models/user/victim/commit/main", commit_body({"key": "file", "value": {"path": "a.txt",
                                                                                        "content": "%%%"}})),
    ("POST", "/api/models/user/victim/commit/main", b"\xff\xfe"),
    ("POST", "/api/models/user/victim/preupload/main", b'{"files": [{"path": 3}]}'),
    ("POST", "/api/models/user/victim/preupload", b'{"files": []}'),
    ("POST", "/api/models/user/victim/paths-info/main", b"\xff"),
    ("POST", "/user/victim.git/info/lfs/objects/batch", b'{"objects": "none"}'),
    ("POST", "/api/repos/create", b'{"name": "x", "type": "../../elsewhere"}'),
    ("POST", "/api/repos/create", b'{"type": "model"}'),
    ("POST", "/_test/fault", b'{"endpoint": "commit", "count": "many"}'),
    ("GET", "/user/victim/resolve/main/.gitattributes", None),
])
def test_malformed_requests_are_answered_4xx(own_hub, method, path, body):
    create_raw_repo(own_hub)
    headers = {"Range": "bytes=x-y"} if path.endswith("resolve/main/.gitattributes") else None
    status, _ = raw(own_hub, method, path, body, headers=headers)
    assert 400 <= status < 500
    assert raw(own_hub, "GET", "/api/models/user/victim")[0] == 200  # the server still answers
    assert HfApi(endpoint=own_hub.url, token=USER_TOKEN).list_repo_files("user/victim") == [".gitattributes"]
