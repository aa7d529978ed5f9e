"""Command-line arguments of main.py, with the original ptuning/arguments.py names and defaults.

The training arguments are transformers' Seq2SeqTrainingArguments (output_dir, do_train, learning_rate, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "local checkpoint directory (v1, v2 or v3)"})
    ptuning_checkpoint: str | None = field(
        default=None, metadata={"help": "a P-Tuning checkpoint directory (pytorch_model.bin of prefix weights)"}
    )
    pre_seq_len: int | None = field(default=None, metadata={"help": "prefix length: set it for P-Tuning v2"})
    prefix_projection: bool = field(default=False, metadata={"help": "two-layer MLP over the prefix rows"})
    quantization_bit: int | None = field(default=None, metadata={"help": "4 or 8: quantize the frozen base model"})
    lora_rank: int | None = field(default=None, metadata={"help": "LoRA rank (PEFT) instead of P-Tuning"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input"})
    lora_checkpoint: str | None = field(default=None, metadata={"help": "a LoRA checkpoint directory to load"})
    model_dtype: str = field(
        default="auto",
        metadata={"help": "auto: fp16 base + fp32 prefix on CUDA for P-Tuning/LoRA (as the original), else fp32"},
    )


@dataclass
class DataTrainingArguments:
    train_file: str | None = field(default=None, metadata={"help": "JSON lines training data"})
    validation_file: str | None = field(default=None, metadata={"help": "JSON lines data for --do_eval"})
    test_file: str | None = field(default=None, metadata={"help": "JSON lines data for --do_predict"})
    prompt_column: str | None = field(default=None, metadata={"help": "the input column (content / prompt)"})
    response_column: str | None = field(default=None, metadata={"help": "the target column (summary / response)"})
    history_column: str | None = field(default=None, metadata={"help": "[[query, response], ...] column"})
    max_source_length: int = field(default=1024, metadata={"help": "prompt tokens, special tokens included"})
    max_target_length: int = field(default=128, metadata={"help": "target tokens when training"})
    val_max_target_length: int | None = field(default=None, metadata={"help": "target tokens in eval / predict"})
    max_train_samples: int | None = field(default=None, metadata={"help": "keep the first N training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep the first N validation rows"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "keep the first N test rows"})
    source_prefix: str | None = field(default="", metadata={"help": "text put before every prompt"})
    ignore_pad_token_for_loss: bool = field(default=True, metadata={"help": "padding is -100 in the labels"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start over instead of resuming from the last checkpoint in output_dir"}
    )
    # Accepted so the original command lines run unchanged; nothing is cached and rows are few enough.
    overwrite_cache: bool = field(default=False, metadata={"help": "accepted for compatibility; no effect"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "accepted; no effect"})

    def __post_init__(self):
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length
