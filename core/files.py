"""Atomic file writes: the new content goes to a temporary sibling that is then renamed over the file, so a kill
mid-write leaves the previous version whole (resume state, manifests)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any, *, indent: int | None = 1, temporary_suffix: str = ".tmp") -> None:
    """`data` as UTF-8 JSON at `path`, written under `<name><temporary_suffix>` and renamed."""
    temporary = path.with_name(path.name + temporary_suffix)
    temporary.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
