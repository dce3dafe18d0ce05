"""User-facing errors: one line that names the file and the fix, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A failure the user caused and can fix; the message is printed as one line."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a command-line entry point, turning UserError into `error: ...` and exit status 2."""
    try:
        status = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
