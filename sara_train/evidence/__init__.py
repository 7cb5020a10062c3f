"""Evidence: SaRA against LoRA, Super-Tuning, full fine-tuning and its own ablations on the glyph
base, with the metrics and observations ``benchmarks/quality.py`` reports."""
