"""User-facing errors: one line that names the file and the fix, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import metadata


class UserError(Exception):
    """A failure the user caused and can fix; the message is printed as one line."""


def environment_problem() -> str | None:
    """One line saying why torch or torchaudio cannot load (a broken or mismatched install), or None when they do."""
    try:
        import torch  # noqa: F401
        import torchaudio  # noqa: F401  (loads its compiled library, which must match torch's ABI)
    except (ImportError, OSError) as error:
        versions = []
        for name in ("torch", "torchaudio"):
            try:
                versions.append(f"{name} {metadata.version(name)}")
            except metadata.PackageNotFoundError:
                versions.append(f"{name} not installed")
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"the installed {' and '.join(versions)} do not load together ({cause}); "
                "reinstall the locked versions with `make install` (or `pip install -r requirements.lock`)")
    return None


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a command-line entry point, turning UserError into `error: ...` and exit status 2.

    A broken torch/torchaudio install is reported the same way before `main` imports anything heavy.
    """
    problem = environment_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        status = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
