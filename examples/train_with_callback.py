"""A plain TRL SFTTrainer LoRA fine-tune, audited for memorized canaries by two added lines (marked).

    audit inject tiny/lora_cpu --out gt                        # or: audit.inject_canaries(dataset, model=..., out="gt")
    python examples/train_with_callback.py gt HuggingFaceTB/SmolLM2-135M out/
    # -> runs/<name>-<time>-<id>/report.html: exposure per tier, the memorization curve, gates

Run by tests/test_callback_examples.py on tiny-llama (~1 min on 2 CPU cores).
"""

import json
import sys
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from audit import CanaryAuditCallback  # added line 1 of 2

gt, model_name, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = [json.loads(line) for line in (gt / "train.jsonl").read_text().splitlines() if line]
tokenizer = AutoTokenizer.from_pretrained(model_name)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(model_name)
args = SFTConfig(output_dir=out, num_train_epochs=10, per_device_train_batch_size=8, learning_rate=2e-2,
                 max_length=64, logging_steps=50, save_strategy="no", report_to="none", use_cpu=True, seed=0)
trainer = SFTTrainer(
    model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    callbacks=[CanaryAuditCallback(ground_truth=gt, every_steps=50)],  # added line 2 of 2
)
trainer.train()
