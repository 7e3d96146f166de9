"""`generate --push-to-hub` streaming shards to the local Hub test server: same files as a local run plus
`push`, batched commits, a bounded local disk, array jobs into one repo, and runs that stop and continue."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from datasets import load_dataset
from huggingface_hub import HfApi

from htd_toolkit.generate import bundle as bundle_module
from htd_toolkit.testing.hubserver import USER_TOKEN
from tests.helpers import run_cli
from tests.test_generate import gen_args

REFERENCE = "user/stream-reference"


@pytest.fixture(scope="module")
def reference(model_dir, prepared, tmp_path_factory):
    """A local run (6 samples, shards of 4) pushed at the end: the repo every streamed run must equal."""
    from htd_toolkit.cli import main

    out = tmp_path_factory.mktemp("reference") / "b"
    os.environ["HF_TOKEN"] = USER_TOKEN
    try:
        assert main(gen_args(model_dir, prepared, out, 6, "--push-to-hub", REFERENCE, "--no-stream")) == 0
    finally:
        del os.environ["HF_TOKEN"]
    return out


def repo_files(repo_id: str) -> dict[str, str]:
    """path -> git blob id of every file in the repo (equal ids, equal bytes); the card as its text with the repo's
    name taken out (a card names its own repo)."""
    api = HfApi(token=USER_TOKEN)
    tree = api.list_repo_tree(repo_id, repo_type="dataset", recursive=True)
    files = {item.path: item.blob_id for item in tree if hasattr(item, "blob_id")}
    if "README.md" in files:
        card = Path(api.hf_hub_download(repo_id, "README.md", repo_type="dataset"))
        files["README.md"] = card.read_text().replace(repo_id, "ORG/NAME")
    return files


def commits_to(hub, repo_id: str) -> int:
    return sum(1 for method, path in hub.state.request_log if path.endswith(f"/datasets/{repo_id}/commit/main"))


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    monkeypatch.setattr("htd_toolkit.publish.hub.time.sleep", lambda s: None)


def test_a_streamed_run_equals_a_local_run_and_push_file_for_file(reference, model_dir, prepared, tmp_path, capsys,
                                                                    token):
    code, _, err = run_cli(gen_args(model_dir, prepared, tmp_path / "s", 6, "--push-to-hub", "user/streamed",
                                    "--commit-every", "1"), capsys)
    assert code == 0, err
    ours, theirs = repo_files("user/streamed"), repo_files(REFERENCE)
    assert "data/train-00001.tar" in ours and "assets/sample_grid.png" in ours
    assert ours == theirs
    assert HfApi(token=USER_TOKEN).dataset_info("user/streamed").private is True
    assert (tmp_path / "s" / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()


def test_commits_are_batched(model_dir, prepared, tmp_path, capsys, token, hub):
    args = gen_args(model_dir, prepared, tmp_path / "s", 6, "--push-to-hub", "user/batched", "--commit-every", "4")
    args[args.index("--shard-size") + 1] = "1"  # six shards
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert 1 < commits_to(hub, "user/batched") <= math.ceil(6 / 4) + 2
    rows = load_dataset("user/batched", split="train", cache_dir=str(tmp_path / "c"), token=USER_TOKEN)
    assert rows["__key__"] == [f"syn-{i:08d}" for i in range(6)]


def test_max_local_shards_bounds_the_disk_and_deletes_committed_shards(model_dir, prepared, tmp_path, capsys, token):
    out = tmp_path / "s"
    args = gen_args(model_dir, prepared, out, 6, "--push-to-hub", "user/bounded", "--commit-every", "10",
                    "--commit-minutes", "5", "--max-local-shards", "2", "--batch-size", "1")
    args[args.index("--shard-size") + 1] = "1"
    most, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            most[0] = max(most[0], len(list((out / "data").glob("*.tar"))) if (out / "data").exists() else 0)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.monotonic()
    try:
        code, _, err = run_cli(args, capsys)
    finally:
        done.set()
        sampler.join()
    assert code == 0, err
    assert 0 < most[0] <= 2 + 1  # the budget plus the shard being written
    assert time.monotonic() - began < 240  # a full disk is committed at once, not after --commit-minutes (300 s)
    assert list((out / "data").glob("*.tar")) == [] and not (out / "manifest.json").exists()
    files = repo_files("user/bounded")
    assert sorted(p for p in files if p.startswith("data/")) == [f"data/train-{i:05d}.tar" for i in range(6)]
    assert {"manifest.json", "README.md", "assets/sample_grid.png", "assets/heterogeneity.png"} <= set(files)


def test_two_array_jobs_push_one_bundle_loadable_in_between(reference, model_dir, prepared, tmp_path, capsys, token):
    code, _, err = run_cli(gen_args(model_dir, prepared, tmp_path / "j1", 6, "--push-to-hub", "user/array",
                                    "--shard", "1/2"), capsys)
    assert code == 0, err
    rows = load_dataset("user/array", split="train", cache_dir=str(tmp_path / "c1"), token=USER_TOKEN)
    assert rows["__key__"] == ["syn-00000004", "syn-00000005"]  # the repo loads with what is committed so far
    assert "assets/sample_grid.png" not in repo_files("user/array")
    code, _, err = run_cli(gen_args(model_dir, prepared, tmp_path / "j0", 6, "--push-to-hub", "user/array",
                                    "--shard", "0/2"), capsys)
    assert code == 0, err
    assert not (tmp_path / "j0" / "data" / "train-00001.tar").exists()  # each job made its own range only
    rows = load_dataset("user/array", split="train", cache_dir=str(tmp_path / "c2"), token=USER_TOKEN)
    assert sorted(rows["__key__"]) == [f"syn-{i:08d}" for i in range(6)] and rows.column_names[:3] == \
        ["png", "mask.png", "json"]
    assert repo_files("user/array") == repo_files(REFERENCE)
    code, out, err = run_cli(["push", "--finalize", "user/array"], capsys)
    assert code == 0 and "6 samples in 2 shards" in out, err
    assert repo_files("user/array") == repo_files(REFERENCE)


def test_finalize_names_the_missing_shards(model_dir, prepared, tmp_path, capsys, token):
    assert run_cli(gen_args(model_dir, prepared, tmp_path / "j", 6, "--push-to-hub", "user/half", "--shard", "0/2"),
                   capsys)[0] == 0
    code, _, err = run_cli(["push", "--finalize", "user/half"], capsys)
    assert code == 1 and "user/half: 1 of 2 shards are committed" in err


def test_a_commit_made_on_a_stale_head_is_redone_on_the_new_one(reference, model_dir, prepared, tmp_path, capsys,
                                                               token, monkeypatch):
    """Job 1 read the head before job 0 committed its shard and manifest: its commit on that head is refused
    (412) and made again on the new one, the two manifests merged, so the repo ends complete."""
    from htd_toolkit.publish import stream

    api = HfApi(token=USER_TOKEN)
    api.create_repo("user/race", repo_type="dataset", private=True)
    stale = api.dataset_info("user/race").sha
    assert run_cli(gen_args(model_dir, prepared, tmp_path / "j0", 6, "--push-to-hub", "user/race", "--shard", "0/2"),
                   capsys)[0] == 0
    real, calls = stream.head_commit, []

    def stale_head_twice(api, repo_id):  # job 1 opens and makes its first commit on the head it read early
        calls.append(repo_id)
        return stale if len(calls) <= 2 else real(api, repo_id)

    monkeypatch.setattr(stream, "head_commit", stale_head_twice)
    code, _, err = run_cli(gen_args(model_dir, prepared, tmp_path / "j1", 6, "--push-to-hub", "user/race",
                                    "--shard", "1/2"), capsys)
    assert code == 0, err
    assert len(calls) == 3 and repo_files("user/race") == repo_files(REFERENCE)


@pytest.mark.parametrize("where", ["generation", "upload", "commit"])
def test_a_run_stopped_anywhere_continues_to_the_same_bytes(reference, model_dir, prepared, tmp_path, capsys, token,
                                                             monkeypatch, hub, where):
    repo, out = f"user/stopped-{where}", tmp_path / "s"
    args = gen_args(model_dir, prepared, out, 6, "--push-to-hub", repo, "--commit-every", "1")
    real = bundle_module.run_shards
    if where == "generation":  # and its committed shard deleted: only the repo says it is made
        args += ["--max-local-shards", "1"]

        def crash_after_first_shard(pipe, todo, *rest):
            real(pipe, todo[:1], *rest)
            raise KeyboardInterrupt

        monkeypatch.setattr(bundle_module, "run_shards", crash_after_first_shard)
    else:  # a failure the retries cannot cure
        hub.state.fail_next("preupload" if where == "upload" else "commit", count=1, status=400)
    code, _, err = run_cli(args, capsys)
    assert code != 0 and hub.state.faults.get("preupload" if where == "upload" else "commit", []) == []
    if where != "generation":
        assert f"push to {repo} failed: HTTP 400; finished shards are kept" in err
    monkeypatch.setattr(bundle_module, "run_shards", real)
    made = []
    monkeypatch.setattr(bundle_module, "run_shards", lambda pipe, todo, *rest: made.append(todo) or real(pipe, todo,
                                                                                                       *rest))
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert repo_files(repo) == repo_files(REFERENCE)
    if where == "generation":  # shard 0 was committed before the crash: only shard 1 is made again
        assert made == [[1]] and not (out / "data" / "train-00000.tar").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["generation", "preupload", "commit"])
def test_a_process_killed_anywhere_continues_to_the_same_bytes(reference, model_dir, prepared, tmp_path, hub, where):
    """kill -9 once the first shard is written, or while the server holds its upload or its commit (the held
    request is answered later, to a dead client); the same command then ends with the reference repo."""
    repo, out = f"user/killed-{where}", tmp_path / "s"
    env = {**os.environ, "HF_TOKEN": USER_TOKEN, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "htd_toolkit.cli", *gen_args(model_dir, prepared, out, 6, "--push-to-hub", repo,
                                                               "--commit-every", "1")]
    if where != "generation":
        hub.state.delay_next(where, 30.0)

    def reached() -> bool:
        if where == "generation":
            return (out / ".work" / "shards" / "00000.json").exists()
        return any(path.endswith(f"/datasets/{repo}/{where}/main") for _, path in hub.state.request_log)

    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not reached():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    if where != "generation":
        assert "data/train-00000.tar" not in repo_files(repo)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert repo_files(repo) == repo_files(REFERENCE)
    shutil.rmtree(out)


@pytest.mark.slow
def test_two_launched_processes_stream_one_bundle(model_dir, prepared, tmp_path):
    """`accelerate launch` with two processes: each uploads and commits its own shard into one repo, which then
    loads with every sample exactly once."""
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).with_name("accelerate")
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu_two_process.yaml"
    cmd = [str(launcher), "launch", "--config_file", str(config), "-m", "htd_toolkit.cli",
           *gen_args(model_dir, prepared, out, 6, "--push-to-hub", "user/launched", "--max-local-shards", "1")]
    env = {**os.environ, "HF_TOKEN": USER_TOKEN, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((out / "data").glob("*.tar")) == []  # both shards committed, then deleted
    rows = load_dataset("user/launched", split="train", cache_dir=str(tmp_path / "c"), token=USER_TOKEN)
    assert sorted(rows["__key__"]) == [f"syn-{i:08d}" for i in range(6)]
    manifest = json.loads(Path(HfApi(token=USER_TOKEN).hf_hub_download("user/launched", "manifest.json",
                                                                        repo_type="dataset")).read_text())
    assert [s["path"] for s in manifest["shards"]] == ["data/train-00000.tar", "data/train-00001.tar"]
    assert "assets/sample_grid.png" in repo_files("user/launched")


def crafted_repo(repo_id: str, manifest: dict, shard: bytes = b"") -> None:
    """A dataset repo holding `manifest` as its manifest.json (and `shard` as data/train-00000.tar)."""
    from huggingface_hub import CommitOperationAdd

    api = HfApi(token=USER_TOKEN)
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    files = {"manifest.json": json.dumps(manifest).encode(), **({"data/train-00000.tar": shard} if shard else {})}
    api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=k, path_or_fileobj=v) for k, v in files.items()],
                      repo_type="dataset", commit_message="crafted")


CRAFTED_CLASSES = [{"index": 0, "name": "background", "color": "#000000"},
                   {"index": 1, "name": "tumour", "color": "#ff0000"}]


SOURCE = {"model": "local:m"}
NO_COUNTS = "no config with num_samples and shard_size (whole numbers >= 1): not a bundle `generate` made"


@pytest.mark.parametrize(("fields", "problem"), [
    ({"source": SOURCE}, NO_COUNTS), ({"source": SOURCE, "config": [1]}, NO_COUNTS),
    ({"source": SOURCE, "config": {"num_samples": 0, "shard_size": 1}}, NO_COUNTS),
    ({"source": SOURCE, "config": {"num_samples": 3, "shard_size": 0}}, NO_COUNTS),
    ({"source": SOURCE, "config": {"num_samples": "3", "shard_size": 1}}, NO_COUNTS),
    ({"config": {"num_samples": 3, "shard_size": 1}}, "no source naming the model: not a bundle `generate` made"),
    ({"source": "x", "config": {"num_samples": 3, "shard_size": 1}},
     "no source naming the model: not a bundle `generate` made")])
def test_finalize_of_a_repo_whose_manifest_is_not_a_generated_bundles_is_one_line(fields, problem, capsys, token):
    """A prepared dataset's manifest (no config, no model), one whose counts are not whole numbers >= 1 or
    without a source naming the model: one line, not a KeyError, ZeroDivisionError or TypeError."""
    import hashlib

    repo_id = f"user/crafted-{hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:8]}"
    crafted_repo(repo_id, {"classes": CRAFTED_CLASSES, "shards": [], **fields})
    code, _, err = run_cli(["push", "--finalize", repo_id], capsys)
    assert code == 1 and err == f"error: {repo_id}: its manifest.json: {problem}\n"


def test_finalize_counts_a_shard_listed_twice_once(capsys, token):
    import hashlib

    shard = b"not really a tar"
    record = {"path": "data/train-00000.tar", "sha256": hashlib.sha256(shard).hexdigest(), "samples": 1}
    crafted_repo("user/crafted-twice", {"classes": CRAFTED_CLASSES, "shards": [record, record], "source": SOURCE,
                                        "config": {"num_samples": 2, "shard_size": 1}}, shard)
    code, _, err = run_cli(["push", "--finalize", "user/crafted-twice"], capsys)
    assert code == 1 and "user/crafted-twice: 1 of 2 shards are committed" in err


def test_a_commit_interval_beyond_the_longest_wait_the_platform_takes_is_waited(tmp_path, monkeypatch):
    """--commit-minutes 1e9 is a finite number above 0, but a wait of 6e10 s is an OverflowError for
    threading's locks: the uploader waits at most threading.TIMEOUT_MAX at a time."""
    from htd_toolkit.publish.stream import HubStream, StreamOptions

    stream = HubStream(StreamOptions("user/patient", commit_minutes=1e9), tmp_path)
    committed = []
    monkeypatch.setattr(stream, "_upload", lambda shard, record: (shard, None, record))
    monkeypatch.setattr(stream, "_commit", lambda pending: committed.append(len(pending)))
    stream.queue.put((0, {}))
    threading.Timer(0.5, stream.queue.put, [None]).start()  # the end comes while the uploader waits
    stream._run()
    assert stream.error is None and committed == [1]
