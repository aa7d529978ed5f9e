"""Full-size models built from the real config.json files have exactly the real checkpoints' weight names."""

import json

import pytest
import torch

from chatglm import ChatGLMConfig
from chatglm.loading import model_class

from .conftest import real_model_dir


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_state_dict_keys_and_shapes_equal_real_index(version):
    path = real_model_dir(version)
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())["weight_map"]
    config = ChatGLMConfig.from_checkpoint(str(path))
    assert config.chatglm_version == version
    with torch.device("meta"):
        model = model_class(config)(config, dtype=torch.float16)
    state = model.state_dict()
    assert set(state) == set(index)
    h = config.hidden_size
    if version == "v1":
        assert state["transformer.word_embeddings.weight"].shape == (130528, h)
        assert state["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * h, h)
        assert state["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape == (16384, h)
        assert state["transformer.layers.0.attention.rotary_emb.inv_freq"].shape == (32,)
        assert state["lm_head.weight"].shape == (130528, h)
    else:
        assert state["transformer.embedding.word_embeddings.weight"].shape == (65024, h)
        assert state["transformer.encoder.layers.0.self_attention.query_key_value.weight"].shape == (4608, h)
        assert state["transformer.encoder.layers.0.self_attention.query_key_value.bias"].shape == (4608,)
        assert state["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape == (27392, h)
        assert state["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"].shape == (h, 13696)
        assert state["transformer.output_layer.weight"].shape == (65024, h)
        assert state["transformer.rotary_pos_emb.inv_freq"].shape == (32,)
    n = sum(p.numel() for p in model.parameters())
    assert 6.0e9 < n < 6.6e9, n  # a "6B" model
