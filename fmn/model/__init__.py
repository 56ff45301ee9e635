"""Base models and patches: loading a pipeline, text conditioning, patch files, LoRA keys."""
