"""P-Tuning v2 / LoRA / full fine-tuning of ChatGLM models: a self-contained folder (see README.md)."""
