"""Training (SPEC 5): two-phase fine-tuning, LoRA, checkpoints and CoDA weights files."""
