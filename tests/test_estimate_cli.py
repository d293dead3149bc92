"""`kvchat estimate` as users run it: a real process, tables, JSON, errors, no llama_cpp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvchat.cli.estimate_report import compare_contexts, parse_ctx_list
from kvchat.errors import ExitCode, UsageError
from kvchat.memory import MiB


def test_parse_ctx_list() -> None:
    assert parse_ctx_list("4096") == [4096]
    assert parse_ctx_list("4k, 8K,32k") == [4096, 8192, 32768]
    for bad in ("", "four", "0", "4k,x"):
        with pytest.raises(UsageError):
            parse_ctx_list(bad)


def test_compare_contexts() -> None:
    assert compare_contexts(8192) == [4096, 8192]
    assert compare_contexts(131072) == [4096, 8192, 16384, 32768, 65536, 131072]
    assert compare_contexts(40960) == [4096, 8192, 16384, 32768, 40960]


def test_table_by_component(kvchat, model_path: Path) -> None:  # noqa: ANN001
    r = kvchat("estimate", str(model_path), "--ctx", "4096", "-fa", "off")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "n_ctx 4096" in out and "flash attention off" in out
    # The figures llama.cpp logs for this load. Output: two logits rows, the conversation's
    # and kvchat's scratch sequence's (0.19 MiB each; kvchat.engine reads turns through it).
    for label, figure in (("weights", "92.10 MiB"), ("K cache", "45.00 MiB"), ("V cache", "45.00 MiB"),
                          ("output (logits)", "0.38 MiB"), ("compute", "98.25 MiB")):
        line = next(ln for ln in out.splitlines() if label in ln)
        assert figure in line
    assert "largest context for K f16 / V f16" in out
    assert r.stderr == ""


def test_piped_tables_are_tab_separated_lines(kvchat, model_path: Path) -> None:  # noqa: ANN001
    r = kvchat("estimate", str(model_path), "--ctx", "4k,8k", "--compare", "--vram", "8GiB")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(line == line.rstrip() for line in lines)  # no padding
    assert lines.count("component\tCPU\tGPU0\ttotal") == 2
    at = lines.index("# KV cache (and total) by cache types and context")
    compare = lines[at + 1:at + 6]  # a header and 4 K/V pairs, then the closing line
    assert compare[0].split("\t")[0] == "K / V" and lines[at + 6].startswith("largest context")
    # a two-line terminal cell becomes one: "KV (total)"
    assert all(len(row.split("\t")) == len(compare[0].split("\t")) for row in compare)


def test_one_name_and_one_weights_figure(kvchat, model_path: Path) -> None:  # noqa: ANN001
    r = kvchat("estimate", str(model_path), "--vram", "8GiB", "--ngl", "auto", "--json")
    record = json.loads(r.stdout)
    assert record["name"] == "smollm2-135m"  # as `kvchat list` names it
    table = kvchat("estimate", str(model_path), "--vram", "8GiB", "--ngl", "auto").stdout
    weights = record["plans"][0]["total"]["weights"]
    heading = table.splitlines()[0]
    assert heading.startswith("smollm2-135m · llama · 30 layers")
    assert heading.endswith(f"weights {weights / MiB:.2f} MiB")
    row = next(line for line in table.splitlines() if line.startswith("weights\t"))
    assert row.split("\t")[-1] == f"{weights / MiB:.2f} MiB"


def test_sizes_need_a_unit_and_nothing_fitting_is_an_error(kvchat, model_path: Path) -> None:  # noqa: ANN001
    bare = kvchat("estimate", str(model_path), "--vram", "8")
    assert bare.returncode == ExitCode.USAGE and "no unit" in bare.stderr and "8GiB" in bare.stderr
    assert bare.stdout == ""
    below_margin = kvchat("estimate", str(model_path), "--vram", "512MiB")
    assert below_margin.returncode == ExitCode.USAGE and "leaves nothing" in below_margin.stderr
    tiny = kvchat("estimate", str(model_path), "--ram", "50MiB", "--margin", "0")
    assert tiny.returncode == ExitCode.OUT_OF_MEMORY
    assert "none fits" in tiny.stdout
    assert tiny.stderr.startswith("kvchat: error: smollm2-135m does not fit") and tiny.stderr.count("\n") == 1
    greedy_margin = kvchat("estimate", str(model_path), "--margin", "100000GiB")
    assert greedy_margin.returncode == ExitCode.OUT_OF_MEMORY
    assert greedy_margin.stdout.splitlines()[-1].endswith("(budget after margin: RAM 0.00 MiB)")
    as_json = kvchat("estimate", str(model_path), "--ram", "50MiB", "--margin", "0", "--json")
    assert as_json.returncode == ExitCode.OUT_OF_MEMORY and json.loads(as_json.stdout)["largest_ctx"] is None


def test_json_and_several_contexts(kvchat, model_path: Path) -> None:  # noqa: ANN001
    r = kvchat("estimate", str(model_path), "--ctx", "1000,8k", "-ctk", "q8_0", "-ctv", "q8_0", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["architecture"] == "llama" and record["n_ctx_train"] == 8192
    first, second = record["plans"]
    assert (first["n_ctx"], second["n_ctx"]) == (1024, 8192)  # rounded as llama.cpp rounds
    assert first["cache_type_k"] == "q8_0" and first["flash_attn"] is True
    assert f"{first['total']['k'] / MiB:.2f}" == "5.98"
    assert first["devices"]["CPU"]["total"] == first["total"]["total"]


def test_compare_grid(kvchat, model_path: Path) -> None:  # noqa: ANN001
    r = kvchat("estimate", str(model_path), "--compare", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["compare"]
    assert [(row["cache_type_k"], row["cache_type_v"]) for row in rows] == [
        ("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
    assert [p["n_ctx"] for p in rows[0]["plans"]] == [4096, 8192]
    kv = [row["plans"][1]["total"]["k"] + row["plans"][1]["total"]["v"] for row in rows]
    assert kv == sorted(kv, reverse=True)
    table = kvchat("estimate", str(model_path), "--compare")
    assert "q4_0 / q4_0" in table.stdout and "8k" in table.stdout


def test_budget_flags(kvchat, model_path: Path) -> None:  # noqa: ANN001
    r = kvchat("estimate", str(model_path), "--ram", "250MiB", "--margin", "0", "--json")
    record = json.loads(r.stdout)
    assert record["budget"]["ram"] == 250 * MiB
    assert 0 < record["largest_ctx"] < 8192
    gpu = json.loads(kvchat("estimate", str(model_path), "--vram", "8GB", "--json").stdout)
    assert "GPU0" in gpu["plans"][0]["devices"] and gpu["plans"][0]["n_gpu_layers"] == 31
    auto_args = ("--vram", "150MiB", "--margin", "0", "--ngl", "auto", "--json")
    auto = json.loads(kvchat("estimate", str(model_path), *auto_args).stdout)
    assert 0 < auto["plans"][0]["n_gpu_layers"] < 31
    assert auto["plans"][0]["devices"]["GPU0"]["total"] <= 150 * MiB


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--ram", "lots"], ExitCode.USAGE, "cannot read the size"),
        (["--ctx", "big"], ExitCode.USAGE, "token count"),
        (["-ctv", "q8_0", "-fa", "off"], ExitCode.USAGE, "flash attention"),
        (["-ctk", "q3"], ExitCode.USAGE, "is not a cache type"),
        (["--ngl", "many"], ExitCode.USAGE, "--ngl"),
    ],
)
def test_usage_errors(kvchat, model_path: Path, args: list[str], code: int, text: str) -> None:  # noqa: ANN001
    r = kvchat("estimate", str(model_path), *args)
    assert r.returncode == code
    assert text in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_model_errors(kvchat, tmp_path: Path) -> None:  # noqa: ANN001
    missing = kvchat("estimate", str(tmp_path / "nope.gguf"))
    assert missing.returncode == ExitCode.NOT_FOUND and "Traceback" not in missing.stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\xff" * 64)
    bad = kvchat("estimate", str(fake))
    assert bad.returncode == ExitCode.BAD_MODEL
    assert bad.stderr.startswith("kvchat: error:") and bad.stderr.count("\n") == 1


def test_exact_prints_llama_cpp_figures(kvchat, model_path: Path) -> None:  # noqa: ANN001
    r = kvchat("estimate", str(model_path), "--ctx", "512", "--exact", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    exact, plan = record["exact"][0], record["plans"][0]
    assert exact["kv_cells"] == 512
    assert f"{exact['k'] / MiB:.2f}" == f"{plan['total']['k'] / MiB:.2f}"
    # The output buffer holds a logits row per sequence, kvchat's scratch sequence's too
    # (a row is 192 KiB here; llama.cpp adds ~1% of its own to the buffer).
    planned = plan["total"]["output"]
    assert planned > 0 and abs(exact["output"] - planned) < 0.02 * exact["output"]
    table = kvchat("estimate", str(model_path), "--ctx", "512", "--exact")
    assert "plan vs llama.cpp" in table.stdout and "difference" in table.stdout


def test_estimate_does_not_import_llama_cpp(model_path: Path, kv_env: dict[str, str]) -> None:
    # Nor the engine protocols or the conversation machinery: each is start-up cost
    # (kvchat.engine_api alone was 2% of estimate's instructions) for nothing it uses.
    unwanted = ("llama_cpp", "kvchat.engine", "kvchat.engine_api", "kvchat.session", "kvchat.app.lifecycle")
    code = (
        "import sys\n"
        "from kvchat.cli import main\n"
        f"main(['estimate', {str(model_path)!r}, '--compare', '--ctx', '4k,8k'])\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp' or m in {unwanted!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=kv_env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _with_vocab(path: Path, tokens: list[str], **extra: int) -> Path:
    from synthetic import write_gguf

    kv = {"context_length": 4096, "embedding_length": 64, "attention.head_count": 2,
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, **extra}
    return write_gguf(path, "llama", kv, n_layer=2, vocab=len(tokens))


def test_draft_vocabulary_is_checked_from_the_headers(kvchat, tmp_path: Path) -> None:  # noqa: ANN001
    words = [f"w{i}" for i in range(300)]
    target = _with_vocab(tmp_path / "target.gguf", words, **{"tokenizer.ggml.bos_token_id": 1})
    same = _with_vocab(tmp_path / "draft.gguf", words[:250])  # a few padding tokens short: allowed
    ok = kvchat("estimate", str(target), "--ctx", "4096", "--draft", str(same), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["draft"]["name"] == "draft"  # the name `kvchat list` would give
    table = kvchat("estimate", str(target), "--ctx", "4096", "--draft", str(same))
    assert "draft model draft at the same settings:" in table.stdout
    other = _with_vocab(tmp_path / "other.gguf", [*words[:7], "x", *words[8:]])
    refused = kvchat("estimate", str(target), "--ctx", "4096", "--draft", str(other))
    assert refused.returncode == ExitCode.USAGE and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "draft model other.gguf cannot draft for target.gguf" in \
        refused.stderr and "token 7 is 'w7' in one model and 'x' in the other" in refused.stderr
    small = _with_vocab(tmp_path / "small.gguf", words[:100])
    refused = kvchat("estimate", str(target), "--draft", str(small))
    assert refused.returncode == ExitCode.USAGE
    assert "vocabulary sizes differ (300 vs 100 tokens)" in refused.stderr
    bos = _with_vocab(tmp_path / "bos.gguf", words, **{"tokenizer.ggml.bos_token_id": 2})
    refused = kvchat("estimate", str(target), "--draft", str(bos))
    assert refused.returncode == ExitCode.USAGE and "BOS tokens differ (1 vs 2)" in refused.stderr
