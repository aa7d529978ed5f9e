"""Tiny random models: a slow float64 reference, the KV cache, batching, save/load, dtypes."""

import math

import pytest
import torch

import chatglm
from chatglm.loading import load_model


def reference_glm2(sd, cfg, ids):
    """ChatGLM2/3 forward written from the spec, one op at a time, seq-first, float64."""
    w = {k: v.double() for k, v in sd.items()}
    s = len(ids)
    heads, d, groups = cfg.num_attention_heads, cfg.kv_channels, cfg.multi_query_group_num
    x = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]  # [s, h]

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.layernorm_epsilon)

    rot = d // 2  # rotary dims per head
    theta = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angles = torch.outer(torch.arange(s, dtype=torch.float64), theta)  # [s, rot/2]

    def rope(t):  # t: [s, n, d]; pairs (2i, 2i+1) of the first rot dims
        out = t.clone()
        for i in range(rot // 2):
            a, b = t[..., 2 * i], t[..., 2 * i + 1]
            c, sn = angles[:, i, None], angles[:, i, None].sin()
            c = c.cos()
            out[..., 2 * i] = a * c - b * sn
            out[..., 2 * i + 1] = b * c + a * sn
        return out

    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        ln = rms(x, w[p + "input_layernorm.weight"])
        qkv = ln @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q = qkv[:, : heads * d].view(s, heads, d)
        k = qkv[:, heads * d : heads * d + groups * d].view(s, groups, d)
        v = qkv[:, heads * d + groups * d :].view(s, groups, d)
        q, k = rope(q), rope(k)
        ctx = torch.zeros(s, heads, d, dtype=torch.float64)
        for h in range(heads):
            g = h // (heads // groups)
            scores = (q[:, h] @ k[:, g].T) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
            ctx[:, h] = scores.softmax(-1) @ v[:, g]
        x = x + ctx.reshape(s, heads * d) @ w[p + "self_attention.dense.weight"].T
        ln = rms(x, w[p + "post_attention_layernorm.weight"])
        up = ln @ w[p + "mlp.dense_h_to_4h.weight"].T
        a, b = up.chunk(2, dim=-1)
        x = x + (a * torch.sigmoid(a) * b) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rms(x, w["transformer.encoder.final_layernorm.weight"])
    return x @ w["transformer.output_layer.weight"].T


def reference_glm(sd, cfg, ids):
    """ChatGLM-6B forward written from the spec (2D positions, GLM mask, alpha residual), float64."""
    w = {k: v.double() for k, v in sd.items()}
    s, heads = len(ids), cfg.num_attention_heads
    d = cfg.hidden_size // heads
    ctx_len = ids.index(cfg.bos_token_id)
    mask_pos = ids.index(cfg.gmask_token_id)
    pos = [i if i < ctx_len else mask_pos for i in range(s)]
    block = [0 if i < ctx_len else i - ctx_len + 1 for i in range(s)]
    half = d // 2
    inv = (1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half))).half().double()
    alpha = math.sqrt(2 * 28)  # the original's GLMBlock default num_layers, whatever the config

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layernorm_epsilon) * w[p + ".weight"] + w[p + ".bias"]

    def rotary(t, positions):  # t: [s, heads, half]
        f = torch.outer(torch.tensor(positions, dtype=torch.float64), inv)
        emb = torch.cat([f, f], -1)[:, None, :]
        rot = torch.cat([-t[..., half // 2 :], t[..., : half // 2]], -1)
        return t * emb.cos() + rot * emb.sin()

    allowed = torch.tensor([[j < ctx_len or j <= i for j in range(s)] for i in range(s)])
    x = w["transformer.word_embeddings.weight"][torch.tensor(ids)]
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        a_in = ln(x, p + "input_layernorm")
        qkv = (a_in @ w[p + "attention.query_key_value.weight"].T + w[p + "attention.query_key_value.bias"]).view(
            s, heads, 3 * d
        )
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        q = torch.cat([rotary(q[..., :half], pos), rotary(q[..., half:], block)], -1)
        k = torch.cat([rotary(k[..., :half], pos), rotary(k[..., half:], block)], -1)
        out = torch.zeros(s, heads, d, dtype=torch.float64)
        for h in range(heads):
            scores = (q[:, h] @ k[:, h].T) / math.sqrt(d)
            out[:, h] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, h]
        attn = out.reshape(s, heads * d) @ w[p + "attention.dense.weight"].T + w[p + "attention.dense.bias"]
        x = a_in * alpha + attn
        m_in = ln(x, p + "post_attention_layernorm")
        hmid = m_in @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"]
        gelu = 0.5 * hmid * (1 + torch.tanh(0.7978845608028654 * hmid * (1 + 0.044715 * hmid * hmid)))
        x = m_in * alpha + gelu @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
    x = ln(x, "transformer.final_layernorm")
    return x @ w["transformer.word_embeddings.weight"].T


def _prompt(model, tok, text="你好，世界 hello"):
    return tok([text], return_tensors="pt")["input_ids"][0].tolist()


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_float64_reference_agrees(tiny, version):
    model, tok = tiny[version]
    ids = _prompt(model, tok)
    ref = (reference_glm if version == "v1" else reference_glm2)(model.state_dict(), model.config, ids)
    model64 = load_model(model.name_or_path, dtype=torch.float64)
    with torch.no_grad():
        got = model64(torch.tensor([ids])).logits[0]
        got32 = model(torch.tensor([ids])).logits[0].double()
    assert (got - ref).abs().max().item() < 1e-6  # rotary angles are computed in fp32
    assert (got32 - ref).abs().max().item() < 1e-3 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_cached_equals_uncached(tiny, version):
    model, tok = tiny[version]
    ids = torch.tensor([_prompt(model, tok)])
    full = model.generate(ids, do_sample=False, max_new_tokens=6)
    with torch.no_grad():
        uncached = model(full).logits[0]
    # the same sequence fed through the cache one token at a time
    state = model._init_generation(ids)
    n = ids.shape[1]
    with torch.no_grad():
        for step in range(6):
            out = model(**{k: state[k] for k in ("input_ids", "attention_mask", "position_ids", "past_key_values")})
            assert torch.allclose(out.logits[0, -1], uncached[n - 1 + step], atol=1e-4), step
            state = model._next_generation_inputs(state, full[:, n + step], out.past_key_values)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_batched_generate_equals_single(tiny, version):
    model, tok = tiny[version]
    texts = ["你好", "Hello world, how are you today?", "写一首诗"]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id  # left padding
    out = model.generate(**batch, do_sample=False, max_new_tokens=8)
    for row, text in enumerate(texts):
        single = tok([text], return_tensors="pt")
        alone = model.generate(**single, do_sample=False, max_new_tokens=8)
        n = single["input_ids"].shape[1]
        expected = alone[0, n:].tolist()
        got = out[row, batch["input_ids"].shape[1] :].tolist()[: len(expected)]
        assert got == expected, (row, text)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_save_pretrained_round_trip(tiny, tmp_path, version):
    model, tok = tiny[version]
    model.save_pretrained(tmp_path / "m", max_shard_size=200_000)
    tok.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    again = chatglm.load_model(str(tmp_path / "m"), dtype=torch.float32)
    tok2 = chatglm.load_tokenizer(str(tmp_path / "m"))
    assert again.config.chatglm_version == version and tok2.chatglm_version == version
    ids = torch.tensor([_prompt(model, tok)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2.encode("你好 world") == tok.encode("你好 world")


def test_tied_lm_head_v1(tiny):
    model, _ = tiny["v1"]
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(tiny, dtype):
    model, tok = tiny["v2"]
    low = load_model(model.name_or_path, dtype=dtype)
    assert low.dtype == dtype
    ids = torch.tensor([_prompt(model, tok)])
    with torch.no_grad():
        a = model(ids).logits.float()
        b = low(ids).logits.float()
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_loss_for_training(tiny):
    model, tok = tiny["v2"]
    ids = torch.tensor([_prompt(model, tok)])
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(ids, labels=labels)
    logits = out.logits[0, :-1].float()
    expected = torch.nn.functional.cross_entropy(logits[1:], ids[0, 2:])
    assert torch.allclose(out.loss, expected, atol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_encoder_cache_and_batch(tiny_dirs, version, projection):
    path = str(tiny_dirs[version])
    model = load_model(path, dtype=torch.float32, pre_seq_len=4, prefix_projection=projection)
    tok = chatglm.load_tokenizer(path)
    prefix = model.transformer.prefix_encoder
    assert prefix.embedding.weight.requires_grad and hasattr(prefix, "trans") == projection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    plain = load_model(path, dtype=torch.float32)
    ids = torch.tensor([_prompt(model, tok)])
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max() > 1e-3  # the prefix is attended to
    full = model.generate(ids, do_sample=False, max_new_tokens=4)
    with torch.no_grad():
        uncached = model(full).logits[0, ids.shape[1] - 1 : -1]
        state = model._init_generation(ids)
        out = model(**{k: state[k] for k in ("input_ids", "attention_mask", "position_ids", "past_key_values")})
        assert out.past_key_values[0][0].shape[2] == 4 + ids.shape[1]  # prefix first in the cache
        assert torch.allclose(out.logits[0, -1], uncached[0], atol=1e-4)
    texts = ["你好", "Hello world, how are you today?"]
    batch = model.generate(**tok(texts, padding=True, return_tensors="pt"), do_sample=False, max_new_tokens=4)
    for row, text in enumerate(texts):
        alone = model.generate(**tok([text], return_tensors="pt"), do_sample=False, max_new_tokens=4)
        assert batch[row, -4:].tolist() == alone[0, -4:].tolist()


def test_auto_model_honours_torch_dtype(tiny_dirs):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_dirs["v3"]), torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert AutoModel.from_pretrained(str(tiny_dirs["v3"])).dtype == torch.float32  # the checkpoint's own dtype
