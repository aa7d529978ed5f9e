"""What the two architectures' causal-LM classes share: the head forward, P-Tuning freezing, and the mixins."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .generation import ChatGLMGenerationMixin
from .kv_cache import KVCache
from .loading import ChatGLMLoadingMixin


class ChatGLMCausalLM(ChatGLMGenerationMixin, ChatGLMLoadingMixin, nn.Module):
    """A `transformer` trunk returning (hidden, presents, all_hidden), and an output head."""

    _no_split_modules = ["GLMBlock"]

    def output_head(self) -> nn.Module:
        raise NotImplementedError

    def freeze_for_prefix_tuning(self):
        # P-Tuning v2 trains the prefix encoder only.
        for name, p in self.named_parameters():
            if not name.startswith("transformer.prefix_encoder."):
                p.requires_grad_(False)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=True, return_last_logit=False,
                output_hidden_states=False, return_dict=True, **kwargs):  # fmt: skip
        hidden, presents, all_hidden = self.transformer(
            input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, output_hidden_states, use_cache
        )
        if presents is not None and not isinstance(past_key_values, KVCache):
            presents = presents.to_tuple()  # the API boundary: callers of the original get its tuple back
        if return_last_logit:
            hidden = hidden[:, -1:]
        logits = self.output_head()(hidden)
        loss = None
        if labels is not None:  # next-token loss in fp32, -100 ignored (as the original)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=presents if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )
