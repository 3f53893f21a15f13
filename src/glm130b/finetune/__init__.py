"""Fine-tuning: LoRA, P-Tuning v2 and full fine-tuning of a model folder, on full-precision or
frozen INT8/INT4 base weights (QLoRA-style), through the pretraining loop (train/trainer.py).

data.py     the JSONL records, formatted the GLM way (prompt + [gMASK], <sop> response <eop>)
adapters.py LoRA (peft) and P-Tuning v2 adapters: attach, save and load in peft's format, merge
run.py      `glm130b finetune`: the configuration, the run, `finetune merge`
"""
