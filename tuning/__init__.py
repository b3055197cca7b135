"""kaito.tuning: The LoRA/QLoRA fine-tuning job (issue 5)."""
