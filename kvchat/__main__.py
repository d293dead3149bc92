"""`python -m kvchat` and the `kvchat` script.

Start-up is mostly imports (~0.3 s); Ctrl-C then must print one line, not a
traceback from whichever module was loading. Until the CLI's own error handling
is in place, SIGINT ends the process at once with the interrupted status (nothing
has been written yet, so there is nothing to clean up).
"""

from __future__ import annotations

import os
import signal


def _interrupted_while_starting(signum: int, frame: object) -> None:
    os.write(2, b"\nkvchat: interrupted\n")
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_while_starting)


def main() -> None:
    from kvchat.cli import main as cli_main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli_main()


if __name__ == "__main__":
    main()
