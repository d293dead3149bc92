"""`kvchat run`: one prompt in (arguments and/or stdin), the answer out on stdout."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from kvchat.cli import app
from kvchat.cli.options import CHAT_OPTIONS, JSON, shared_options
from kvchat.errors import ExitCode, KvchatError, NetworkError, SessionError, UsageError
from kvchat.ui.environment import Environment, valid_text

if TYPE_CHECKING:
    from kvchat.app import Chat
    from kvchat.ui.progress import LoadProgress


def split_model_and_prompt(words: list[str], model: str | None) -> tuple[str | None, list[str], bool]:
    """`run [MODEL] [PROMPT...]`: the first word is a model only if it looks like one
    (kvchat.registry.looks_like_model_ref). Returns the model, the prompt words, and
    whether the model was guessed from the first word."""
    from kvchat.registry import looks_like_model_ref

    if model is None and words and looks_like_model_ref(words[0]):
        return words[0], words[1:], True
    return model, words, False


def build_prompt(piped: str, words: list[str], model: str | None = None) -> str:
    parts = [p for p in (piped.strip("\n"), " ".join(words).strip()) if p.strip()]
    if not parts:
        if model is not None:  # `kvchat run MODEL` alone: the user wanted a chat
            raise UsageError(f"no prompt given for {model}",
                             hint=f'to chat with it, use `kvchat chat {model}`; to ask once: '
                                  f'kvchat run {model} "Why is the sky blue?"')
        raise UsageError(
            "no prompt given",
            hint='pass it as arguments (kvchat run "Why is the sky blue?") or pipe it on stdin; '
                 'for a conversation, use `kvchat chat`',
        )
    return valid_text("\n\n".join(parts))


def last_conversation(session_name: str | None) -> str:
    """--continue: the session saved last, named or a recent chat."""
    from kvchat.saved_sessions import latest_session

    if session_name is not None:
        raise UsageError("--continue resumes the last conversation; give it or --session NAME, not both")
    name = latest_session()
    if name is None:
        raise SessionError("there is no conversation to continue",
                           hint="start one with `kvchat chat`, or `kvchat run --session NAME`")
    return name


def read_attachment(path: str, stdin_text: str | None) -> str:
    """One -f file's text (`-`: `stdin_text`, what was piped); a binary or unreadable
    file is a usage error, said in one line."""
    if path == "-":
        if stdin_text is None:
            raise UsageError("-f -: nothing is piped on stdin", hint="pipe the file in, or name it: -f PATH")
        return stdin_text
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UsageError(f"-f {path}: {exc.strerror or exc}", hint="check the path") from None
    hint = "-f attaches text files (UTF-8); convert it to text first"
    if b"\0" in data:  # valid UTF-8 may hold NUL bytes; text never does
        raise UsageError(f"-f {path}: a binary file, not text", hint=hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"-f {path}: not UTF-8 text (a binary file?)", hint=hint) from None


def attach_files(paths: list[str], stdin_text: str | None) -> str:
    """The files of -f, each under its name in a fence longer than any run of
    backticks in it (so that no file can close it early), one after another."""
    parts = []
    for path in paths:
        text = valid_text(read_attachment(path, stdin_text)).strip("\n")
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
        parts.append(f"{'stdin' if path == '-' else path}:\n{fence}\n{text}\n{fence}")
    return "\n\n".join(parts)


def _guessed_model_failed(exc: KvchatError, word: str, rest: list[str]) -> KvchatError:
    """A first word taken for a model that then failed: say how to send it as a prompt."""
    prompt = " ".join([word, *rest])
    exc.hint = (f"{exc.hint}; " if exc.hint else "") + \
        f'to send it as a prompt, quote the words as one argument: kvchat run "{prompt}"'
    return exc


@app.command()
@shared_options(CHAT_OPTIONS, JSON)
def run(
    words: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="[MODEL] [PROMPT]...",
            help="A model (optional: a .gguf path, an alias, user/repo:QUANT), then the prompt.",
        ),
    ] = None,
    *,
    flags: dict[str, Any],
    stats: Annotated[bool, typer.Option("--stats", help="One line of timings and memory on stderr.")] = False,
    as_json: bool = False,
    verbose: bool = False,
    session_name: str | None = None,
    rebuild: bool = False,
    undo: Annotated[bool, typer.Option(
        "--undo", help="With --session: drop its last message and reply first (then answer PROMPT, if any).",
    )] = False,
    continue_last: Annotated[bool, typer.Option(
        "--continue", "-C", help="Continue the last conversation (named or a recent chat) and save this "
        "turn into it.",
    )] = False,
    files: Annotated[Optional[list[str]], typer.Option(
        "--file", "-f", metavar="PATH",
        help="Attach a text file to the prompt, under its name (repeatable; - reads stdin).",
    )] = None,
    schema: Annotated[Optional[str], typer.Option(
        "--schema", metavar="JSON|FILE",
        help="Make the reply JSON that follows this JSON Schema (llama.cpp's grammar sampler).",
    )] = None,
) -> None:
    """Answer one prompt. stdin comes first, then the arguments, a blank line between.

    The first word is taken as the model only if it is a .gguf file, an alias
    (kvchat list --available), user/repo:QUANT or a GGUF repo; otherwise every
    word is the prompt. -m always names the model.

    \b
    Examples:
      echo "Why is the sky blue?" | kvchat run
      kvchat run ./model.gguf "Name three colours" --temperature 0 --seed 1
      git diff | kvchat run "Write a commit message for this diff" --json
      kvchat run --session work "Remember: my name is Ada."   (then later)
      kvchat run --session work "What is my name?"
      kvchat run --session work --undo "Forget that; my name is Grace."
      kvchat run --continue "And in French?"
      kvchat run -f notes.md -f todo.txt "What is left to do?"
      kvchat run --schema '{"type": "object", "properties": {"city": {"type": "string"}}}' "Paris?"
    """
    if continue_last:
        session_name = last_conversation(session_name)
    answer_piped(Environment(), flags, words=list(words or []), stats=stats, as_json=as_json,
                 verbose=verbose, session_name=session_name, rebuild=rebuild, undo=undo, files=files or [],
                 schema=schema)


def answer_piped(env: Environment, flags: dict[str, Any], *, words: list[str] | None = None,
                 stats: bool = False, as_json: bool = False, verbose: bool = False,
                 session_name: str | None = None, rebuild: bool = False, undo: bool = False,
                 files: list[str] | None = None, schema: str | None = None) -> None:
    """One prompt (`files` each under its name, stdin, then `words`) answered on stdout:
    `run`, and `chat` when piped. `undo` first drops the named session's last exchange;
    the prompt is then optional. `schema` (--schema) constrains the reply to JSON."""
    from kvchat.app import open_conversation
    from kvchat.ui.progress import LoadProgress
    from kvchat.ui.resume import opened_text, restored_settings

    if undo and not session_name:
        raise UsageError("--undo needs --session NAME", hint="kvchat run --session NAME --undo")
    json_schema = None
    if schema is not None:
        from kvchat.app import resolve_schema

        if flags.get("speculative") not in (None, "off"):
            raise UsageError("--schema and --speculative cannot be combined",
                             hint="drafts would run past the grammar; drop --speculative")
        json_schema = resolve_schema(schema)
        flags = {**flags, "speculative": "off"}
    all_words = words or []
    model_ref, prompt_words, guessed = split_model_and_prompt(all_words, flags.get("model"))
    piped = env.read_stdin()
    if files:  # attached first: a question after them reads as it would after a document
        attached = attach_files(files, piped if not env.stdin_isatty else None)
        piped = attached if "-" in files else "\n\n".join(p for p in (attached, piped.strip("\n")) if p)
    # `kvchat run MODEL` alone (not `chat` with an empty pipe) is told about `kvchat chat`.
    asked_model = model_ref if words is not None else None
    wanted = not undo or piped.strip() or prompt_words
    prompt = build_prompt(piped, prompt_words, asked_model) if wanted else None
    # Where the piped part ends: other prompts over the same document share it.
    shared_chars = len(piped.strip("\n")) if piped.strip() else None
    with LoadProgress(env, enabled=not verbose) as progress:
        try:
            conv = open_conversation({**flags, "model": model_ref}, env.warn, session_name=session_name,
                                     rebuild=rebuild, verbose=verbose, answers=prompt is not None)
        except KvchatError as exc:
            if guessed and exc.exit_code in (ExitCode.NOT_FOUND, ExitCode.NETWORK, ExitCode.BAD_MODEL):
                raise _guessed_model_failed(exc, all_words[0], prompt_words) from None
            raise
        progress.loaded(conv.model_label)
        if json_schema is not None:
            conv.backend.set_json_schema(json_schema)
        if conv.named is not None:
            restored = restored_settings(conv.settings)
            progress.say(f"kvchat: {opened_text(conv)}"
                         + (f"; settings restored: {', '.join(restored)}" if restored else ""))
        conv.session.on_prefill = progress.prefill
        try:
            if undo:
                undone = conv.session.undo()
                conv.save()
                env.stderr.write(f"kvchat: undone in '{session_name}': the last message "
                                 f"({undone['content'][:60]!r}) and its reply; "
                                 f"{conv.session.n_kv} KV cells kept\n")
            if prompt is not None:
                _answer(env, conv, prompt, progress, stats=stats, as_json=as_json, shared_chars=shared_chars)
        finally:
            conv.close()


def _answer(env: Environment, conv: Chat, prompt: str, progress: LoadProgress, *, stats: bool,
            as_json: bool, shared_chars: int | None = None) -> None:
    from kvchat.app import turn_report
    from kvchat.ui.render import reevaluated_notice, stats_line

    session = conv.session
    pieces: list[str] = []
    reasoning: list[str] = []
    interrupted = False
    dropped: NetworkError | None = None
    turn = session.send(prompt, shared_chars=shared_chars)
    try:
        for event in turn:
            progress.done()
            pieces.append(event.text)
            reasoning.append(event.reasoning_text)
            if as_json:
                continue
            if event.reasoning_text:  # a thinking model's reasoning is not the answer
                env.stderr.write(event.reasoning_text)
                env.stderr.flush()
            env.stdout.write(event.text)
            env.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    except NetworkError as exc:
        if turn.stats.stop_reason != "dropped":
            raise
        dropped = exc  # the server went away mid-reply: keep and save what came
    finally:
        # Close the reply now, whatever stopped it (Ctrl-C, a full or closed stdout):
        # the engine trims its cache in the generator's cleanup, which must run
        # before the engine is freed, never later from the garbage collector.
        turn.close()
        progress.done()
    if not turn.begun:  # interrupted before the turn began
        raise KeyboardInterrupt
    figures = turn.stats
    text = "".join(pieces)
    if as_json:
        record = turn_report(conv, figures, text, "".join(reasoning)).to_json()
        env.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif text and not text.endswith("\n"):
        env.stdout.write("\n")
    env.stdout.flush()
    if stats:
        env.stderr.write(stats_line(figures, conv.backend.load_s, conv.backend.memory(session),
                                    rebuilt_tokens=conv.rebuilt_tokens, rebuild_s=conv.rebuild_s) + "\n")
    if figures.prefix_cache_skipped and not figures.prefix_cache_routine and not as_json:
        env.warn(figures.prefix_cache_skipped)
    if figures.reevaluated_tokens:
        env.warn(reevaluated_notice(figures))
    if figures.dropped_turns:
        env.warn(
            f"context full: dropped the {figures.dropped_turns} oldest turn(s) "
            f"({figures.dropped_tokens} tokens) to make room"
        )
    conv.save()
    if dropped is not None:
        raise dropped
    if interrupted:
        raise KeyboardInterrupt
