"""P-Tuning v2 (or full fine-tuning, or LoRA) of ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B, and evaluation.

Behaves like THUDM/ChatGLM-6B ptuning/main.py: the same arguments (see arguments.py and transformers'
Seq2SeqTrainingArguments), JSON-lines data, prompt formats, checkpoints and metrics. Run it through
train.sh / evaluate.sh / train_chat.sh, or directly:

    python main.py --do_train --train_file data/tiny_train.json --prompt_column content --response_column summary \
        --model_name_or_path DIR --output_dir output/x --pre_seq_len 128 --learning_rate 2e-2 --max_steps 3000
    python main.py args.json          # every argument from one JSON file

A run restarted with the same output_dir resumes from its last checkpoint (unless --overwrite_output_dir).
"""

from __future__ import annotations

import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python main.py` from ptuning/: the package lives one level up
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, set_seed  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from ptuning.arguments import DataTrainingArguments, ModelArguments  # noqa: E402
from ptuning.checkpoint import load_model_and_tokenizer  # noqa: E402
from ptuning.metrics import compute_metrics  # noqa: E402
from ptuning.preprocess import Collator, DataError, eval_features, read_rows, train_features  # noqa: E402
from ptuning.trainer import PrefixTrainer  # noqa: E402

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def read_splits(data_args, training_args) -> dict[str, list[dict]]:
    """Every requested file, read and checked before the model loads (bad data fails in seconds)."""
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_predict_samples}  # fmt: skip
    splits = {}
    flags = {"train": "do_train", "validation": "do_eval", "test": "do_predict"}
    for split, on in wanted.items():
        if not on:
            if files[split] and not os.path.isfile(files[split]):  # given, not read: a typo would go unnoticed
                logger.warning("--%s_file %r does not exist (not read: no --%s)", split, files[split], flags[split])
            continue
        if not files[split]:
            raise DataError(f"--{flags[split]} requires --{split}_file")
        rows = read_rows(files[split], data_args.prompt_column, data_args.response_column, data_args.history_column)
        kept = [r for r in rows if r["query"] and r["response"]]  # the original skips empty rows
        if len(kept) < len(rows):
            logger.warning("%s: skipped %d rows with an empty prompt or response", files[split], len(rows) - len(kept))
        splits[split] = kept[: limits[split]] if limits[split] is not None else kept
    return splits


def show_example(tok, feature: dict) -> None:
    print("input_ids", feature["input_ids"])
    print("inputs", tok.decode(feature["input_ids"]))
    labels = [t for t in feature["labels"] if t != -100]
    print("label_ids", feature["labels"])
    print("labels", tok.decode(labels))


def main(argv=None):
    """Run what the arguments ask; returns (metrics, trainer) so callers can reach the trained model."""
    model_args, data_args, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])  # fmt: skip
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    splits = read_splits(data_args, args)
    if not splits:
        logger.info("There is nothing to do. Please pass --do_train, --do_eval and/or --do_predict.")
        return {}, None

    set_seed(args.seed)
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # nothing to pin to (and it warns every epoch)
    args.remove_unused_columns = False  # our collator reads the "generate" mark and builds the batch itself
    tuning = bool(model_args.pre_seq_len or model_args.ptuning_checkpoint or model_args.lora_rank
                  or model_args.lora_checkpoint)  # fmt: skip
    try:
        model, tok = load_model_and_tokenizer(
            model_args.model_name_or_path, model_args.ptuning_checkpoint, model_args.pre_seq_len,
            model_args.prefix_projection, model_args.quantization_bit, model_args.lora_rank, model_args.lora_alpha,
            model_args.lora_dropout, model_args.lora_checkpoint, model_args.model_dtype, training=args.do_train,
        )  # fmt: skip
    except (OSError, ValueError) as e:  # a wrong path, a missing file, a checkpoint that does not fit: one line
        raise DataError(str(e)) from None
    version = tok.chatglm_version
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("ChatGLM %s, %d trainable parameters of %d", version, trainable, model.num_parameters())

    src, prefix = data_args.max_source_length, data_args.source_prefix or ""
    train = [train_features(tok, version, r, src, data_args.max_target_length, prefix) for r in splits.get("train", [])]
    # Generation batches carry the prompt alone; without predict_with_generate evaluation is the training loss.
    make = eval_features if args.predict_with_generate else train_features
    tgt = data_args.val_max_target_length
    evals = {
        k: [make(tok, version, r, src, tgt, prefix) for r in splits[k]] for k in ("validation", "test") if k in splits
    }
    for features in [train, *evals.values()]:
        if features:
            show_example(tok, features[0])

    from chatglm.generation import InvalidScoreLogitsProcessor, SuppressUndecodableLogitsProcessor

    gen_kwargs = dict(
        do_sample=True, top_p=0.7, temperature=0.95, max_length=src + data_args.max_target_length + 1,
        logits_processor=[InvalidScoreLogitsProcessor(), SuppressUndecodableLogitsProcessor(len(tok))],
    )  # fmt: skip

    def decode(ids) -> list[str]:
        return [tok.decode([t for t in row if t >= 0], skip_special_tokens=True).strip() for row in ids]

    def metrics(eval_preds):
        return compute_metrics(decode(eval_preds.predictions), decode(eval_preds.label_ids))

    trainer = PrefixTrainer(
        model=model,
        args=args,
        train_dataset=train or None,
        eval_dataset=evals.get("validation"),
        processing_class=tok,
        data_collator=Collator(tok.pad_token_id, src + data_args.max_target_length),
        compute_metrics=metrics if args.predict_with_generate else None,
        save_trainable_only=tuning,
        gen_kwargs=gen_kwargs,
    )

    results = {}
    if args.do_train:
        checkpoint = args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(args.output_dir) and not data_args.overwrite_output_dir:
            checkpoint = get_last_checkpoint(args.output_dir)
            if checkpoint:
                logger.info("Resuming from %s (pass --overwrite_output_dir to start over)", checkpoint)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        result.metrics["train_samples"] = len(train)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        results.update(result.metrics)

    if args.do_eval:
        logger.info("*** Evaluate ***")
        m = trainer.evaluate(metric_key_prefix="eval")
        m["eval_samples"] = len(evals["validation"])
        trainer.log_metrics("eval", m)
        trainer.save_metrics("eval", m)
        results.update(m)

    if args.do_predict:
        logger.info("*** Predict ***")
        out = trainer.predict(evals["test"], metric_key_prefix="predict")
        m = out.metrics
        m["predict_samples"] = len(evals["test"])
        trainer.log_metrics("predict", m)
        trainer.save_metrics("predict", m)
        results.update(m)
        if trainer.is_world_process_zero() and args.predict_with_generate:
            path = os.path.join(args.output_dir, "generated_predictions.txt")
            with open(path, "w", encoding="utf-8") as f:
                for p, label in zip(decode(out.predictions), decode(out.label_ids)):
                    f.write(json.dumps({"labels": label, "predict": p}, ensure_ascii=False) + "\n")
            logger.info("wrote %s", path)
    return results, trainer


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
