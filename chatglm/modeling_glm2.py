"""GLM2: the architecture of ChatGLM2-6B and ChatGLM3-6B (v2, v3).

Pre-norm decoder: RMSNorm, multi-query attention (2 KV groups), rotary embedding on the first half of each
head (pairwise interleaved), SwiGLU MLP, untied output layer. Module and parameter names are the original
ones, so the original shards load without any remapping. Tensors here are batch-first ([b, s, ...]); the
original is seq-first, which changes nothing numerically.

KV cache: a `KVCache` (chatglm/kv_cache.py) that each attention layer writes into; the original's tuple of per-layer
(k, v), each [b, groups, s, head_dim] (P-Tuning prefix first), is what `forward` takes and returns at the API.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.settings import settings

from .base import ChatGLMCausalLM
from .config import ChatGLMConfig
from .kv_cache import KVCache, cache_length, open_cache
from .layers import Attention, KeyLengths, LayerNorm, Linear, RMSNorm, Rotary, SwiGLU, compute_dtype, use_kernels
from .prefix_encoder import PrefixEncoder

MAX_LINES = 600  # keep this file small enough to read in one sitting


class RotaryEmbedding(nn.Module):
    """cos/sin of the 2D rotary positions; `inv_freq` is kept only because the checkpoints carry it."""

    def __init__(self, dim, rope_ratio=1.0, device=None, dtype=None):
        super().__init__()
        self.dim = dim  # rotated dims per head (64 of 128 in the 6B models)
        self.base = 10000.0 * rope_ratio  # the 32K variants stretch theta by rope_ratio
        self.register_buffer("inv_freq", self._inv_freq(device).to(dtype))
        self._cache = None

    def _inv_freq(self, device=None):
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float) / self.dim))

    def reset_parameters(self):
        self.inv_freq.copy_(self._inv_freq(self.inv_freq.device).to(self.inv_freq.dtype))

    def table(self, need: int, device) -> torch.Tensor:
        """[n >= need, dim/2, 2] fp32 (cos, sin) of positions 0 .. n-1, cached and grown by doubling."""
        cache = self._cache
        if cache is None or cache.shape[0] < need or cache.device != torch.device(device):
            n = max(need, 2048 if cache is None else 2 * cache.shape[0])
            theta = self._inv_freq(device)
            angles = torch.outer(torch.arange(n, device=device, dtype=torch.float), theta)
            cache = self._cache = torch.stack([angles.cos(), angles.sin()], dim=-1)
        return cache

    def forward(self, position_ids, dtype):
        # -> [b, s, dim/2, 2] (cos, sin), computed in fp32 then cast like the original's cache. The caller has
        # sized the table (`table`): no position is read back to the host here.
        return self._cache[position_ids].to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_index: int = 0, device=None, dtype=None):
        super().__init__()
        self.layer_index = layer_index  # where this layer's keys and values live in the cache
        self.heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.groups = config.multi_query_group_num if config.multi_query_attention else self.heads
        qkv_out = (self.heads + 2 * self.groups) * self.head_dim
        bias = config.add_bias_linear or config.add_qkv_bias
        self.query_key_value = Linear(config.hidden_size, qkv_out, bias=bias, device=device, dtype=dtype)
        self.dense = Linear(
            self.heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear, device=device, dtype=dtype
        )
        self.rotary, self.core_attention = Rotary(), Attention()  # no parameters: swappable kernels (layers.py)

    def forward(self, x, rope, mask, kv_cache):
        b, s, _ = x.shape
        qkv = self.query_key_value(x)  # [b, s, (heads + 2 groups) * d]: q, k, v
        q_size, kv_size = self.heads * self.head_dim, self.groups * self.head_dim
        # q and k are adjacent in the projection: one rotary pass over both (in place with the kernel).
        qk = qkv[..., : q_size + kv_size].view(b, s, self.heads + self.groups, self.head_dim)
        qk = self.rotary(qk, rope)
        q = qk[:, :, : self.heads].transpose(1, 2)  # [b, heads, s, d]
        k = qk[:, :, self.heads :].transpose(1, 2)  # [b, groups, s, d]
        v = qkv[..., q_size + kv_size :].view(b, s, self.groups, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_index, k, v)  # [b, groups, cached + s (or the fixed span), d]
        out = self.core_attention(q, k, v, mask)  # [b, heads, s, d]; head h reads KV group h // (heads / groups)
        return self.dense(out.transpose(1, 2).reshape(b, s, q_size))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        h, f, bias = config.hidden_size, config.ffn_hidden_size, config.add_bias_linear
        self.dense_h_to_4h = Linear(h, 2 * f, bias=bias, device=device, dtype=dtype)  # [gate | up]
        self.dense_4h_to_h = Linear(f, h, bias=bias, device=device, dtype=dtype)
        self.activation = SwiGLU()

    def forward(self, x):
        return self.dense_4h_to_h(self.activation(self.dense_h_to_4h(x)))  # [b, s, 2f] -> [b, s, f] -> [b, s, h]


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int, device=None, dtype=None):
        super().__init__()
        self.layer_number = layer_number
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        norm = RMSNorm if config.rmsnorm else LayerNorm
        self.input_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=dtype)
        self.self_attention = SelfAttention(config, layer_number - 1, device=device, dtype=dtype)
        self.post_attention_layernorm = norm(
            config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=dtype
        )
        self.mlp = MLP(config, device=device, dtype=dtype)

    def forward(self, x, rope, mask, kv_cache):
        ln = self.input_layernorm(x)
        attn = self.self_attention(ln, rope, mask, kv_cache)
        x = (ln if self.post_ln_residual else x) + attn
        ln = self.post_attention_layernorm(x)
        return (ln if self.post_ln_residual else x) + self.mlp(ln)


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(
            GLMBlock(config, i + 1, device=device, dtype=dtype) for i in range(config.num_layers)
        )
        self.post_layer_norm = config.post_layer_norm
        if self.post_layer_norm:
            norm = RMSNorm if config.rmsnorm else LayerNorm
            self.final_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=dtype)

    def forward(self, x, rope, mask, cache, output_hidden_states=False):
        hidden = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x = layer(x, rope, mask, cache)
        if self.post_layer_norm:
            x = self.final_layernorm(x)
        if output_hidden_states:
            hidden.append(x)
        return x, hidden


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device, dtype=dtype)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class ChatGLMModel(nn.Module):
    """The GLM2 trunk, named `transformer` in the checkpoints."""

    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config, device=device, dtype=dtype)
        self.num_layers = config.num_layers
        self.groups = config.multi_query_group_num if config.multi_query_attention else config.num_attention_heads
        self.kv_channels = config.kv_channels
        self.rotary_pos_emb = RotaryEmbedding(
            config.kv_channels // 2, rope_ratio=getattr(config, "rope_ratio", 1.0), device=device, dtype=dtype
        )
        self.encoder = GLMTransformer(config, device=device, dtype=dtype)
        self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            kv_size = config.num_layers * config.kv_channels * self.groups * 2
            self.prefix_encoder = PrefixEncoder(config, kv_size, device=device, dtype=dtype)

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        output_hidden_states=False,
        use_cache=True,
    ):
        """The one forward: a prompt, a decode step, or a batch of rows each at its own position.

        input_ids [b, s]: the new tokens. position_ids [b, s]: their positions (default: after each row's cached
        text). attention_mask [b, cached text + s]: 0 marks left padding (or None). past_key_values: a KVCache,
        written in place with each row at its own length (or, in fixed-step mode, at tensor positions under the
        cache's own mask: no Python value read from the data); the original's tuple (copied); or None.
        Returns (hidden [b, s, hidden], the cache after these tokens, per-layer hidden states when asked)."""
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        x = x.to(compute_dtype(x, bool(self.config.quantization_bit)))  # [b, s, hidden]
        b, s = x.shape[:2]
        fixed = isinstance(past_key_values, KVCache) and past_key_values.pos is not None
        if fixed:  # the fixed-shape decode step (chatglm/static_decode.py sized the rotary table)
            cache, mask = past_key_values, past_key_values.step_mask()
        else:
            prefix = self.pre_seq_len or 0
            cache = open_cache(past_key_values, self.num_layers, s, use_cache, self._prefix(b, x) if prefix else None)
            cached = 0 if cache is None else cache.lengths  # per row when the rows are at their own positions
            per_row = not isinstance(cached, int)
            if not per_row and attention_mask is not None and attention_mask.shape[-1] == s and cached > prefix:
                attention_mask = torch.cat([attention_mask.new_ones(b, cached - prefix), attention_mask], dim=1)
            if position_ids is None and attention_mask is not None and not per_row:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            elif position_ids is None:  # each row's text continues after what it has cached
                past = torch.as_tensor(cached, device=x.device).view(-1, 1) - prefix  # [b or 1, 1]
                position_ids = (past + torch.arange(s, device=x.device)).expand(b, -1)
            mask = build_mask(attention_mask, b, s, cached, prefix, x.device)
            self.rotary_pos_emb.table(int(position_ids.max()) + 1, x.device)
        rope = self.rotary_pos_emb(position_ids, x.dtype)  # [b, s, rotary/2, 2]
        hidden, all_hidden = self.encoder(x, rope, mask, cache, output_hidden_states)
        return hidden, cache if cache is None or fixed else cache.advance(s), all_hidden

    def _prefix(self, b, x):
        return lambda: self.prefix_encoder.past_key_values(b, self.num_layers, self.groups, self.kv_channels,
                                                           x.device, x.dtype)  # fmt: skip

    def rope_tables(self, need: int, device) -> list[torch.Tensor]:
        """The rotary table sized for `need` positions (a fixed-shape step reads it without sizing it)."""
        return [self.rotary_pos_emb.table(need, device)]


def build_mask(attention_mask, b, s, cached, prefix, device):
    """Bool [b, 1, s, cached + s] (True = may attend), KeyLengths (a decode step of rows at their own lengths),
    or None when plain causal attention is right.

    cached: positions already in the cache (prefix included), one int, or a tuple with one per row (rows at
    their own positions: row r's query i is at cached[r] + i and sees keys 0 .. cached[r] + i)."""
    if not isinstance(cached, int):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("rows at their own positions take no padding mask")
        if s == 1:  # a decode step: row r sees its first cached[r] + 1 keys
            return KeyLengths(tuple(c + 1 for c in cached))
        starts = torch.tensor(cached, device=device)[:, None] + torch.arange(s, device=device)  # [b, s]
        keys = torch.arange(max(cached) + s, device=device)
        return (keys[None, None, :] <= starts[:, :, None])[:, None]  # [b, 1, s, longest + s]
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (cached == 0 or s == 1):
        return None if cached == 0 or s == 1 else _causal(s, cached, device).expand(b, 1, s, cached + s)
    allowed = _causal(s, cached, device).expand(b, 1, s, cached + s).clone()
    if padded:
        keys = attention_mask.bool()
        if prefix:
            keys = torch.cat([keys.new_ones(b, prefix), keys], dim=1)
        allowed &= keys[:, None, None, :]
        allowed[..., torch.arange(s), cached + torch.arange(s)] = True  # pad rows see themselves: no NaN
    return allowed


def _causal(s, cached, device):
    # query i (absolute cached + i) sees keys 0 .. cached + i
    return torch.ones(s, cached + s, dtype=torch.bool, device=device).tril(diagonal=cached)[None, None]


class ChatGLMForConditionalGeneration(ChatGLMCausalLM):
    """ChatGLM2-6B / ChatGLM3-6B with the original chat API."""

    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config, device=device, dtype=dtype)
        if config.pre_seq_len is not None:
            self.freeze_for_prefix_tuning()
        use_kernels(self, settings.cpu_kernels)

    def output_head(self) -> nn.Module:
        return self.transformer.output_layer

    # --- generation hooks (see generation.py) ---
    def _init_generation(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.long, device=input_ids.device)
        if past_key_values is not None:
            past = cache_length(past_key_values) - (self.config.pre_seq_len or 0)
            if attention_mask.shape[1] == s:
                attention_mask = torch.cat([attention_mask.new_ones(b, past), attention_mask], dim=1)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
        )

    def _next_generation_inputs(self, state, next_tokens, past_key_values):
        mask = state.get("attention_mask")  # None: no mask to grow (the engine's rows)
        return dict(
            input_ids=next_tokens[:, None],
            attention_mask=None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1),
            position_ids=state["position_ids"][:, -1:] + 1,
            past_key_values=past_key_values,
        )

    def _reset_buffers(self):
        self.transformer.rotary_pos_emb.reset_parameters()
