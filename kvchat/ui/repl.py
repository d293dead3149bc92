"""The interactive chat: a prompt-toolkit prompt, slash commands, a streamed reply
with a live status line, and a summary line after every reply.

Keys: Enter sends; Alt-Enter (or Esc then Enter) starts a new line;
Tab completes slash commands, setting names and session names; Up/Down walk the
input history (kept in `config.paths().history_file`). Ctrl-C stops a reply and
keeps what was said; at the prompt it clears the line, and at an empty prompt,
twice in a row, it exits, as Ctrl-D does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from rich.table import Table

from kvchat import config, saved_sessions, session_store
from kvchat.app import LocalFacts
from kvchat.engine_api import SamplingSettings
from kvchat.errors import KvchatError, NetworkError, SessionError
from kvchat.hardware import NvmlReader
from kvchat.monitor import HardwareSampler, KvFill, TokenMeter
from kvchat.registry import model_name
from kvchat.settings import keys_in
from kvchat.ui.commands import COMMANDS, SET_KEYS, Command, is_command, parse_command
from kvchat.ui.commands import unescape_message as _unescape
from kvchat.ui.environment import Environment
from kvchat.ui.info import local_rows, server_rows, speculative_line
from kvchat.ui.prompt import SlashCompleter, echo_off, key_bindings, private_file, sigint_ignored
from kvchat.ui.render import plural, reevaluated_notice, stats_line
from kvchat.ui.resume import opened_text, restored_settings
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
    from kvchat.app import Chat
    from kvchat.conversation import Turn, TurnStats
    from kvchat.named_session import NamedSession


KEYS_HELP = (
    "Enter sends · Alt-Enter (or Esc Enter): new line · Tab completes /commands · "
    "Ctrl-C stops a reply · Ctrl-D or /exit leaves"
)

# Opens a chat: (session name or None for an unsaved one, sampling, max_tokens) -> Chat.
Opener = Callable[[str | None, SamplingSettings, int | None], "Chat"]


def _setting_text(key: str, value: Any) -> str:
    """'temperature 0.8', 'seed random' (unset: a new seed each reply), 'max_tokens none'."""
    if value is None:
        return f"{key} {'random' if key == 'seed' else 'none'}"
    return f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"


class ChatRepl:
    """One interactive chat over `setup` (a kvchat.app.Chat)."""

    def __init__(
        self,
        env: Environment,
        setup: Chat,
        *,
        opener: Opener,
        markdown: bool,
        nvml: NvmlReader | None,
        recent_keep: int = 0,
    ) -> None:
        import os

        self.env = env
        self.console = make_console(env.stdout, no_color="NO_COLOR" in os.environ)
        self.markdown = markdown
        self._opener = opener
        self._nvml = nvml
        self._saved_here: set[str] = set()
        # Unnamed chats are kept as recent chats (session_store.RECENT_PREFIX), the newest
        # `recent_keep` of them; 0 turns that off, and leaving then asks first.
        self._recent_keep = recent_keep
        self._recent: NamedSession | None = None  # where the unnamed chat is kept
        self._saved_revision: int | None = None  # the unnamed chat as /save last wrote it
        self._confirm: str | None = None  # the command that was refused once and is now allowed
        self._use(setup)

    # -- the loaded chat -----------------------------------------------------

    def _use(self, setup: Chat) -> None:
        self.setup = setup
        # A save is written in the background; a wait for it that takes a while says so.
        setup.on_wait = lambda: self.say("saving…", style="dim")
        self.backend, self.session = setup.backend, setup.session
        self._last: TurnStats | None = None  # the last reply's figures
        facts = self.backend.facts()
        if isinstance(facts, LocalFacts):
            self.bytes_per_cell: float | None = facts.bytes_per_cell
            self.device = DeviceInfo(facts.gpu_layers, facts.gpu_build)
        else:  # on a server: its KV bytes and devices are not reported
            self.bytes_per_cell = None
            self.device = DeviceInfo(None, False, server=facts.url)
        self.sampler = HardwareSampler(nvml=self._nvml)

    @property
    def session_name(self) -> str | None:
        return self.setup.named.name if self.setup.named is not None else None

    def kv_fill(self) -> KvFill:
        return KvFill(self.session.n_kv, self.backend.n_ctx, self.bytes_per_cell)

    # -- output helpers --------------------------------------------------------

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False)

    def error(self, exc: KvchatError) -> None:
        self.env.stderr.write(f"kvchat: error: {exc}\n")
        self.env.stderr.flush()

    def banner(self) -> None:
        facts = self.backend.facts()
        if not isinstance(facts, LocalFacts):
            self.say(f"kvchat · {self.setup.model_label} · ctx {self.backend.n_ctx}", style="bold")
        else:
            req = facts.request
            where = hardware_text(self.sampler.sample(), self.device).split(" · ", 1)[1]
            self.say(f"kvchat · {model_name(req.model_path)} · ctx {facts.n_ctx} · KV {req.type_k.name}/"
                     f"{req.type_v.name} · flash attn {facts.flash_attn} · {where}", style="bold")
        if self.session_name:
            self.say(f"{opened_text(self.setup)} · saved after each reply", style="dim")
            restored = restored_settings(self.setup.settings)
            if restored:
                self.say("settings restored: " + ", ".join(restored), style="dim")
            self._show_last_exchanges()
        elif self._recent_keep:
            self.say(f"this chat is kept in history (the last {self._recent_keep}); /save NAME names it",
                     style="dim")
        self.say(KEYS_HELP + " · /help", style="dim")

    def _user_turns(self) -> int:
        return sum(1 for m in self.session.messages if m["role"] == "user")

    def _show_last_exchanges(self) -> None:
        for message in self.session.messages[-2:]:
            if message["role"] != "system":
                self.say(f"{message['role']}: {message['content'][:200]}", style="dim")

    # -- the loop ------------------------------------------------------------

    def _prompt_session(self) -> PromptSession:
        history = config.paths().history_file
        private_file(history)
        return PromptSession(
            history=FileHistory(str(history)),
            completer=SlashCompleter(),
            complete_while_typing=False,
            multiline=True,
            key_bindings=key_bindings(),
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
                    if self.may_leave("Ctrl-C twice"):
                        return
                    interrupts = 0
                    continue
                self.say("(Ctrl-C again or Ctrl-D to leave)", style="dim")
                continue
            except EOFError:
                if self.may_leave("Ctrl-D"):
                    return
                continue
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
        self._confirm = None  # a new message: what was confirmed before no longer holds
        self._show(self.session.send(text))

    def _show(self, turn: Turn) -> None:
        """Stream a reply with the live status line, then its summary; save."""
        meter = TokenMeter()
        dropped: NetworkError | None = None
        figures = turn.stats

        def status() -> str:
            prefill = max(figures.prompt_tokens - figures.reused_tokens, 0)
            return status_text(meter, prefill, self.kv_fill(), self.sampler.latest, self.device)

        with echo_off(self.env.stdin), self.sampler, \
                ReplyView(self.console, markdown=self.markdown, status=status) as view:
            try:
                meter.start()
                for event in turn:
                    meter.token(event.drafted, event.accepted)
                    if event.reasoning_text:
                        view.feed_reasoning(event.reasoning_text)
                    if event.text:
                        view.feed(event.text)
            except KeyboardInterrupt:
                with sigint_ignored():
                    turn.close()  # the partial reply stays in the transcript and the KV cache
                    view.finish()
            except NetworkError as exc:
                if figures.stop_reason != "dropped":
                    raise
                dropped = exc  # a server's stream broke: keep, show and save what came
                view.finish()
            finally:
                turn.close()
        with sigint_ignored():
            if not turn.begun:
                return
            self._last = figures
            if figures.stop_reason == "interrupted" and not figures.completion_tokens:
                self.say("(interrupted before the reply started; nothing was added)", style="dim")
            else:
                summary = _summary(figures, self.kv_fill(), self.sampler.latest, self.device)
                self.say(wrap_segments(summary, self.console.width), style="dim")
            if figures.prefix_cache_skipped and not figures.prefix_cache_routine:
                self.env.warn(figures.prefix_cache_skipped)
            if figures.reevaluated_tokens:
                self.env.warn(reevaluated_notice(figures))
            if figures.dropped_turns:
                self.env.warn(f"context full: dropped the {figures.dropped_turns} oldest turn(s) "
                              f"({figures.dropped_tokens} tokens) to make room")
            # The new cells are read now; the files are written while the next prompt is up.
            self.setup.save(background=True)
            self._keep_recent()
        if dropped is not None:
            raise dropped

    # -- keeping unnamed chats -----------------------------------------------------

    def _unsaved(self) -> bool:
        """An unnamed chat whose turns are neither kept in history nor /saved as they are now."""
        return (self.session_name is None and self._recent is None and self._user_turns() > 0
                and self._saved_revision != self.session.revision)

    def may_leave(self, how: str) -> bool:
        """Whether leaving loses nothing, or the user asked twice; says where the chat is kept."""
        if self._unsaved() and self._confirm != "leave":
            self._confirm = "leave"
            self.env.warn(f"this chat is not saved — /save NAME keeps it; {how} again leaves without it")
            return False
        self._wait_saved()
        if self._recent is not None:
            self.say(f"(kept in history as '{self._recent.name}' — `kvchat chat --continue` resumes it)",
                     style="dim")
        return True

    def _keep_recent(self) -> None:
        """Save an unnamed chat as a recent chat after each reply (the first reply creates
        it and deletes the oldest beyond `recent_keep`)."""
        if self.session_name is not None or not self._recent_keep or self._user_turns() == 0:
            return
        from kvchat.named_session import NamedSession

        keep = self._recent_keep

        def prune() -> None:  # after the first write: the new chat counts among the kept
            saved_sessions.prune_recent(keep)

        try:
            if self._recent is None:
                recent = NamedSession(saved_sessions.recent_name(time.time()))
                try:
                    recent.check(self.backend.identity(), self.backend.context_settings(), rebuild=True)
                    self.setup.save_into(recent, background=True, then=prune)
                except BaseException:
                    recent.close()
                    raise
                self._recent = recent
            else:
                self.setup.save_into(self._recent, background=True)
        except (KvchatError, OSError) as exc:
            self.env.warn(f"could not keep this chat in history: {exc}")

    def _wait_saved(self) -> None:
        """Until the save in flight is durable; its failure is said, not raised."""
        try:
            self.setup.wait_saved()
        except KvchatError as exc:
            self.error(exc)

    def _drop_recent(self) -> str | None:
        """Stop saving into the current recent chat (it stays on disk); its name."""
        recent, self._recent = self._recent, None
        if recent is None:
            return None
        try:
            self._wait_saved()  # its lock is held until its last write is durable
        finally:
            recent.close()
        return recent.name

    # -- commands ----------------------------------------------------------------

    def do(self, command: Command) -> bool:
        """Carry out a command; False means leave."""
        if command.name == "/exit":
            return not self.may_leave("/exit")
        handler = getattr(self, "_cmd_" + command.name[1:])
        handler(command)
        return True

    def _cmd_help(self, command: Command) -> None:
        table = Table(box=None, show_header=False, pad_edge=False)
        for spec in COMMANDS.values():
            table.add_row(spec.usage, spec.help)
        self.console.print(table)
        keys = ", ".join(SET_KEYS)
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
        if self._unsaved() and self._confirm != "/clear":
            self._confirm = "/clear"
            self.env.warn("this chat is not saved — /save NAME keeps it; /clear again forgets it")
            return
        kept = self._drop_recent()
        self.session.clear()
        self._saved_here.clear()  # what /save wrote before holds another conversation now
        self.setup.save()
        self.say(f"cleared: KV cache empty ({self.session.n_kv}/{self.backend.n_ctx} cells), "
                 "system prompt kept", style="dim")
        if kept:
            self.say(f"(the conversation before is kept in history as '{kept}')", style="dim")

    def _cmd_undo(self, command: Command) -> None:
        user = self.session.undo()
        self.setup.save()
        text = user["content"].replace("\n", " ")
        shown = text if len(text) <= 60 else text[:57] + "..."
        self.say(f"undone: \"{shown}\" and its reply · KV {self.session.n_kv}/{self.backend.n_ctx} cells",
                 style="dim")

    def _cmd_retry(self, command: Command) -> None:
        self._show(self.session.retry())

    def _cmd_sessions(self, command: Command) -> None:
        infos = saved_sessions.list_sessions()
        if not infos:
            self.say("no saved sessions yet — /save NAME keeps this one")
            return
        table = Table("", "name", "turns", "KV cells", "size", "model", box=None, pad_edge=False)
        for i in infos:
            table.add_row("*" if i.name == self.session_name else "", i.name, str(i.turns),
                          f"{i.n_kv}/{i.n_ctx}", format_bytes(i.size), i.model)
        self.console.print(table)

    def _cmd_stats(self, command: Command) -> None:
        if self._last is not None:
            self.say(wrap_segments("last reply: " + stats_line(self._last, self.backend.load_s),
                                   self.console.width))
        else:
            self.say(f"no reply yet (model loaded in {self.backend.load_s:.2f}s)")
        self.say(f"{kv_text(self.kv_fill())}{self._cell_text()}")
        self.say(hardware_text(self.sampler.sample(), self.device))
        dropped = sum(1 for m in self.session.dropped if m["role"] == "user")
        self.say(f"conversation: {plural(self._user_turns(), 'turn')} in context, "
                 f"{plural(self.session.n_tokens, 'token')}, {plural(dropped, 'turn')} dropped")

    def _cell_text(self) -> str:
        facts = self.backend.facts()
        if not isinstance(facts, LocalFacts) or self.bytes_per_cell is None:
            return " on the server"
        req = facts.request
        return (f" at K {req.type_k.name}, V {req.type_v.name} "
                f"({self.bytes_per_cell / 1024:.1f} KiB per cell)")

    def _settings_line(self) -> str:
        """Every /set key and its value now: the sampler's, then the session's own (max_tokens)."""
        sampling = dataclasses.asdict(self.session.sampling)
        return " · ".join(_setting_text(key, sampling[key] if key in sampling else getattr(self.session, key))
                          for key in SET_KEYS)

    def _cmd_set(self, command: Command) -> None:
        if command.key is not None:
            if command.key in keys_in("sampling"):
                self.session.set_sampling(dataclasses.replace(self.session.sampling,
                                                              **{command.key: command.value}))
            else:
                setattr(self.session, command.key, command.value)
        self.say(self._settings_line())

    def _cmd_info(self, command: Command) -> None:
        facts = self.backend.facts()
        if isinstance(facts, LocalFacts):
            kept = self.session.checkpoint_usage if facts.needs_checkpoints else None
            rows = local_rows(facts, kv_total=self.kv_fill().total_bytes or 0.0, checkpoints=kept)
            rows.insert(6, ("chat template", self.session.template_origin))
            rows += [("sampling", self._settings_line()),
                     ("speculative", speculative_line(self.backend.speculative_mode,
                                                      facts.speculative_counters))]
        else:
            # What the server reports (/props, the last reply's timings), and what it does
            # not say shown as such.
            rows = server_rows(facts) + [
                ("KV cache",
                 kv_text(self.kv_fill()) + " · cache types and memory: not reported by the server"),
                ("chat template", self.session.template_origin),
                ("sampling", self._settings_line()),
            ]
        rows.append(("session", self.session_name or "unsaved (/save NAME keeps it)"))
        self._info_table(rows)

    def _info_table(self, rows: list[tuple[str, str]]) -> None:
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
        # A session this chat saved is updated; any other is replaced only when asked twice.
        exists = session_store.session_path(name).exists()
        if exists and name not in self._saved_here and self._confirm != f"/save {name}":
            self._confirm = f"/save {name}"
            self.env.warn(f"session '{name}' already exists — /save {name} again replaces it")
            return
        size = self.setup.save_as(name, replace_existing=exists)
        self._saved_here.add(name)
        self._saved_revision = self.session.revision
        self.say(f"saved '{name}' ({format_bytes(size)}, {self.session.n_kv} KV cells) — "
                 f"resume with `kvchat chat --session {name}` or /load {name}", style="dim")

    def _cmd_copy(self, command: Command) -> None:
        from kvchat.ui.clipboard import copy_last_reply

        terminal = self.env.stdout if self.console.is_terminal else None
        self.say(copy_last_reply(self.session.messages, code=command.argument == "code", terminal=terminal),
                 style="dim")

    def _cmd_load(self, command: Command) -> None:
        name = command.argument
        if name == self.session_name:
            self.say(f"'{name}' is already open", style="dim")
            return
        if not saved_sessions.exists(name):
            raise SessionError(f"no session named '{name}'", hint="/sessions lists them")
        if self._unsaved() and self._confirm != f"/load {name}":
            self._confirm = f"/load {name}"
            self.env.warn(f"this chat is not saved — /save NAME keeps it; /load {name} again discards it")
            return
        previous = self.session_name
        sampling, max_tokens = self.session.sampling, self.session.max_tokens
        self.setup.save()
        kept = self._drop_recent()
        self.setup.close()
        try:
            self._use(self._opener(name, sampling, max_tokens))
        except BaseException:
            # Get back to a working chat: the previous session, or a fresh one.
            self._use(self._opener(previous, sampling, max_tokens))
            raise
        self._confirm = None
        self._saved_revision = None
        self._saved_here.clear()
        if kept:
            self.say(f"(the previous chat is kept in history as '{kept}')", style="dim")
        self.say(f"loaded '{name}': {plural(self._user_turns(), 'turn')}, {self.session.n_kv} KV cells "
                 f"restored ({self.setup.rebuilt_tokens} re-evaluated)", style="dim")
        self._show_last_exchanges()

    def close(self) -> None:
        self.sampler.stop()
        try:
            self._drop_recent()
        finally:
            self.setup.close()
