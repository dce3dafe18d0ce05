"""User-facing errors: one line that names the file and the fix, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path


class UserError(Exception):
    """A failure the user caused and can fix; the message is printed as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every Timbre command uses it: `-h/--help` and `--version` everywhere, and a usage mistake is one
    `error:` line (exit status 2) instead of the usage text."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s (timbre {timbre_version()})")

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")


def timbre_version() -> str:
    try:
        return metadata.version("timbre-ssl")
    except metadata.PackageNotFoundError:
        return "unknown"


def _number(kind: type, least: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < least or (strict and value == least) or value != value:
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if strict else 'at least'} {least}")
        return value

    return parse


positive_int = _number(int, 1, strict=False)
non_negative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)


def output_file(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can be written at `path` (its folder is made); returns it as a Path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; name a file to write, e.g. {path / 'out'}")
    output_folder(path.parent)
    return path


def output_folder(path: str | os.PathLike) -> Path:
    """Check, before any work, that `path` is (or can be made) a writable folder, and make it."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{path}: {parent} is a file, not a folder; choose another output path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{path}: cannot create this folder ({error.strerror}); choose another output path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: not writable; choose another output path")
    return path


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


def dispatch(argv: list[str], *, prog: str, commands: dict[str, tuple[str, str]], default: tuple[str, str],
             footer: str = "") -> int | None:
    """`prog COMMAND ARGS...` -> the `module:function` that `commands[COMMAND]` names, imported only when chosen;
    anything else -> `default` (a recipe, for the training commands). Each entry is (target, "SYNOPSIS  what it does");
    the usage text is made from the table. (argparse subparsers cannot fall back to a default command.)"""
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {prog} {default[1]}"] + [f"  {prog} {name} {synopsis}" for name, (_, synopsis) in commands.items()]
        print("\n".join(["usage:", *lines] + ([f"\n{footer}"] if footer else [])), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    target, rest = (commands[argv[0]][0], argv[1:]) if argv[0] in commands else (default[0], argv)
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(rest)


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
