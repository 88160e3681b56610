"""Which weights a degradation touches: the Linear layers of the transformer blocks.

Embeddings and the (usually tied) output head stay in full precision, as in RTN/GPTQ/Wanda practice.
"""

from __future__ import annotations

import torch


def block_linears(model) -> dict[str, torch.nn.Linear]:
    output = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output}
