"""The `kvchat` command: a Typer app and the one place errors become exit codes.

Importing this package must stay cheap: `llama_cpp` is only imported by the
commands that load a model.
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, Optional

import typer
from click import exceptions as click_exc  # Typer < 0.26 (pinned) runs on click itself

from kvchat import __version__
from kvchat.config import debug_enabled
from kvchat.errors import ExitCode, KvchatError

app = typer.Typer(
    name="kvchat",
    help="Local chat over GGUF models, with the KV cache at the centre.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    # Plain click help: Typer's rich help panels import markdown-it and pygments,
    # which alone took longer than the whole 0.3 s start-up budget on this machine.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
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
from kvchat.cli import sessions as _sessions  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turn every failure into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled()
    if "--debug" in args:
        args.remove("--debug")
        debug = True
    try:
        # Outside standalone mode Typer returns the code of an Exit (KeyboardInterrupt
        # becomes Exit(130)) instead of exiting.
        rc = app(args=args, prog_name="kvchat", standalone_mode=False)
    except KvchatError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"kvchat: error: {exc}\n")
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
        sys.stderr.write(f"kvchat: error: {exc.format_message()}{hint}\n")
        sys.exit(int(ExitCode.USAGE))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.stderr.write("\nkvchat: interrupted\n")
        sys.exit(int(ExitCode.INTERRUPTED))
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(int(ExitCode.ERROR))
    except Exception as exc:  # a bug: say so in one line, traceback only with --debug
        if debug:
            traceback.print_exc()
        sys.stderr.write(
            f"kvchat: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)\n"
        )
        sys.exit(int(ExitCode.ERROR))
    if isinstance(rc, int) and rc:
        if rc == ExitCode.INTERRUPTED:
            sys.stderr.write("\nkvchat: interrupted\n")
        sys.exit(rc)
