"""A plain ``transformers.Trainer`` full fine-tune that knows nothing of canary-audit: the "your own training" of the
``audit inject`` -> your Trainer -> ``audit measure`` path (docs/own-training.md).

    python tests/external_trainer.py GROUND_TRUTH_DIR BASE_MODEL_DIR OUT_DIR [--epochs 10] [--lr 3e-3]

It reads the injected set ``audit inject`` saved as a ``datasets`` directory (``train_dataset/``), trains every weight
with the causal-LM loss on every token, and saves model and tokenizer to OUT_DIR (safetensors). It imports no
``audit`` module (it exits 1 if one got imported), so the test that runs it shows a foreign script is enough.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ground_truth")
    parser.add_argument("base")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    dataset = load_from_disk(str(Path(args.ground_truth) / "train_dataset"))
    tokenized = dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
                            batched=True, remove_columns=dataset.column_names)
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=work, num_train_epochs=args.epochs, learning_rate=args.lr,
                                   per_device_train_batch_size=8, save_strategy="no", report_to="none", logging_steps=50,
                                   seed=0, use_cpu=True, disable_tqdm=True),
            train_dataset=tokenized,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model(args.out)  # model.safetensors + config.json + the tokenizer
    if any(name == "audit" or name.startswith("audit.") for name in sys.modules):
        print("the external trainer imported canary-audit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
