"""`kvchat bench`: quality maths on the real model, pair parsing, recommendations, JSON."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvchat.bench import (
    SCHEMA,
    BenchResult,
    BenchSettings,
    CachePair,
    PairResult,
    SpeedResult,
    Spread,
    bench_text,
    parse_cache_pairs,
    plan_steps,
    recommend,
    run_bench,
    speed_difference,
    to_json,
)
from kvchat.bench_quality import (
    QualityResult,
    QualityStats,
    compare_engines,
    compare_with_reference,
    log_softmax,
    record_reference,
)
from kvchat.cache_types import parse_cache_type
from kvchat.cli.bench import _speed
from kvchat.engine import Engine, EngineSettings
from kvchat.errors import ExitCode, UsageError

N_CTX = 512  # one thread: on 2 shared cores, OpenMP threads that spin slow llama.cpp down
N_TOKENS = 256  # a slice of the bundled text: enough positions, a few seconds per run


def _engine(model_path: Path, k: str, v: str) -> Engine:
    return Engine(
        model_path,
        EngineSettings(n_ctx=N_CTX, type_k=parse_cache_type(k), type_v=parse_cache_type(v),
                       flash_attn="on", n_threads=1),
    )


@pytest.fixture(scope="module")
def tokens(model_path: Path) -> list[int]:
    with _engine(model_path, "f16", "f16") as engine:
        return engine.tokenize(bench_text(), add_special=True)[:N_TOKENS]


@pytest.fixture(scope="module")
def reference(model_path: Path, tokens: list[int]) -> Iterator[tuple[object, QualityResult]]:
    """The f16/f16 run's logits spooled once for the module, and its own figures."""
    with tempfile.TemporaryFile() as spool, _engine(model_path, "f16", "f16") as engine:
        yield spool, record_reference(engine, tokens, spool)


# -- the maths on the real model ------------------------------------------------------


def test_f16_against_a_second_f16_context_is_exactly_zero(model_path, tokens, reference) -> None:
    spool, ref = reference
    with _engine(model_path, "f16", "f16") as engine:
        again = compare_with_reference(engine, tokens, spool)
    assert again.kl_mean == 0.0 and again.kl_p99 == 0.0
    assert again.top1_agreement == 1.0
    assert again.perplexity == ref.perplexity  # bitwise the same run
    assert again.n_positions == ref.n_positions == N_TOKENS - 1
    assert 1.0 < ref.perplexity < 200.0  # a real model reading English


def test_q4_0_drifts_more_than_q8_0(model_path, tokens, reference) -> None:
    spool, ref = reference
    quality = {}
    for name in ("q8_0", "q4_0"):
        with _engine(model_path, name, name) as engine:
            quality[name] = compare_with_reference(engine, tokens, spool)
    q8, q4 = quality["q8_0"], quality["q4_0"]
    assert 0.0 < q8.kl_mean < q4.kl_mean
    assert q8.top1_agreement > q4.top1_agreement
    assert q8.top1_agreement > 0.8
    assert abs(q8.perplexity - ref.perplexity) < abs(q4.perplexity - ref.perplexity) + 0.5


def test_eval_logits_streams_bounded_chunks(model_path, tokens) -> None:
    with _engine(model_path, "f16", "f16") as engine:
        chunks = list(engine.eval_logits(tokens[:100], max_rows=32))
        assert [c.shape for c in chunks] == [(32, engine.n_vocab)] * 3 + [(4, engine.n_vocab)]
        assert chunks[0].dtype == np.float32 and engine.n_past == 100
        with pytest.raises(UsageError):
            list(engine.eval_logits(tokens + tokens))  # past the context


def test_compare_engines_is_deterministic(model_path, tokens) -> None:
    with _engine(model_path, "f16", "f16") as ref, _engine(model_path, "q8_0", "q4_0") as other:
        first = compare_engines(ref, other, tokens[:128])
        second = compare_engines(ref, other, tokens[:128])
    assert first == second
    assert first.kl_mean > 0


# -- the maths on known distributions ----------------------------------------------------


def test_log_softmax_and_kl_match_a_hand_computation() -> None:
    p = np.array([0.5, 0.25, 0.25])
    q = np.array([0.25, 0.25, 0.5])
    ref_logits = np.log(p)[None, :].astype(np.float32) + 3.0  # shifts do not matter
    logits = np.log(q)[None, :].astype(np.float32) - 1.0
    np.testing.assert_allclose(np.exp(log_softmax(ref_logits)), p[None, :], rtol=1e-6)
    stats = QualityStats()
    stats.add(ref_logits, logits, np.array([2]))
    result = stats.result()
    expected_kl = float((p * np.log(p / q)).sum())
    assert result.kl_mean == pytest.approx(expected_kl, rel=1e-6)
    assert result.top1_agreement == 0.0  # argmax 0 against argmax 2
    assert result.perplexity == pytest.approx(2.0, rel=1e-6)  # q(token 2) = 0.5


def test_uniform_prediction_has_the_vocabulary_as_perplexity() -> None:
    logits = np.zeros((10, 50), dtype=np.float32)
    stats = QualityStats()
    stats.add(logits, logits, np.arange(9))  # the last row has no next token
    result = stats.result()
    assert result.n_positions == 9
    assert result.perplexity == pytest.approx(50.0)
    assert result.kl_mean == 0.0 and result.top1_agreement == 1.0


# -- parsing and recommendations -----------------------------------------------------------


def test_parse_cache_pairs() -> None:
    names = [p.name for p in parse_cache_pairs("q8_0, Q8_0/q4_0,f16,q8_0")]
    assert names == ["f16/f16", "q8_0/q8_0", "q8_0/q4_0"]
    assert [p.name for p in parse_cache_pairs("q4_0")] == ["f16/f16", "q4_0/q4_0"]
    for bad in ("bogus", "q8_0/nope", " , "):
        with pytest.raises(UsageError):
            parse_cache_pairs(bad)


def _row(k: str, v: str, kv_mib: float, kl: float) -> PairResult:
    return PairResult(
        CachePair(parse_cache_type(k), parse_cache_type(v)), int(kv_mib * 2**20), None, 0.1,
        quality=QualityResult(100, 10.0, kl, kl * 5, 1.0 - kl),
    )


def test_recommend_keeps_the_pareto_front() -> None:
    rows = [_row("f16", "f16", 90, 0.0), _row("q8_0", "q8_0", 48, 0.004),
            _row("q8_0", "q4_0", 37, 0.06), _row("q4_0", "q4_0", 25, 0.05)]
    result = BenchResult(Path("m.gguf"), BenchSettings(), 4096, 2, "on", rows)
    lines = recommend(result)
    # q8_0/q4_0 is bigger than q4_0/q4_0 and drifts more: never the best choice.
    assert [r.pair.name for r in lines] == ["f16/f16", "q8_0/q8_0", "q4_0/q4_0"]
    assert lines[0].text == "f16/f16: reference"
    assert lines[1].text.startswith("q8_0/q8_0: \u221246.7% KV, KL 0.0040")


def test_speed_is_compared_only_when_the_spread_allows() -> None:
    base = Spread((100.0, 101.0, 102.0))
    assert speed_difference(Spread((80.0, 80.5, 81.0)), base) == "\u221220.3%"
    assert speed_difference(Spread((100.5, 101.0, 101.5)), base).startswith("within the spread")
    assert speed_difference(Spread((50.0, 80.0, 110.0)), base).startswith("not compared (spread ±37.5%")
    assert speed_difference(Spread((80.0,)), Spread((100.0,))).startswith("not compared (one run")
    row = _row("q4_0", "q4_0", 25, 0.05)
    row.speed = SpeedResult(Spread((1.1,)), Spread((1.2,)), Spread((0.5,)))
    ref = _row("f16", "f16", 90, 0.0)
    ref.speed = SpeedResult(Spread((5.0,)), Spread((5.5,)), Spread((0.1,)))
    result = BenchResult(Path("m.gguf"), BenchSettings(repeats=1), 4096, 2, "off", [ref, row])
    text = recommend(result)[1].text
    assert "decode not compared (one run" in text


def test_speeds_keep_their_digits() -> None:
    assert _speed(Spread((1.234,))) == "1.23 (1 run)"
    assert _speed(Spread((12.0, 12.5, 13.0))) == "12.5±4.0%"
    assert _speed(Spread((1234.0, 1300.0))) == "1,267±2.6%"


class _FakeEngine:
    """Just enough of Engine for run_bench: logits that depend on the K cache type."""

    def __init__(self, pair: CachePair) -> None:
        self.pair, self.n_ctx, self.load_s, self.closed = pair, 512, 0.01, False
        self.buffers = type("B", (), {"kv": {"CPU": int(pair.type_k.bytes_per_element * 2**20)}})()

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return [ord(c) % 50 for c in text[:1000]]

    def kv_clear(self) -> None: ...
    def eval(self, tokens: list[int]) -> None: ...
    def set_sampling(self, sampling: object) -> None: ...

    def generate(self, max_tokens: int, *, stop_at_eog: bool) -> Iterator[int]:
        yield from range(max_tokens)

    def eval_logits(self, tokens: list[int], *, max_rows: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(0)
        noise = 0.0 if self.pair.type_k.name == "f16" else 1.0 / self.pair.type_k.bytes_per_element
        for start in range(0, len(tokens), max_rows):
            rows = min(max_rows, len(tokens) - start)
            yield (rng.normal(size=(rows, 50)) * (1 + noise * rng.normal(size=(rows, 50)))).astype(np.float32)

    def close(self) -> None:
        self.closed = True


def test_run_bench_orchestrates_pairs_with_a_fake_engine() -> None:
    engines: list[_FakeEngine] = []
    steps: list[int] = []

    def factory(pair: CachePair) -> _FakeEngine:
        engines.append(_FakeEngine(pair))
        return engines[-1]

    settings = BenchSettings(n_ctx=512, prompt_tokens=64, decode_tokens=4, repeats=2, quality_tokens=300)
    pairs = parse_cache_pairs("q8_0,q4_0")
    result = run_bench(
        factory, pairs, settings, model_path=Path("fake.gguf"), n_threads=1, flash_attn="on",
        planned_kv=lambda pair: 7, progress=lambda done, label: steps.append(done),
    )
    assert sum(steps) == plan_steps(settings, len(pairs))
    assert all(engine.closed for engine in engines) and len(engines) == 3
    f16, q8, q4 = result.pairs
    assert f16.quality.kl_mean == 0.0 and 0 < q8.quality.kl_mean < q4.quality.kl_mean
    assert f16.speed.decode_tok_s.median > 0 and len(q4.speed.prefill_tok_s.samples) == 2
    assert to_json(result)["results"][1]["kv_bytes"]["planned"] == 7


# -- the command -----------------------------------------------------------------------------

SMALL = ("--ctx", "512", "--threads", "1", "--prompt-tokens", "64", "--decode-tokens", "4",
         "--repeats", "2", "--quality-tokens", "128")


def test_json_schema(kvchat, model_path: Path) -> None:
    result = kvchat("bench", "--json", "--cache-types", "q4_0", *SMALL)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["schema"] == SCHEMA
    assert set(record) == {"schema", "model", "settings", "reference", "results",
                           "recommendations", "warnings", "total_s"}
    assert record["model"] == str(model_path)
    assert record["reference"] == "f16/f16"
    assert record["settings"] == {
        "n_ctx": 512, "n_threads": 1, "flash_attn": "auto", "prompt_tokens": 64, "decode_tokens": 4,
        "repeats": 2, "quality_tokens": 128, "quality_text": "kvchat/data/bench_text.txt",
    }
    ref, q4 = record["results"]
    assert (ref["cache_type_k"], ref["cache_type_v"], q4["cache_type_k"]) == ("f16", "f16", "q4_0")
    for row in (ref, q4):
        assert set(row) == {"cache_type_k", "cache_type_v", "kv_bytes", "load_s", "flash_attn", "speed",
                            "quality"}
        assert row["kv_bytes"]["reported"] > 0
        planned = row["kv_bytes"]["planned"]
        # llama.cpp prints MiB with two decimals: its figure is rounded, the plan is not.
        assert planned is None or abs(planned - row["kv_bytes"]["reported"]) <= 0.01 * 2**20
        assert set(row["speed"]) == {"prefill_tok_s", "decode_tok_s", "ttft_s"}
        for spread in row["speed"].values():
            assert set(spread) == {"median", "min", "max", "samples"}
            assert len(spread["samples"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
            assert spread["min"] > 0
        assert set(row["quality"]) == {"n_positions", "perplexity", "kl_mean", "kl_p99",
                                       "top1_agreement"}
        assert row["quality"]["n_positions"] == 127
    assert ref["quality"]["kl_mean"] == 0.0 and ref["quality"]["top1_agreement"] == 1.0
    # What `kvchat run` runs on this CPU: flash attention off for f16, on where q4_0 V needs it.
    assert (ref["flash_attn"], q4["flash_attn"]) == ("off", "on")
    # Progress reaches stderr even though it is not a terminal, with an ETA.
    progress = [line for line in result.stderr.splitlines() if line.startswith("kvchat: bench ")]
    assert progress and all("ETA" in line for line in progress)
    assert any("q4_0/q4_0 quality" in line for line in progress)
    assert q4["quality"]["kl_mean"] > 0
    assert q4["kv_bytes"]["reported"] < ref["kv_bytes"]["reported"] / 3
    assert record["recommendations"][0]["text"] == "f16/f16: reference"
    assert all(isinstance(r["kv_bytes"], int) for r in record["recommendations"])


def test_table_output_and_quality_only(kvchat) -> None:
    result = kvchat("bench", "--cache-types", "q8_0", "--no-speed", *SMALL)
    assert result.returncode == 0, result.stderr
    assert "q8_0/q8_0" in result.stdout and "n_ctx 512" in result.stdout
    assert "Best quality for each KV budget" in result.stdout
    assert "reference" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--cache-types", "bogus"),
        ("--cache-types", ""),
        ("--no-speed", "--no-quality"),
        ("--ctx", "256", "--quality-tokens", "300", "--no-speed"),
        ("--ctx", "256", "--prompt-tokens", "300", "--no-quality"),
        ("--cache-types", "q4_0", "--flash-attn", "off"),
    ],
)
def test_bad_settings_fail_in_one_line_before_loading(kvchat, args: tuple[str, ...]) -> None:
    result = kvchat("bench", *args)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.startswith("kvchat: error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""
