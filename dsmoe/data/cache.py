"""Cache folder resolution, cache keys and atomic writes (safe when several ranks build at once)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import DataConfig


def resolve_cache_dir(cfg: DataConfig, output_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cfg.cache_dir``, else ``<output_dir>/data_cache``, else ``$XDG_CACHE_HOME/dsmoe`` (``~/.cache/dsmoe``)."""
    if cfg.cache_dir is not None:
        root = Path(cfg.cache_dir).expanduser()
    elif output_dir is not None:
        root = Path(output_dir).expanduser() / "data_cache"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsmoe"
    return root.resolve()


def stable_hash(payload: Any, length: int = 12) -> str:
    """Short hex digest of a JSON-serialisable payload (key order independent)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def write_dir_atomically(final: Path, fill: Callable[[Path], None]) -> bool:
    """Fill a temporary sibling folder with ``fill(tmp)`` and rename it to ``final``.

    Returns False when another process created ``final`` first (its copy is kept, ours dropped).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if final.is_dir():
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
