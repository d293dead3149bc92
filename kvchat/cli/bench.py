"""`kvchat bench`: KV memory, speed and quality of K/V cache types for one model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from kvchat.cli import app
from kvchat.cli.options import CTX, DEVICES, FLASH_ATTN, JSON, SERVER, THREADS, VERBOSE, shared_options
from kvchat.errors import KvchatError, UsageError
from kvchat.registry import model_name
from kvchat.ui.environment import Environment
from kvchat.ui.tables import TableData, print_table
from kvchat.units import format_bytes

if TYPE_CHECKING:
    from kvchat.app.load import LoadRequest
    from kvchat.bench import BenchResult, CachePair, Spread


def _flash_attn_for(request: LoadRequest, pair: CachePair) -> str:
    """The flash-attention mode `kvchat run` would use for this pair: the asked mode,
    turned on where a quantized V cache needs it (auto is then off on a CPU-only run)."""
    from kvchat.cache_types import resolve_flash_attn

    return resolve_flash_attn(request.flash_attn, pair.type_v)


def _planner(request: LoadRequest) -> Callable[[CachePair], int | None]:
    """KV bytes planned by kvchat.memory, or None when the planner cannot say."""
    try:
        from kvchat.memory import PlanSettings, plan_memory
        from kvchat.model_spec import read_spec

        spec = read_spec(str(request.model_path))
    except (ImportError, KvchatError):
        return lambda pair: None

    def planned(pair: CachePair) -> int | None:
        try:
            plan = PlanSettings(
                n_ctx=request.n_ctx, type_k=pair.type_k, type_v=pair.type_v,
                flash_attn=_flash_attn_for(request, pair) == "on",
            )
            return plan_memory(spec, plan).kv
        except KvchatError:
            return None

    return planned


_MIB = 1024 * 1024


def _figure(value: float) -> str:
    """Three significant digits at least: 1.23, 45.6, 1,234."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _speed(spread: Spread) -> str:
    if len(spread.samples) < 2:
        return f"{_figure(spread.median)} (1 run)"
    return f"{_figure(spread.median)}±{spread.spread_pct:.1f}%"


def _plan_matches(result: BenchResult) -> bool:
    """Whether every planned KV figure equals llama.cpp's (which is printed to 0.01 MiB)."""
    return all(
        row.kv_bytes_planned is not None and abs(row.kv_bytes_planned - row.kv_bytes_reported) <= _MIB / 100
        for row in result.pairs
    )


def render_table(result: BenchResult) -> TableData:
    """One row per pair: flash attention as run, KV in MiB, speeds as median±half-range.

    The planned KV gets its own column only when it differs from llama.cpp's figure;
    the 99th-percentile KL is in --json.
    """
    show_plan = not _plan_matches(result)
    columns = ["K/V", "FA", "KV\nMiB"] + (["planned\nMiB"] if show_plan else [])
    if result.settings.speed:
        columns += ["prefill\ntok/s", "TTFT\nms", "decode\ntok/s"]
    if result.settings.quality:
        columns += ["PPL", "KL\nmean", "top-1\nagree"]
    table = TableData(columns, right=frozenset(columns[2:]),
                      title=f"KV cache types · {model_name(result.model_path)} · n_ctx {result.n_ctx}")
    for row in result.pairs:
        cells = [row.pair.name, row.flash_attn or "-", f"{row.kv_bytes_reported / _MIB:.2f}"]
        if show_plan:
            cells.append("—" if row.kv_bytes_planned is None else f"{row.kv_bytes_planned / _MIB:.2f}")
        if row.speed is not None:
            cells += [_speed(row.speed.prefill_tok_s), _figure(1000 * row.speed.ttft_s.median),
                      _speed(row.speed.decode_tok_s)]
        if row.quality is not None:
            q = row.quality
            cells += [f"{q.perplexity:.3f}", f"{q.kl_mean:.4f}", f"{100 * q.top1_agreement:.1f}%"]
        table.add_row(*cells)
    return table


@app.command()
@shared_options(CTX, FLASH_ATTN, DEVICES, THREADS, SERVER, VERBOSE, JSON)
def bench(
    model: Annotated[
        Optional[str], typer.Argument(help="A .gguf path or model reference (default: bundled SmolLM2).")
    ] = None,
    *,
    flags: dict[str, Any],
    cache_types: Annotated[
        Optional[str],
        typer.Option("--cache-types", help="Comma list; 'q8_0' is K and V alike, 'q8_0/q4_0' is K/V. "
                     "f16/f16 is always measured as the reference."),
    ] = None,
    repeats: Annotated[int, typer.Option("--repeats", "-r", help="Timed runs per pair.", min=1)] = 3,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", help="Prompt length for prefill speed.", min=1)
    ] = 512,
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", help="Tokens generated for decode speed.", min=2)
    ] = 64,
    quality_tokens: Annotated[
        int, typer.Option("--quality-tokens", help="Tokens of the bundled text teacher-forced.", min=2)
    ] = 1024,
    no_speed: Annotated[bool, typer.Option("--no-speed", help="Skip the speed runs.")] = False,
    no_quality: Annotated[bool, typer.Option("--no-quality", help="Skip the quality runs.")] = False,
    as_json: bool = False,
    verbose: bool = False,
) -> None:
    """Measure KV memory, prefill/decode speed and answer drift for K/V cache types.

    Quality is teacher-forced over a bundled public-domain text and compared with the
    f16 cache: mean KL divergence, top-1 agreement and perplexity (deterministic).

    \b
    Examples:
      kvchat bench
      kvchat bench ./model.gguf --cache-types f16,q8_0,q4_0,q8_0/q4_0 --ctx 8192
      kvchat bench --no-speed --json > quality.json
    """
    from kvchat.app import bench_engine_factory, gpu_offload_supported, resolve_load
    from kvchat.bench import (
        DEFAULT_PAIRS,
        BenchSettings,
        check_settings,
        parse_cache_pairs,
        plan_steps,
        recommend,
        run_bench,
        to_json,
    )
    from kvchat.cache_types import fused_kernel_warning
    from kvchat.settings import resolve

    env = Environment()
    if flags.get("server") is not None or resolve_server(flags) is not None:
        if cache_types is not None or no_speed:
            raise UsageError("with --server, bench measures the server's speed only (its cache types are "
                             "set where it runs)", hint="drop --cache-types / --no-speed, or bench locally")
        _bench_server(env, flags, repeats, prompt_tokens, decode_tokens, as_json=as_json)
        return
    if cache_types is not None and not cache_types.strip(" ,"):
        raise UsageError("--cache-types is empty", hint="e.g. --cache-types q8_0,q4_0 (or leave it out)")
    pairs = parse_cache_pairs(cache_types or DEFAULT_PAIRS)
    request = resolve_load(resolve({**flags, "model": model, "cache_type_k": "f16", "cache_type_v": "f16"}),
                           env.warn)
    modes = {pair: _flash_attn_for(request, pair) for pair in pairs}  # refuses -fa off with quantized V
    settings = BenchSettings(
        n_ctx=request.n_ctx, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        repeats=repeats, quality_tokens=quality_tokens, speed=not no_speed, quality=not no_quality,
    )
    check_settings(settings)
    on_gpu = request.n_gpu_layers != 0 and gpu_offload_supported()
    warnings = [f"{p.name}: {w}" for p in pairs
                if on_gpu and (w := fused_kernel_warning(p.type_k, p.type_v)) is not None]
    for warning in warnings:
        env.warn(warning)

    factory = bench_engine_factory(request, modes, env.warn, verbose=verbose)
    with BenchProgress(env, plan_steps(settings, len(pairs)), enabled=not verbose) as progress:
        result = run_bench(
            factory, pairs, settings, model_path=request.model_path, n_threads=request.n_threads,
            flash_attn=request.flash_attn, planned_kv=_planner(request), progress=progress.step,
        )
    result.warnings.extend(warnings)

    if as_json:
        env.stdout.write(json.dumps(to_json(result), ensure_ascii=False) + "\n")
        return
    out = env.out_console()
    print_table(render_table(result), env.stdout, out, boxed=True)
    out.print("Best quality for each KV budget:")
    for line in recommend(result):
        out.print(f"  KV ≤ {format_bytes(line.kv_bytes):>10}  {line.text}", soft_wrap=True, markup=False)
    threads_word = "thread" if result.n_threads == 1 else "threads"
    fa_runs = sorted({row.flash_attn for row in result.pairs})
    fa_note = (f"flash attention {fa_runs[0]}" if len(fa_runs) == 1
               else "flash attention as `kvchat run` uses it per pair (FA column)")
    notes = [f"{result.n_threads} {threads_word}", fa_note]
    if _plan_matches(result):
        notes.append("planned KV = llama.cpp's")
    if settings.speed:
        runs = f"{repeats} run{'s' if repeats != 1 else ''}"
        notes.append(f"speed: median ±half-range of {runs} after a warm-up")
    if settings.quality:
        notes.append(f"quality: {quality_tokens} tokens of the bundled text vs f16/f16")
    notes.append(f"total {result.total_s:.0f}s")
    out.print(" · ".join(notes), style="dim", soft_wrap=True, markup=False)


def resolve_server(flags: dict[str, Any]) -> str | None:
    """The server to bench: --server, else KVCHAT_SERVER or the config file."""
    from kvchat.settings import resolve

    return resolve({k: v for k, v in flags.items() if k in ("server", "api_key")}).server


def _bench_server(env: Environment, flags: dict[str, Any], repeats: int, prompt_tokens: int,
                  decode_tokens: int, *, as_json: bool) -> None:
    """`kvchat bench --server URL`: prefill and decode speed on llama-server, kvchat's
    figures on the stream beside the server's own."""
    from kvchat.app.backends import LlamaServerBackend
    from kvchat.app.lifecycle import open_server
    from kvchat.bench import bench_tokens, measure_server_speed
    from kvchat.settings import resolve

    s = resolve({k: v for k, v in flags.items() if k in ("server", "api_key")})
    backend = open_server(s, env.warn)
    try:
        if not isinstance(backend, LlamaServerBackend):
            raise UsageError("bench --server needs llama-server (token prompts and its own timings)",
                             hint="elsewhere `kvchat run --server URL --json` reports each reply's speed")
        engine = backend.engine
        result = measure_server_speed(engine, bench_tokens(engine, prompt_tokens), decode_tokens, repeats)
    finally:
        backend.close()
    if as_json:
        env.stdout.write(json.dumps(result.to_json()) + "\n")
        return
    out = env.out_console()
    columns = ["measured by", "prefill\ntok/s", "TTFT\nms", "decode\ntok/s"]
    table = TableData(columns, right=frozenset(columns[1:]), title=f"{result.model} on {result.url}")
    table.add_row("kvchat (on the stream)", "–", _figure(1000 * result.ttft_s.median),
                  _speed(result.decode_tok_s))
    table.add_row("llama-server (its timings)", _speed(result.server_prefill_tok_s), "–",
                  _speed(result.server_decode_tok_s))
    print_table(table, env.stdout, out, boxed=True)
    out.print(f"prompt {result.prompt_tokens} tokens (the server's prompt cache off) · "
              f"{result.decode_tokens} decoded · median ±half-range of {repeats} runs after a warm-up",
              style="dim", soft_wrap=True, markup=False)


class BenchProgress:
    """Progress on stderr: a bar with an ETA on a terminal; otherwise a line when the
    step's label changes or every 10 s, with steps done, elapsed time and ETA."""

    def __init__(self, env: Environment, total: int, *, enabled: bool) -> None:
        self._env, self._total, self._enabled = env, total, enabled
        self._done = 0
        self._label = ""
        self._started = self._last_line = 0.0
        self._bar: Any = None  # a rich Progress, on a terminal
        self._task: Any = None

    def __enter__(self) -> BenchProgress:
        self._started = time.monotonic()
        console = self._env.err_console()
        if self._enabled and console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("bench", total=self._total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def eta_s(self, now: float) -> float | None:
        """Seconds left at the pace so far; None before the first step is done."""
        if not self._done:
            return None
        return (now - self._started) / self._done * max(self._total - self._done, 0)

    def step(self, done: int, label: str) -> None:
        self._done += done
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=done, description=label)
            return
        now = time.monotonic()
        what = label.rsplit(" ", 1)[0] + " " + label.rsplit(" ", 1)[-1].replace("loaded", "load")
        if what == self._label and now - self._last_line < 10:
            return
        self._label, self._last_line = what, now
        eta = self.eta_s(now)
        eta_text = "ETA –" if eta is None else f"ETA {eta:.0f}s"
        self._env.stderr.write(
            f"kvchat: bench {label} · step {self._done}/{self._total} · "
            f"{now - self._started:.0f}s · {eta_text}\n"
        )
        self._env.stderr.flush()
