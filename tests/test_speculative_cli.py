"""Speculative decoding through the commands: flags, config key, JSON, stats, errors,
named sessions, and the draft model's memory in `estimate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvchat.errors import ExitCode

GREEDY = ("--temperature", "0", "--seed", "1", "--ctx", "4096")
COPY = ("Repeat this list exactly:\n" + "\n".join(f"- item {i}: the {w} box" for i, w in
        enumerate(["red", "blue", "green", "small", "large", "heavy", "light", "round"])))


def _json(kvchat, *args: str) -> dict:  # noqa: ANN001
    result = kvchat("run", "--json", "--max-tokens", "60", *GREEDY, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_json_shows_drafts_and_the_text_is_unchanged(kvchat) -> None:  # noqa: ANN001
    spec = _json(kvchat, COPY)
    plain = _json(kvchat, "--speculative", "off", COPY)
    assert spec["text"] == plain["text"]
    assert spec["speculative"]["mode"] == "ngram"
    assert spec["speculative"]["accepted_tokens"] > 0
    assert spec["speculative"]["acceptance"] == pytest.approx(
        spec["speculative"]["accepted_tokens"] / spec["speculative"]["drafted_tokens"], abs=1e-4)
    assert plain["speculative"] == {"mode": "off", "drafted_tokens": 0, "accepted_tokens": 0,
                                    "acceptance": 0.0}


@pytest.mark.slow
def test_named_sessions_get_the_same_tokens(kvchat, kv_env: dict[str, str]) -> None:  # noqa: ANN001
    texts = {}
    for mode in ("ngram", "off"):
        first = _json(kvchat, "--session", mode, "--speculative", mode, COPY)
        second = _json(kvchat, "--session", mode, "--speculative", mode, "Now repeat it once more.")
        assert second["cache"]["reused_tokens"] > 0
        texts[mode] = (first["text"], second["text"])
    assert texts["ngram"] == texts["off"]


def test_stats_line_names_the_effective_speed(kvchat) -> None:  # noqa: ANN001
    result = kvchat("run", "--stats", "--max-tokens", "60", *GREEDY, COPY)
    assert result.returncode == 0, result.stderr
    assert "tok/s effective" in result.stderr and "accepted (" in result.stderr


@pytest.mark.slow
def test_config_key_and_env_turn_it_off(kvchat, kv_env: dict[str, str]) -> None:  # noqa: ANN001
    Path(kv_env["KVCHAT_HOME"]).mkdir(parents=True, exist_ok=True)
    (Path(kv_env["KVCHAT_HOME"]) / "config.toml").write_text('[defaults]\nspeculative = "off"\n')
    assert _json(kvchat, COPY)["speculative"]["mode"] == "off"
    assert _json(kvchat, "--speculative", "ngram", COPY)["speculative"]["mode"] == "ngram"


def _one_line_error(result, code: ExitCode, *needles: str) -> None:  # noqa: ANN001
    assert result.returncode == code, (result.returncode, result.stderr)
    # Warnings about the machine (busy cores) may come first; the error is one line.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("kvchat: warning:")]
    assert len(lines) == 1 and lines[0].startswith("kvchat: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_bad_flags_are_one_line_errors(kvchat) -> None:  # noqa: ANN001
    _one_line_error(kvchat("run", "--speculative", "fast", "hi"), ExitCode.USAGE, "--speculative")
    _one_line_error(kvchat("run", "--speculative", "draft", "hi"), ExitCode.USAGE, "--draft")


def test_a_draft_model_with_another_vocabulary_is_refused(kvchat, gemma_path: Path) -> None:  # noqa: ANN001
    result = kvchat("run", "--draft", str(gemma_path), *GREEDY, "hi")
    _one_line_error(result, ExitCode.USAGE, "cannot draft for", "vocabulary")


@pytest.mark.slow
def test_draft_model_runs(kvchat, model_path: Path) -> None:  # noqa: ANN001
    record = _json(kvchat, "--draft", str(model_path), COPY)
    assert record["speculative"]["mode"] == "draft"
    assert record["speculative"]["drafted_tokens"] > 0


def test_estimate_plans_the_draft_model_too(kvchat, model_path: Path) -> None:  # noqa: ANN001
    result = kvchat("estimate", str(model_path), "--ctx", "4096", "--draft", str(model_path), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    draft = record["draft"]
    assert draft["model"] == str(model_path)
    target_total = record["plans"][0]["total"]["total"]
    assert draft["plans"][0]["total"]["total"] == target_total  # the same model, the same plan
    assert draft["total_with_target"] == [2 * target_total]
    table = kvchat("estimate", str(model_path), "--ctx", "4096", "--draft", str(model_path))
    assert table.returncode == 0 and "target + draft" in table.stdout
