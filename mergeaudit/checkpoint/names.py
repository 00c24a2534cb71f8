"""What an HF tensor name says about where the tensor sits: its layer index and module path.

Geometry groups its rows by layer and module with it, and the merge executor orders and keys
tensors by layer; it lives here, beside the checkpoints, so neither has to import the other.

    parse_tensor_name("model.layers.3.mlp.up_proj.weight")   # (3, "mlp.up_proj")
    parse_tensor_name("model.embed_tokens.weight")           # (None, "embed_tokens")
"""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+?)(?:\.(?:weight|bias))?$")


def parse_tensor_name(name: str) -> tuple[int | None, str]:
    """Layer index and module of an HF tensor name (`model.layers.3.mlp.up_proj.weight`)."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)), m.group(2)
    module = name.removeprefix("model.").removesuffix(".weight").removesuffix(".bias")
    return None, module
