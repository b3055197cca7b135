"""kaito.tuning: the LoRA/QLoRA fine-tuning job (`kaito-tune`)."""
