"""Training (docs/training.md): two-phase fine-tuning, LoRA, checkpoints and CoDA weights files."""
