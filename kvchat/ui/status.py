"""The live status line and the streamed reply of the chat REPL.

`ReplyView` prints the reply as it comes: finished lines (plain) or finished
blocks (markdown) are printed for good, and the unfinished tail sits in a rich
`Live` area together with the status line, refreshed on Live's own thread a few
times a second. The decode loop only appends text; it never formats figures.
Styles are limited to dim/bold so that dark and light terminals both read well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.live_render import LiveRender
from rich.markdown import CodeBlock, Markdown
from rich.segment import Segment
from rich.syntax import Syntax
from rich.text import Text
from rich.theme import Theme

from kvchat.hardware import HardwareSample
from kvchat.monitor import KvFill, TokenMeter
from kvchat.ui.render import draft_text, prefix_cache_text
from kvchat.units import format_bytes

SEP = " · "
# Inline code and code blocks without a fixed background: readable on dark and light.
THEME = Theme({"markdown.code": "bold", "markdown.code_block": "none", "kvchat.status": "dim",
               "kvchat.reasoning": "dim italic"})
CODE_THEME = "ansi_dark"


class _FlushCodeBlock(CodeBlock):
    """A code block as its lines, flush left, highlighted: rich's own pads it by a column
    on each side and wraps long lines, so that text copied from the terminal is not the
    code. Long lines are left to the terminal's soft wrap."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        code = str(self.text).rstrip("\n")
        text = Syntax(code, self.lexer_name, theme=self.theme).highlight(code)
        text.rstrip()
        text.no_wrap, text.overflow = True, "ignore"
        yield text


class ReplyMarkdown(Markdown):
    """Markdown for replies: code blocks that copy as working code (_FlushCodeBlock)."""

    elements = {**Markdown.elements, "fence": _FlushCodeBlock, "code_block": _FlushCodeBlock}


def _mib(n: float) -> str:
    return f"{n / (1024 * 1024):.1f}"


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.1f}"


@dataclass(frozen=True)
class DeviceInfo:
    """Facts fixed for a loaded engine: where layers run."""

    gpu_layers: tuple[int, int] | None  # (offloaded, total) from llama.cpp's log
    gpu_build: bool  # llama.cpp was built with a GPU backend
    server: str | None = None  # the model runs there (its memory is not ours to show)


def kv_text(kv: KvFill) -> str:
    if not kv.n_ctx:
        return f"KV {kv.cells} tokens (context size not reported)"
    if kv.used_bytes is None or kv.total_bytes is None:
        return f"KV {kv.cells}/{kv.n_ctx} ({kv.fraction:.0%}, size unknown)"
    return (f"KV {kv.cells}/{kv.n_ctx} ({kv.fraction:.0%}, {_mib(kv.used_bytes)}/"
            f"{_mib(kv.total_bytes)} MiB)")


def hardware_text(hw: HardwareSample, device: DeviceInfo) -> str:
    if device.server is not None:
        return f"server {device.server} (its RAM and VRAM: not reported)"
    parts = [f"RSS {format_bytes(hw.rss_bytes)}"]
    if hw.vram is not None:
        parts.append(f"VRAM {hw.vram.used / 2**30:.2f}/{hw.vram.total / 2**30:.2f} GiB")
    elif hw.memory_kind == "unified":
        parts.append("unified memory")
    else:
        parts.append("CPU")
    if device.gpu_layers is not None:
        parts.append(f"GPU layers {device.gpu_layers[0]}/{device.gpu_layers[1]}")
    elif device.gpu_build:
        parts.append("GPU layers 0")
    return SEP.join(parts)


def status_text(
    meter: TokenMeter, prefill_tokens: int, kv: KvFill, hw: HardwareSample, device: DeviceInfo
) -> str:
    """The line shown while a reply is produced."""
    if meter.first_at is None:
        head = f"prefill {prefill_tokens} tok… {meter.elapsed_s():.1f}s"
    else:
        head = SEP.join((f"prefill {_rate(meter.prefill_tok_s(prefill_tokens))} tok/s",
                         f"ttft {meter.ttft_s:.2f}s",
                         f"decode {_rate(meter.decode_tok_s())} tok/s ({meter.tokens} tok)"))
        head += SEP + draft_text(meter.drafted, meter.accepted).removesuffix(SEP) if meter.drafted else ""
    return SEP.join((head, kv_text(kv), hardware_text(hw, device)))


def summary_text(turn: Any, kv: KvFill, hw: HardwareSample, device: DeviceInfo) -> str:
    """The line that stays under a reply: the turn's figures (`Turn.stats`)."""
    from_disk = prefix_cache_text(turn)
    parts = [
        f"{turn.completion_tokens} tok" + (f" ({turn.reasoning_tokens} reasoning)"
                                            if getattr(turn, "reasoning_tokens", 0) else ""),
        f"prefill {turn.evaluated_tokens} tok at {_rate(turn.prefill_tok_s)} tok/s"
        # Tokens restored from disk are not "0 cached": the next segment says where they came from.
        + (f" ({turn.reused_tokens} cached)" if turn.reused_tokens or not from_disk else ""),
        *([from_disk] if from_disk else []),
        f"ttft {turn.ttft_s:.2f}s",
        f"decode {_rate(turn.decode_tok_s)} tok/s",
        *([f"{turn.reevaluated_tokens} re-evaluated"] if getattr(turn, "reevaluated_tokens", 0) else []),
        *([draft_text(turn.drafted_tokens, turn.accepted_tokens).removesuffix(SEP)]
          if turn.drafted_tokens else []),
        kv_text(kv),
        hardware_text(hw, device),
        f"stop: {turn.stop_reason}",
    ]
    return SEP.join(parts)


def wrap_segments(line: str, width: int) -> str:
    """Break a ' · '-separated line between segments so that no row exceeds `width`."""
    rows: list[str] = []
    for segment in line.split(SEP):
        if rows and len(rows[-1]) + len(SEP) + len(segment) <= width:
            rows[-1] += SEP + segment
        else:
            rows.append(segment)
    return "\n".join(rows)


def split_finished(pending: str, *, markdown: bool) -> tuple[str, str]:
    """Split streamed text into (finished part, unfinished tail).

    Plain text is finished at each newline. Markdown is finished at a blank line
    outside a code fence, or at the line closing a fence, so that no block is
    printed before it is complete.
    """
    if not markdown:
        cut = pending.rfind("\n")
        return (pending[: cut + 1], pending[cut + 1 :]) if cut >= 0 else ("", pending)
    fence: str | None = None
    cut = 0
    pos = 0
    for line in pending.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        pos += len(line)
        stripped = line.strip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        elif fence is not None and stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            fence = None
            cut = pos
        elif fence is None and stripped == "":
            cut = pos
    return pending[:cut], pending[cut:]


def open_fence(text: str) -> str | None:
    """The fence line left open at the end of `text`, if any."""
    fence: str | None = None
    opener = None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence, opener = stripped[:3], stripped
        elif fence is not None and stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            fence = opener = None
    return opener


class ReflowingLiveRender(LiveRender):
    """Rich's live area, made right after the terminal changes width (SIGWINCH).

    Rich erases its previous frame by moving up as many rows as that frame had when
    it was drawn. When the terminal narrows, terminals that re-wrap (reflow) their
    lines -- most of today's: VTE, iTerm2, kitty, Windows Terminal, tmux -- turn
    each line of the frame into several rows, so the erase stopped short: the top of
    the old frame (a cut status line, the unfinished text) stayed and was printed
    again below. This render remembers each line's width and, when the width changed
    since the frame was drawn, erases the rows those lines take at the new width.
    Lines are never longer than the width they were drawn at, so a wider terminal
    keeps one row per line and nothing above the frame is touched.
    """

    def __init__(self, console: Console, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._console = console
        self._line_widths: list[int] = []
        self._drawn_width: int | None = None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths = [0]
        for segment in super().__rich_console__(console, options):
            assert isinstance(segment, Segment)  # LiveRender yields segments
            if segment.text == "\n" and not segment.control:
                widths.append(0)
            else:
                widths[-1] += segment.cell_length
            yield segment
        self._line_widths = widths
        self._drawn_width = options.max_width

    def rows_now(self) -> int | None:
        """Rows the last frame takes on the terminal now; None when nothing is drawn."""
        if self._shape is None:
            return None
        width = self._console.width
        if self._drawn_width is None or width == self._drawn_width or width <= 0:
            return self._shape[1]
        return sum(max(1, -(-line // width)) for line in self._line_widths)

    def _reshape(self) -> None:
        rows = self.rows_now()
        if rows is not None and self._shape is not None:
            self._shape = (self._shape[0], rows)

    def position_cursor(self) -> Any:
        self._reshape()
        return super().position_cursor()

    def restore_cursor(self) -> Any:
        self._reshape()
        return super().restore_cursor()


class ReplyView:
    """Streams one reply to `console` with a live status line under it.

    `feed()` is called for every token (cheap: string append and a split);
    `finish()` prints what is left and removes the status area. Without a
    terminal the status line is skipped and text is printed as it finishes.
    """

    def __init__(
        self,
        console: Console,
        *,
        markdown: bool,
        status: Callable[[], str] | None,
        refresh_per_second: float = 8,
    ) -> None:
        self.console = console
        self.markdown = markdown
        self._status = status
        self._pending = ""
        self._live: Live | None = None
        self._refresh = refresh_per_second
        self._blocks = 0
        self._thinking = ""  # unfinished line of reasoning, shown dim

    def __enter__(self) -> ReplyView:
        if self.console.is_terminal:
            self._live = Live(
                console=self.console,
                get_renderable=self._renderable,
                auto_refresh=True,
                refresh_per_second=self._refresh,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
                vertical_overflow="crop",
            )
            self._live._live_render = ReflowingLiveRender(  # noqa: SLF001  (see its docstring)
                self.console, self._live._live_render.renderable, vertical_overflow="crop"
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def _block(self, text: str) -> RenderableType:
        if self.markdown:
            return ReplyMarkdown(text, code_theme=CODE_THEME)
        return Text(text)

    def _renderable(self) -> RenderableType:
        parts: list[RenderableType] = []
        pending = self._pending
        if self._thinking:
            parts.append(Text(self._thinking, style="kvchat.reasoning"))
        if pending:
            parts.append(self._block(pending))
        if self._status is not None:
            line = wrap_segments(self._status(), self.console.width)
            parts.append(Text(line, style="kvchat.status", no_wrap=True, overflow="ellipsis"))
        return Group(*parts)

    def _print(self, text: str) -> None:
        if not text:
            return
        if self.markdown:
            if not text.strip():
                return
            if self._blocks:  # blocks rendered one by one lose the blank line between them
                self.console.print()
            self.console.print(self._block(text), crop=False)  # code lines wider than the screen stay whole
            self._blocks += 1
        else:
            self.console.print(Text(text), end="")  # rich wraps at word boundaries

    def _max_pending_chars(self) -> int:
        # Keep the unfinished tail within the screen: Live cannot redraw above its top.
        width, height = self.console.size
        return max(width * max(height - 4, 4), 80)

    def feed_reasoning(self, text: str) -> None:
        """A thinking model's reasoning: dim, plain, finished line by line, before the answer."""
        thinking = self._thinking + text
        cut = thinking.rfind("\n")
        if cut >= 0:
            self.console.print(Text(thinking[: cut + 1], style="kvchat.reasoning"), end="")
            thinking = thinking[cut + 1 :]
        self._thinking = thinking[-self._max_pending_chars() :]

    def _end_reasoning(self) -> None:
        if self._thinking.strip():
            self.console.print(Text(self._thinking, style="kvchat.reasoning"))
        self._thinking = ""

    def feed(self, text: str) -> None:
        if self._thinking:
            self._end_reasoning()
        pending = self._pending + text
        if "\n" in text:
            done, pending = split_finished(pending, markdown=self.markdown)
            self._print(done)
        if len(pending) > self._max_pending_chars():
            pending = self._fold(pending)
        self._pending = pending

    def _fold(self, pending: str) -> str:
        """Print a too-long unfinished tail for good, at a space; keep code fences whole."""
        cut = pending.rfind(" ", 0, len(pending) - 1)
        cut = len(pending) if cut <= 0 else cut + 1
        head, tail = pending[:cut], pending[cut:]
        fence = open_fence(head) if self.markdown else None
        if fence is not None:
            self._print(head + "\n" + fence[:3] + "\n")
            return fence + "\n" + tail
        self._print(head + ("\n" if not self.markdown else ""))
        return tail

    def finish(self) -> None:
        """Print the unfinished tail and take the live area away."""
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()
        self._end_reasoning()
        pending, self._pending = self._pending, ""
        if pending.strip():
            if not self.markdown and not pending.endswith("\n"):
                pending += "\n"
            self._print(pending)
        elif not self.markdown and pending:
            self._print(pending)


def make_console(file: Any, *, no_color: bool) -> Console:
    return Console(file=file, no_color=no_color, highlight=False, theme=THEME, emoji=False)
