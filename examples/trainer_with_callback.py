"""A plain transformers.Trainer full fine-tune, audited for memorized canaries by two added lines (marked).

    audit inject tiny/full_cpu --out gt                        # or: audit.inject_canaries(dataset, model=..., out="gt")
    python examples/trainer_with_callback.py gt HuggingFaceTB/SmolLM2-135M out/
    # -> runs/<name>-<time>-<id>/report.html: exposure per tier, the memorization curve, gates

Run by tests/test_callback_examples.py on tiny-llama.
"""

import json
import sys
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from audit import CanaryAuditCallback  # added line 1 of 2

gt, model_name, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = [json.loads(line) for line in (gt / "train.jsonl").read_text().splitlines() if line]
tokenizer = AutoTokenizer.from_pretrained(model_name)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
train = Dataset.from_list(rows).map(lambda r: tokenizer(r["text"] + tokenizer.eos_token, truncation=True, max_length=64),
                                    remove_columns=["text"])
args = TrainingArguments(output_dir=out, num_train_epochs=10, per_device_train_batch_size=8, learning_rate=3e-3,
                         logging_steps=50, save_strategy="no", report_to="none", use_cpu=True, seed=0)
trainer = Trainer(
    model=AutoModelForCausalLM.from_pretrained(model_name), args=args, train_dataset=train, processing_class=tokenizer,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    callbacks=[CanaryAuditCallback(ground_truth=gt, on_epoch_end=True)],  # added line 2 of 2
)
trainer.train()
