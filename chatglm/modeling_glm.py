"""GLM: the architecture of ChatGLM-6B (v1).

Post-LN-style residual (the residual is the layer-norm output scaled by alpha = sqrt(2 * layers)), LayerNorm,
GeLU MLP, 2D rotary positions (position and block position, each on half of the head), a bidirectional
context before `<sop>` and causal generation after it, lm_head tied to the word embeddings. Module and
parameter names are the original ones. Tensors are batch-first here ([b, s, ...]); the original is seq-first.

KV cache: a `KVCache` (chatglm/kv_cache.py) that each attention layer writes into; the original's tuple of per-layer
(k, v), each [b, heads, s, head_dim] (P-Tuning prefix first), is what `forward` takes and returns at the API.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.settings import settings

from .base import ChatGLMCausalLM
from .config import ChatGLMConfig
from .kv_cache import KVCache, open_cache
from .layers import Attention, KeyLengths, LayerNorm, Linear, compute_dtype, use_kernels
from .prefix_encoder import PrefixEncoder

MAX_LINES = 600  # keep this file small enough to read in one sitting


class RotaryEmbedding(nn.Module):
    """NeoX-style rotary table. The original stores inv_freq rounded to fp16; we keep that rounding."""

    def __init__(self, dim, base=10000.0, device=None, dtype=None):
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self._inv_freq(device).to(dtype))
        self._cache = None

    def _inv_freq(self, device=None):
        inv = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float) / self.dim))
        return inv.half().float()

    def reset_parameters(self):
        self.inv_freq.copy_(self._inv_freq(self.inv_freq.device).to(self.inv_freq.dtype))

    def table(self, need: int, device) -> torch.Tensor:
        """[2, n >= need, dim] fp32 cos and sin of positions 0 .. n-1, cached and grown by doubling."""
        cache = self._cache
        if cache is None or cache.shape[1] < need or cache.device != torch.device(device):
            n = max(need, 2048 if cache is None else 2 * cache.shape[1])
            t = torch.arange(n, device=device, dtype=torch.float)
            freqs = torch.outer(t, self._inv_freq(device))
            emb = torch.cat([freqs, freqs], dim=-1)
            cache = self._cache = torch.stack([emb.cos(), emb.sin()])  # [2, n, dim]
        return cache

    def forward(self, position_ids, dtype, static=False):
        # -> cos, sin: [b, 1, s, dim], angles computed in fp32. static: the caller has sized the table with
        # `table` (no position is read back to the host, which on a GPU waits for all queued work).
        cache = self._cache
        if not static or cache is None:
            cache = self.table(int(position_ids.max()) + 1, position_ids.device)
        cos, sin = cache[0][position_ids], cache[1][position_ids]
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        self.layer_id = layer_id
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2, device=device, dtype=dtype)
        h = config.hidden_size
        self.query_key_value = Linear(h, 3 * h, device=device, dtype=dtype)
        self.dense = Linear(h, h, device=device, dtype=dtype)
        self.core_attention = Attention()  # no parameters: a swappable kernel (layers.py)

    def forward(self, x, position_ids, mask, kv_cache):
        b, s, h = x.shape
        # Per head the projection holds [q | k | v] (interleaved per head, not three blocks).
        qkv = self.query_key_value(x).view(b, s, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # [b, heads, s, d]
        # 2D rotary: first half of each head by position, second half by block position.
        # The model (or the fixed-shape decode step) has sized the table: no position is read back here.
        cos1, sin1 = self.rotary_emb(position_ids[:, 0], x.dtype, static=True)
        cos2, sin2 = self.rotary_emb(position_ids[:, 1], x.dtype, static=True)
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        q = torch.cat([apply_rotary(q1, cos1, sin1), apply_rotary(q2, cos2, sin2)], dim=-1)
        k = torch.cat([apply_rotary(k1, cos1, sin1), apply_rotary(k2, cos2, sin2)], dim=-1)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_id, k, v)  # [b, heads, cached + s (or the fixed span), d]
        # The original divides q by sqrt(d) * (layer_id + 1) and multiplies the fp32 scores back by
        # (layer_id + 1): an fp16 overflow guard that cancels out, so plain SDPA scaling is the same.
        out = self.core_attention(q, k, v, mask)  # [b, heads, s, d]
        out = out.transpose(1, 2).reshape(b, s, h)
        return self.dense(out)


class GLU(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = Linear(config.hidden_size, inner, device=device, dtype=dtype)
        self.dense_4h_to_h = Linear(inner, config.hidden_size, device=device, dtype=dtype)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        # The original builds every GLMBlock with its default num_layers=28, whatever the config says,
        # so alpha is sqrt(56) for every model size (checked against THUDM's code on a 2-layer model).
        self.alpha = (2 * 28) ** 0.5
        self.input_layernorm = LayerNorm(h, eps=eps, device=device, dtype=dtype)
        self.attention = SelfAttention(config, layer_id, device=device, dtype=dtype)
        self.post_attention_layernorm = LayerNorm(h, eps=eps, device=device, dtype=dtype)
        self.mlp = GLU(config, device=device, dtype=dtype)

    def forward(self, x, position_ids, mask, kv_cache):
        ln = self.input_layernorm(x)
        attn = self.attention(ln, position_ids, mask, kv_cache)
        x = ln * self.alpha + attn  # residual from the normed input, scaled
        ln = self.post_attention_layernorm(x)
        return ln * self.alpha + self.mlp(ln)


class ChatGLMModel(nn.Module):
    """The GLM trunk, named `transformer` in the checkpoints."""

    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.num_layers, self.heads = config.num_layers, config.num_attention_heads
        self.head_dim = h // self.heads
        self.word_embeddings = nn.Embedding(config.vocab_size, h, device=device, dtype=dtype)
        self.layers = nn.ModuleList(GLMBlock(config, i, device=device, dtype=dtype) for i in range(config.num_layers))
        self.final_layernorm = LayerNorm(h, eps=config.layernorm_epsilon, device=device, dtype=dtype)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config, config.num_layers * h * 2, h, device=device, dtype=dtype)

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

        input_ids [b, s]: the new tokens. position_ids [b, 2, s]: positions and block positions (default: those of
        a prompt, from its <sop> and mask token). attention_mask: [b, cached + s] keep-mask (0 = left padding),
        or the original's [b, 1, s, cached + s] (True = masked), or None. past_key_values: a KVCache, written in
        place with each row at its own length (or, in fixed-step mode, at tensor positions under the cache's
        own mask: no Python value read from the data); the original's tuple (copied); or None.
        Returns (hidden [b, s, hidden], the cache after these tokens, per-layer hidden states when asked)."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = x.to(compute_dtype(x, bool(self.config.quantization_bit)))  # [b, s, hidden]
        b, s = x.shape[:2]
        fixed = isinstance(past_key_values, KVCache) and past_key_values.pos is not None
        if fixed:  # the fixed-shape decode step (chatglm/static_decode.py sized the rotary tables)
            cache, mask = past_key_values, past_key_values.step_mask()
        else:
            prefix = self.pre_seq_len or 0
            cache = open_cache(past_key_values, self.num_layers, s, use_cache, self._prefix(b, x) if prefix else None)
            cached = 0 if cache is None else cache.lengths  # per row when the rows are at their own positions
            if position_ids is None:
                position_ids = glm_position_ids(input_ids, self.config, attention_mask)
            mask = glm_mask(input_ids, self.config, attention_mask, cached, x.device)
            # Every layer's rotary table covers these positions before the layers run: one read of the largest
            # position per forward, not one per layer (on a GPU each read waits for all queued work).
            self.rope_tables(int(position_ids.max()) + 1)
        hidden = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x = layer(x, position_ids, mask, cache)
        x = self.final_layernorm(x)
        if output_hidden_states:
            hidden.append(x)
        return x, cache if cache is None or fixed else cache.advance(s), hidden

    def _prefix(self, b, x):
        return lambda: self.prefix_encoder.past_key_values(b, self.num_layers, self.heads, self.head_dim, x.device,
                                                           x.dtype)  # fmt: skip

    def rope_tables(self, need: int, device=None) -> list[torch.Tensor]:
        """Every layer's rotary table sized for `need` positions, on `device` or where that layer lives."""
        return [layer.attention.rotary_emb.table(need, device or layer.attention.rotary_emb.inv_freq.device)
                for layer in self.layers]  # fmt: skip


def _left_pads(attention_mask, b, s):
    """Number of left padding tokens per row, from a 2D keep-mask (1 = token) or a 3D/4D GLM mask."""
    if attention_mask is None:
        return [0] * b
    if attention_mask.dim() == 2:
        return (attention_mask[:, -s:] == 0).sum(-1).tolist()
    last_row = attention_mask.reshape(b, -1, attention_mask.shape[-2], attention_mask.shape[-1])[:, 0, -1]
    return last_row.sum(-1).tolist()  # True = masked: the last query sees every real key


def glm_position_ids(input_ids, config, attention_mask=None):
    """[b, 2, s]: positions (frozen at the mask token after <sop>) and block positions (1, 2, .. after <sop>)."""
    b, s = input_ids.shape
    pads = _left_pads(attention_mask, b, s)
    out = torch.zeros(b, 2, s, dtype=torch.long, device=input_ids.device)
    for row, (seq, pad) in enumerate(zip(input_ids.tolist(), pads)):
        seq = seq[pad:]
        n = len(seq)
        ctx = seq.index(config.bos_token_id) if config.bos_token_id in seq else n
        mask_token = config.gmask_token_id if config.gmask_token_id in seq else config.mask_token_id
        pos = list(range(n))
        if mask_token in seq:
            pos[ctx:] = [seq.index(mask_token)] * (n - ctx)
        block = [0] * ctx + list(range(1, n - ctx + 1))
        out[row, 0, pad:] = torch.tensor(pos, dtype=torch.long)
        out[row, 1, pad:] = torch.tensor(block, dtype=torch.long)
    return out


def glm_mask(input_ids, config, attention_mask, cached, device):
    """Bool [b, 1, s, cached + s], True = may attend; KeyLengths for a decode step of rows at their own lengths;
    None when every key is visible to every query.

    cached: positions already in the cache (prefix included), one int, or a tuple with one per row (rows at
    their own positions: row r's keys past cached[r] + s are not its own and stay hidden)."""
    b, s = input_ids.shape
    per_row = not isinstance(cached, int)
    end = (max(cached) if per_row else cached) + s
    if attention_mask is not None and attention_mask.dim() >= 3:  # the original's mask, True = masked
        if per_row:
            raise ValueError("rows at their own positions take no 4D attention mask")
        allowed = ~attention_mask.reshape(b, 1, attention_mask.shape[-2], attention_mask.shape[-1]).bool()
        allowed = allowed[:, :, -s:]
        if allowed.shape[-1] < cached + s:  # prefix columns are always visible
            allowed = torch.cat([allowed.new_ones(b, 1, s, cached + s - allowed.shape[-1]), allowed], dim=-1)
        starts = torch.full((b,), cached, device=device)
    else:
        keep = None
        if attention_mask is not None and not (per_row and bool(attention_mask.all())):
            if per_row:
                raise ValueError("rows at their own positions take no padding mask")
            keep = attention_mask.bool()
            if keep.shape[-1] < cached + s:
                keep = torch.cat([keep.new_ones(b, cached + s - keep.shape[-1]), keep], dim=-1)
        if s == 1 and not per_row:
            return None if keep is None or bool(keep.all()) else keep[:, None, None, :]
        if s == 1:  # a decode step of rows at their own lengths: row r sees its first cached[r] + 1 keys
            return KeyLengths(tuple(c + 1 for c in cached))
        # Bidirectional over the context (everything before <sop>), causal after it.
        starts = torch.tensor(cached, device=device) if per_row else torch.full((b,), cached, device=device)
        pads = _left_pads(attention_mask, b, s)
        ctx = []
        for seq, pad in zip(input_ids.tolist(), pads):
            ctx.append(seq.index(config.bos_token_id) if config.bos_token_id in seq[pad:] else s)
        ctx = (torch.tensor(ctx, device=device) + starts)[:, None, None, None]
        j = torch.arange(end, device=device)
        i = (starts[:, None] + torch.arange(s, device=device))[:, None, :, None]  # [b, 1, s, 1] absolute
        allowed = (j < ctx) | (j <= i)  # [b, 1, s, end]: nothing past a row's own last key
        if keep is not None:
            allowed = allowed & keep[:, None, None, :]
    rows = torch.arange(b, device=device)[:, None]
    diag = torch.arange(s, device=device)
    allowed[rows, 0, diag, starts[:, None] + diag] = True  # a padded query sees itself: no all-masked row (NaN)
    return allowed


class ChatGLMForConditionalGeneration(ChatGLMCausalLM):
    """ChatGLM-6B with the original chat API."""

    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config, device=device, dtype=dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.tie_weights()
        if config.pre_seq_len is not None:
            self.freeze_for_prefix_tuning()
        use_kernels(self, settings.cpu_kernels)

    def tie_weights(self):
        # Tied while both are float; an INT8/INT4 model with quantized embeddings keeps two tensors.
        if isinstance(self.lm_head, nn.Linear) and isinstance(self.transformer.word_embeddings, nn.Embedding):
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def output_head(self) -> nn.Module:
        return self.lm_head

    # --- generation hooks (see generation.py) ---
    def _init_generation(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        b, s = input_ids.shape
        pads = _left_pads(attention_mask, b, s)
        keep = torch.ones(b, s, dtype=torch.long, device=input_ids.device)
        for row, pad in enumerate(pads):
            keep[row, :pad] = 0
        if position_ids is None:
            position_ids = glm_position_ids(input_ids, self.config, keep)
        if attention_mask is None or attention_mask.dim() == 2:
            attention_mask = keep
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            keep=keep,
        )

    def _next_generation_inputs(self, state, next_tokens, past_key_values):
        keep = state.get("keep")  # None: no mask to grow (the engine's rows)
        if keep is not None:
            keep = torch.cat([keep, keep.new_ones(keep.shape[0], 1)], dim=1)
        pos = state["position_ids"][..., -1:].clone()
        pos[:, 1] += 1  # the position stays at the mask token, the block position advances
        return dict(
            input_ids=next_tokens[:, None],
            attention_mask=keep,
            position_ids=pos,
            past_key_values=past_key_values,
            keep=keep,
        )

    def _reset_buffers(self):
        for layer in self.transformer.layers:
            layer.attention.rotary_emb.reset_parameters()
        self.tie_weights()
