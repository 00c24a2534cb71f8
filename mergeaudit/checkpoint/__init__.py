"""Hugging Face checkpoints in safetensors, wherever they live.

    from mergeaudit.checkpoint import Checkpoint, CheckpointWriter, discover
    ck = Checkpoint.open("s3://bkt/step-400")           # headers validated, nothing else read
    for name, t in ck.iter_tensors(): ...               # one ranged read per tensor, prefetched

`format` (safetensors layout and validation), `reader` (Checkpoint, compatibility),
`writer` (sharded, atomic publish), `discovery` (completeness under a prefix), `cache`
(read-through local cache), `reads` (bytes read per checkpoint), `names` (layer and module of
a tensor name) and `convert` (opt-in, weights_only pickle conversion).
"""

from mergeaudit.checkpoint import reads
from mergeaudit.checkpoint.cache import CheckpointCache, default_cache_dir
from mergeaudit.checkpoint.discovery import CheckpointStatus, check_complete, discover
from mergeaudit.checkpoint.format import (
    DTYPES,
    TensorSpec,
    parse_header,
    read_tensor,
    serialize_safetensors,
)
from mergeaudit.checkpoint.reader import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    Checkpoint,
    check_compatible,
    iter_aligned,
    untie_heads,
)
from mergeaudit.checkpoint.writer import CheckpointWriter, write_checkpoint

__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "TOKENIZER_FILES",
    "Checkpoint",
    "CheckpointCache",
    "CheckpointStatus",
    "CheckpointWriter",
    "TensorSpec",
    "check_compatible",
    "check_complete",
    "default_cache_dir",
    "iter_aligned",
    "discover",
    "parse_header",
    "reads",
    "read_tensor",
    "serialize_safetensors",
    "untie_heads",
    "write_checkpoint",
]
