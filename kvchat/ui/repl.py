"""The interactive chat: a prompt-toolkit prompt, slash commands, a streamed reply
with a live status line, and a summary line after every reply.

Keys: Enter sends; Alt-Enter (or Esc then Enter) starts a new line;
Tab completes slash commands, setting names and session names; Up/Down walk the
input history (kept in `config.paths().history_file`). Ctrl-C stops a reply and
keeps what was said; at the prompt it clears the line, and at an empty prompt,
twice in a row, it exits, as Ctrl-D does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from rich.table import Table

from kvchat import config, session_store
from kvchat.engine_api import SamplingSettings
from kvchat.errors import KvchatError, SessionError
from kvchat.hardware import NvmlReader
from kvchat.monitor import HardwareSampler, KvFill, TokenMeter, kv_bytes_per_cell
from kvchat.ui.commands import COMMANDS, SETTINGS, Command, completions, is_command, parse_command
from kvchat.ui.commands import unescape_message as _unescape
from kvchat.ui.environment import Environment
from kvchat.ui.render import stats_line
from kvchat.ui.status import (
    DeviceInfo,
    ReplyView,
    hardware_text,
    kv_text,
    make_console,
    status_text,
    wrap_segments,
)
from kvchat.ui.status import summary_text as _summary
from kvchat.units import format_bytes

if TYPE_CHECKING:
    from kvchat.app import Conversation

KEYS_HELP = (
    "Enter sends · Alt-Enter (or Esc Enter): new line · Tab completes /commands · "
    "Ctrl-C stops a reply · Ctrl-D or /exit leaves"
)

# Opens a chat: (session name or None for an unsaved one, sampling, max_tokens) -> Conversation.
Opener = Callable[[str | None, SamplingSettings, int | None], Conversation]


def _session_names() -> Iterator[str]:
    """Saved session names, read only when a completion asks for them."""
    folder = session_store.sessions_dir()
    if folder.is_dir():
        yield from (p.stem for p in folder.glob(f"*{session_store.SUFFIX}"))


class SlashCompleter(Completer):
    """Completes /commands, then /set keys and /load or /save session names."""

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        word = text.split(" ")[-1]
        for candidate in completions(text, _session_names()):
            yield Completion(candidate, start_position=-len(word))


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    @kb.add("c-j")  # a bare line feed sends too, as in readline
    def _send(event: KeyPressEvent) -> None:
        event.current_buffer.validate_and_handle()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()  # like a shell: drop the line, stay at the prompt
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return kb


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Let cleanup after an interrupted reply (closing the stream, saving) finish."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _echo_off(stream: Any) -> Iterator[None]:
    """Keys typed while a reply streams are not echoed (they would break the live area's
    line count); they stay queued for the next prompt. Ctrl-C still interrupts."""
    try:
        import termios
    except ImportError:  # Windows
        yield
        return
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError, AttributeError):  # not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class ChatRepl:
    """One interactive chat over `setup` (a kvchat.app.Conversation)."""

    def __init__(
        self,
        env: Environment,
        setup: Conversation,
        *,
        opener: Opener,
        markdown: bool,
        nvml: NvmlReader | None,
    ) -> None:
        import os

        self.env = env
        self.console = make_console(env.stdout, no_color="NO_COLOR" in os.environ)
        self.markdown = markdown
        self._opener = opener
        self._nvml = nvml
        self._saved_here: set[str] = set()
        self._use(setup)

    # -- the loaded chat -----------------------------------------------------

    def _use(self, setup: Conversation) -> None:
        from kvchat.engine import supports_gpu_offload

        self.setup = setup
        self.engine, self.session = setup.engine, setup.session
        self.bytes_per_cell = kv_bytes_per_cell(self.engine.buffers, self.engine.n_ctx)
        self.device = DeviceInfo(self.engine.gpu_layers, supports_gpu_offload())
        self.sampler = HardwareSampler(nvml=self._nvml)

    @property
    def session_name(self) -> str | None:
        return self.setup.named.name if self.setup.named is not None else None

    def kv_fill(self) -> KvFill:
        return KvFill(self.session.n_kv, self.engine.n_ctx, self.bytes_per_cell)

    # -- output helpers --------------------------------------------------------

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False)

    def error(self, exc: KvchatError) -> None:
        self.env.stderr.write(f"kvchat: error: {exc}\n")
        self.env.stderr.flush()

    def banner(self) -> None:
        req = self.setup.request
        name = req.model_path.name
        where = hardware_text(self.sampler.sample(), self.device).split(" · ", 1)[1]
        self.say(f"kvchat · {name} · ctx {self.engine.n_ctx} · KV {req.type_k.name}/{req.type_v.name} "
                 f"· flash attn {self.engine.flash_attn} · {where}", style="bold")
        if self.session_name:
            what = (f"resumed '{self.session_name}': {len(self.session.messages)} messages, "
                    f"{self.setup.resumed_tokens} tokens" if self.setup.resumed_tokens
                    else f"new session '{self.session_name}'")
            self.say(f"{what} (saved after each reply)", style="dim")
        self.say(KEYS_HELP + " · /help", style="dim")

    # -- the loop ------------------------------------------------------------

    def _prompt_session(self) -> PromptSession:
        history = config.paths().history_file
        history.parent.mkdir(parents=True, exist_ok=True)
        return PromptSession(
            history=FileHistory(str(history)),
            completer=SlashCompleter(),
            complete_while_typing=False,
            multiline=True,
            key_bindings=_key_bindings(),
            prompt_continuation="... ",
            enable_suspend=True,
        )

    def run(self) -> None:
        prompt = self._prompt_session()
        self.banner()
        interrupts = 0
        while True:
            try:
                line = prompt.prompt(">>> ")
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts >= 2:
                    return
                self.say("(Ctrl-C again or Ctrl-D to leave)", style="dim")
                continue
            except EOFError:
                return
            interrupts = 0
            text = line.strip()
            if not text:
                continue
            try:
                if is_command(text):
                    if self.do(parse_command(text)) is False:
                        return
                else:
                    self.reply(_unescape(text))
            except KvchatError as exc:
                self.error(exc)

    # -- a reply ---------------------------------------------------------------

    def reply(self, text: str) -> None:
        session = self.session
        before = session.last_turn
        meter = TokenMeter()

        def prefill_tokens() -> int:
            turn = session.last_turn
            return 0 if turn is None or turn is before else max(turn.prompt_tokens - turn.reused_tokens, 0)

        def status() -> str:
            return status_text(meter, prefill_tokens(), self.kv_fill(), self.sampler.latest, self.device)

        stream = session.send(text)
        with _echo_off(self.env.stdin), self.sampler, \
                ReplyView(self.console, markdown=self.markdown, status=status) as view:
            try:
                meter.start()
                for event in stream:
                    meter.token()
                    if event.text:
                        view.feed(event.text)
            except KeyboardInterrupt:
                with _sigint_ignored():
                    stream.close()  # the partial reply stays in the transcript and the KV cache
                    view.finish()
            finally:
                stream.close()
        with _sigint_ignored():
            turn = session.last_turn
            if turn is None or turn is before:
                return
            if turn.stop_reason == "interrupted" and not turn.completion_tokens:
                self.say("(interrupted before the reply started; nothing was added)", style="dim")
            else:
                summary = _summary(turn, self.kv_fill(), self.sampler.latest, self.device)
                self.say(wrap_segments(summary, self.console.width), style="dim")
            if turn.dropped_turns:
                self.env.warn(f"context full: dropped the {turn.dropped_turns} oldest turn(s) "
                              f"({turn.dropped_tokens} tokens) to make room")
            self.setup.save()

    # -- commands ----------------------------------------------------------------

    def do(self, command: Command) -> bool:
        """Carry out a command; False means leave."""
        if command.name == "/exit":
            return False
        handler = getattr(self, "_cmd_" + command.name[1:])
        handler(command)
        return True

    def _cmd_help(self, command: Command) -> None:
        table = Table(box=None, show_header=False, pad_edge=False)
        for spec in COMMANDS.values():
            table.add_row(spec.usage, spec.help)
        self.console.print(table)
        keys = ", ".join(SETTINGS)
        self.say(f"/set keys: {keys}. A message starting with '/' is sent as '//...'.", style="dim")
        self.say(KEYS_HELP, style="dim")

    def _cmd_system(self, command: Command) -> None:
        messages = self.session.messages
        current = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        if not command.argument:
            self.say(f"system prompt: {current}" if current else "no system prompt")
            return
        self.session.set_system(command.argument)
        self.setup.save()
        later = " (the conversation is re-evaluated with it on the next message)" if len(messages) > 1 else ""
        self.say(f"system prompt set{later}", style="dim")

    def _cmd_clear(self, command: Command) -> None:
        self.session.clear()
        self.setup.save()
        self.say(f"cleared: KV cache empty ({self.session.n_kv}/{self.engine.n_ctx} cells), "
                 "system prompt kept", style="dim")

    def _cmd_sessions(self, command: Command) -> None:
        infos = session_store.list_sessions()
        if not infos:
            self.say("no saved sessions yet — /save NAME keeps this one")
            return
        table = Table("", "name", "turns", "KV cells", "size", "model", box=None, pad_edge=False)
        for i in infos:
            table.add_row("*" if i.name == self.session_name else "", i.name, str(i.turns),
                          f"{i.n_kv}/{i.n_ctx}", format_bytes(i.size), i.model)
        self.console.print(table)

    def _cmd_stats(self, command: Command) -> None:
        turn = self.session.last_turn
        if turn is not None:
            self.say(wrap_segments("last reply: " + stats_line(turn, self.engine.load_s),
                                   self.console.width))
        else:
            self.say(f"no reply yet (model loaded in {self.engine.load_s:.2f}s)")
        req = self.setup.request
        self.say(f"{kv_text(self.kv_fill())} at K {req.type_k.name}, V {req.type_v.name} "
                 f"({self.bytes_per_cell / 1024:.1f} KiB per cell)")
        self.say(hardware_text(self.sampler.sample(), self.device))
        users = sum(1 for m in self.session.messages if m["role"] == "user")
        self.say(f"conversation: {users} turns in context, {len(self.session.tokens)} tokens, "
                 f"{sum(1 for m in self.session.dropped if m['role'] == 'user')} turns dropped")

    def _settings_line(self) -> str:
        s = self.session.sampling
        seed = "random" if s.seed is None else s.seed
        limit = "none" if self.session.max_tokens is None else self.session.max_tokens
        return (f"temperature {s.temperature:g} · top_p {s.top_p:g} · top_k {s.top_k} · "
                f"min_p {s.min_p:g} · max_tokens {limit} · seed {seed}")

    def _cmd_set(self, command: Command) -> None:
        if command.key is not None:
            if command.key == "max_tokens":
                self.session.max_tokens = command.value
            else:
                self.session.set_sampling(dataclasses.replace(self.session.sampling,
                                                              **{command.key: command.value}))
        self.say(self._settings_line())

    def _cmd_info(self, command: Command) -> None:
        req, engine = self.setup.request, self.engine
        name = engine.metadata("general.name")
        layers = self.device.gpu_layers
        on_gpu = (f"{layers[0]}/{layers[1]} offloaded" if layers
                  else "none (llama.cpp built without a GPU backend)" if not self.device.gpu_build
                  else f"none (--ngl {req.n_gpu_layers})")
        kv_total = sum(engine.buffers.kv.values())
        rows = [
            ("model", f"{req.model_path}" + (f" ({name})" if name else "")),
            ("context", f"{engine.n_ctx} tokens (trained on {engine.n_ctx_train})"),
            ("KV cache", f"K {req.type_k.name}, V {req.type_v.name} · {format_bytes(kv_total)} "
                         f"({self.bytes_per_cell / 1024:.1f} KiB per cell)"),
            ("flash attention", f"{engine.flash_attn} (asked: {req.flash_attn})"),
            ("layers", f"{engine.n_layer} · on GPU: {on_gpu}"),
            ("threads", str(req.n_threads)),
            ("sampling", self._settings_line()),
            ("session", self.session_name or "unsaved (/save NAME keeps it)"),
        ]
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)

    def _cmd_save(self, command: Command) -> None:
        name = command.argument
        if name == self.session_name:
            self.setup.save()
            self.say(f"saved '{name}'", style="dim")
            return
        size = self.setup.save_as(name, replace_existing=name in self._saved_here)
        self._saved_here.add(name)
        self.say(f"saved '{name}' ({format_bytes(size)}, {self.session.n_kv} KV cells) — "
                 f"resume with `kvchat chat --session {name}` or /load {name}", style="dim")

    def _cmd_load(self, command: Command) -> None:
        name = command.argument
        if name == self.session_name:
            self.say(f"'{name}' is already open", style="dim")
            return
        if not session_store.session_path(name).exists():
            raise SessionError(f"no session named '{name}'", hint="/sessions lists them")
        unsaved = self.session_name is None and len(self.session.tokens) > 0
        previous = self.session_name
        sampling, max_tokens = self.session.sampling, self.session.max_tokens
        self.setup.save()
        self.setup.close()
        try:
            self._use(self._opener(name, sampling, max_tokens))
        except BaseException:
            # Get back to a working chat: the previous session, or a fresh one.
            self._use(self._opener(previous, sampling, max_tokens))
            raise
        if unsaved:
            self.say("(the unsaved conversation was discarded)", style="dim")
        users = sum(1 for m in self.session.messages if m["role"] == "user")
        self.say(f"loaded '{name}': {users} turns, {self.session.n_kv} KV cells restored "
                 f"({self.setup.rebuilt_tokens} re-evaluated)", style="dim")
        for message in self.session.messages[-2:]:
            if message["role"] != "system":
                self.say(f"{message['role']}: {message['content'][:200]}", style="dim")

    def close(self) -> None:
        self.sampler.stop()
        self.setup.close()
