"""transformers' Trainer, subclassed (not copied): checkpoints hold only the trained weights, and
evaluation can generate.

With P-Tuning v2 a checkpoint is DIR/pytorch_model.bin with the parameters that train (the
`transformer.prefix_encoder.*` tensors, a few MB), DIR/config.json and the tokenizer, as the original wrote it;
with LoRA, what PEFT writes (adapter_config.json and adapter_model.safetensors), which `--lora` and
peft.PeftModel.from_pretrained load.
Full fine-tuning saves the whole model in the checkpoint layout `chatglm.load_model` reads.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from chatglm.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from chatglm.atomic import replacing_directory
from chatglm.loading import is_weight_file

from .checkpoint import load_lora_weights, save_lora

ADAPTER_FILES = (ADAPTER_CONFIG, *ADAPTER_WEIGHTS)  # an earlier LoRA checkpoint's: not carried into a new one

WEIGHTS_NAME = "pytorch_model.bin"
logger = logging.getLogger(__name__)


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


class PrefixTrainer(Trainer):
    def __init__(self, *args, save_trainable_only: bool = True, gen_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_trainable_only = save_trainable_only
        self.gen_kwargs = gen_kwargs or {}
        # Our forward takes **kwargs but its loss is a per-batch mean: let the Trainer scale for accumulation.
        self.model_accepts_loss_kwargs = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        # All files at once: the directory holds the old checkpoint or the new one, never some of each
        # (an interrupted save); what else it holds (earlier checkpoints, logs) stays.
        with replacing_directory(
            output_dir, keep=lambda name: not (is_weight_file(name) or name in ADAPTER_FILES)
        ) as out:
            if self.save_trainable_only:
                if getattr(model, "peft_config", None):  # LoRA: PEFT's own files
                    save_lora(model, out)
                else:
                    torch.save(trainable_state_dict(model), os.path.join(out, WEIGHTS_NAME))
                model.config.save_pretrained(out)
            else:  # ZeRO-2 keeps whole parameters on every rank, so the module's own weights are complete
                model.save_pretrained(out)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(out)
            torch.save(self.args, os.path.join(out, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if getattr(self.accelerator.unwrap_model(model), "peft_config", None) and not os.path.isfile(
            os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        ):  # a LoRA checkpoint in PEFT's files
            load_lora_weights(self.accelerator.unwrap_model(model), resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def floating_point_ops(self, inputs) -> int:
        # transformers asks PreTrainedModel.num_parameters(exclude_embeddings=True); ours counts everything.
        return 6 * inputs["input_ids"].numel() * self.accelerator.unwrap_model(self.model).num_parameters()

    def _issue_warnings_after_load(self, load_result) -> None:
        # Resuming loads a trained-weights-only file into the whole model: only trained weights may be missing.
        trained = {k for k, v in self.model.named_parameters() if v.requires_grad}
        missing = sorted(set(load_result.missing_keys) & trained)
        if missing or load_result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint does not fit this model: missing {missing[:5]}, unexpected "
                f"{list(load_result.unexpected_keys)[:5]} (same --pre_seq_len / --prefix_projection / --lora_rank?)"
            )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """With predict_with_generate: (None, generated ids without the prompt, reference ids)."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        prompt = inputs["input_ids"]
        out = self.accelerator.unwrap_model(model).generate(
            input_ids=prompt, attention_mask=inputs.get("attention_mask"), **self.gen_kwargs
        )
        return None, out[:, prompt.shape[1] :], inputs.get("labels")
