"""The `kvchat` command: a Typer app and the one place errors become exit codes.

Importing this package must stay cheap: `llama_cpp` is only imported by the
commands that load a model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from typing import Annotated, Any, Optional

import typer
from click import exceptions as click_exc  # Typer < 0.26 (pinned) runs on click itself
from typer.core import TyperGroup

from kvchat import __version__
from kvchat.config import debug_enabled
from kvchat.errors import ExitCode, KvchatError


class _OutputClosed(Exception):
    """stdout's reader went away; raised instead of BrokenPipeError, which click's
    main would turn into a silent exit 1 before kvchat's error table sees it."""


class _Group(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise _OutputClosed() from exc

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click_exc.NoSuchCommand as exc:
            # `kvchat version` means the option, not the command spelled closest ('sessions')
            option = f"--{exc.command_name}"
            if any(option in param.opts for param in self.get_params(ctx)):
                raise click_exc.UsageError(f"No such command {exc.command_name!r}. Did you mean {option!r}?",
                                           ctx) from None
            raise


app = typer.Typer(
    cls=_Group,
    name="kvchat",
    help="Local chat over GGUF models, with the KV cache at the centre.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    # Plain click help: Typer's rich help panels import markdown-it and pygments,
    # which alone took longer than the whole 0.3 s start-up budget on this machine.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    # click suggests a close command name itself; Typer's suggestion would repeat it
    suggest_commands=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvchat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version."),
    ] = None,
) -> None:
    """Local chat over GGUF models, with the KV cache at the centre."""


from kvchat.cli import bench as _bench  # noqa: E402,F401
from kvchat.cli import cache as _cache  # noqa: E402,F401
from kvchat.cli import chat as _chat  # noqa: E402,F401
from kvchat.cli import estimate as _estimate  # noqa: E402,F401
from kvchat.cli import models as _models  # noqa: E402,F401
from kvchat.cli import paths as _paths  # noqa: E402,F401
from kvchat.cli import run as _run  # noqa: E402,F401  (registers its command)
from kvchat.cli import serve as _serve  # noqa: E402,F401
from kvchat.cli import sessions as _sessions  # noqa: E402,F401


def _say(text: str) -> None:
    """One line on stderr, whatever state stderr is in."""
    with contextlib.suppress(Exception):
        sys.stderr.write(text)
        sys.stderr.flush()


def _line(exc: BaseException | str) -> str:
    """The error text, safe for a terminal (it may quote a file) and bounded."""
    from kvchat.ui.render import safe_text

    return safe_text(str(exc), limit=1000)


def _os_error(exc: OSError) -> tuple[str, ExitCode]:
    """A clean line for an OSError that reached the top: what, where, what next."""
    where = f" {exc.filename}" if exc.filename is not None else ""
    name = errno.errorcode.get(exc.errno or 0, "")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"the disk is full (writing{where or ' the output'})"
        return f"{what} — free some space and try again", ExitCode.ERROR
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where} — check its permissions (or KVCHAT_HOME)", ExitCode.ERROR
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return (f"not a folder:{where} — KVCHAT_HOME and the kvchat folders must be folders, not files",
                ExitCode.USAGE)
    if exc.errno == errno.EISDIR:
        return f"is a folder, not a file:{where} — pass a file", ExitCode.USAGE
    if exc.errno == errno.ENOENT:
        return f"no such file or folder:{where} — check the path", ExitCode.NOT_FOUND
    what = exc.strerror or str(exc)
    return f"{what}{':' + where if where else ''} ({name or 'OSError'})", ExitCode.ERROR


def _quiet_stdout() -> None:
    """After stdout failed: point it at /dev/null so the exit flush stays silent."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _flush_stdout() -> None:
    if sys.stdout is not None:
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turn every failure into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled()
    if "--debug" in args:
        args.remove("--debug")
        debug = True
    if sys.stdout is None:  # started with stdout closed (`kvchat ... >&-`)
        _say("kvchat: error: standard output is closed — run kvchat with stdout open (or > /dev/null)\n")
        sys.exit(int(ExitCode.ERROR))
    try:
        # Outside standalone mode Typer returns the code of an Exit (KeyboardInterrupt
        # becomes Exit(130)) instead of exiting.
        rc = app(args=args, prog_name="kvchat", standalone_mode=False)
        _flush_stdout()
    except KvchatError as exc:
        if debug:
            traceback.print_exc()
        _say(f"kvchat: error: {_line(exc)}\n")
        sys.exit(int(exc.exit_code))
    except click_exc.NoArgsIsHelpError as exc:
        # `kvchat` alone asks for help: print it on stdout and succeed (a subcommand
        # missing its arguments still shows its help, as a usage error).
        typer.echo(exc.ctx.get_help())
        sys.exit(int(ExitCode.SUCCESS) if exc.ctx.parent is None else int(ExitCode.USAGE))
    except click_exc.UsageError as exc:
        if debug:
            traceback.print_exc()
        hint = f" — see `{exc.ctx.command_path} --help`" if exc.ctx else ""
        _say(f"kvchat: error: {_line(exc.format_message())}{hint}\n")
        sys.exit(int(ExitCode.USAGE))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _say("\nkvchat: interrupted\n")
        sys.exit(int(ExitCode.INTERRUPTED))
    except (BrokenPipeError, _OutputClosed):
        # The reader went away (`kvchat run ... | head -c 5`): stop quietly, with the
        # status a shell gives any tool killed by SIGPIPE (`yes | head`).
        _quiet_stdout()
        sys.exit(BROKEN_PIPE)
    except UnicodeError as exc:
        if debug:
            traceback.print_exc()
        _say(f"kvchat: error: text that is not valid UTF-8 ({_line(exc)}) — pass UTF-8 text\n")
        sys.exit(int(ExitCode.USAGE))
    except OSError as exc:
        if debug:
            traceback.print_exc()
        if exc.filename is None:
            _quiet_stdout()
        message, code = _os_error(exc)
        _say(f"kvchat: error: {_line(message)}\n")
        sys.exit(int(code))
    except MemoryError:
        _say("kvchat: error: out of memory — use a smaller --ctx or model (see `kvchat estimate`)\n")
        sys.exit(int(ExitCode.OUT_OF_MEMORY))
    except Exception as exc:  # a bug: say so in one line, traceback only with --debug
        if debug:
            traceback.print_exc()
        _internal(exc)
    if isinstance(rc, int) and rc:
        if rc == ExitCode.INTERRUPTED:
            _say("\nkvchat: interrupted\n")
        sys.exit(rc)


BROKEN_PIPE = 128 + 13  # SIGPIPE


def _internal(exc: BaseException) -> None:
    _say(f"kvchat: internal error: {type(exc).__name__}: {_line(exc)} (rerun with --debug for details)\n")
    sys.exit(int(ExitCode.ERROR))
