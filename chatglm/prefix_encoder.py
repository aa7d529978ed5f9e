"""P-Tuning v2 prefix encoder, shared by both architectures (original parameter names)."""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """pre_seq_len learned rows -> the keys and values of every layer for those prefix positions.

    kv_size is 2 * layers * (kv heads * head_dim). With prefix_projection the rows go through a two-layer
    MLP: v1 embeds to hidden_size first, v2/v3 embed to kv_size (as the originals do).
    """

    def __init__(self, config, kv_size: int, embed_size: int | None = None, device=None, dtype=None):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            embed_size = embed_size or kv_size
            self.embedding = nn.Embedding(config.pre_seq_len, embed_size, device=device, dtype=dtype)
            self.trans = nn.Sequential(
                nn.Linear(embed_size, config.hidden_size, device=device, dtype=dtype),
                nn.Tanh(),
                nn.Linear(config.hidden_size, kv_size, device=device, dtype=dtype),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size, device=device, dtype=dtype)
        self.pre_seq_len = config.pre_seq_len
        self.dropout = nn.Dropout(0.1)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        x = self.embedding(prefix)
        return self.trans(x) if self.prefix_projection else x

    def past_key_values(self, batch_size: int, layers: int, kv_heads: int, head_dim: int, device, dtype):
        """The prefix as a KV cache: per layer (k, v), each [b, kv_heads, pre_seq_len, head_dim]."""
        tokens = torch.arange(self.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        kv = self(tokens).to(dtype).view(batch_size, self.pre_seq_len, 2 * layers, kv_heads, head_dim)
        kv = self.dropout(kv).permute(2, 0, 3, 1, 4)  # [2 * layers, b, kv_heads, pre, d]
        return tuple((kv[2 * i], kv[2 * i + 1]) for i in range(layers))
