"""Evidence: SaRA against LoRA, Super-Tuning, full fine-tuning and its own ablations on the glyph
base, measured by ``benchmarks/quality.py`` (results: docs/results.md).

    features.py      the style-fit metric: a glyph classifier trained here and the Fréchet distance
    methods.py       the compared methods, made trainable at an equal budget
    experiment.py    one run: train on identical draws, draw, score (Fréchet, pixel, accuracy, drift); VLHI
    observations.py  the paper's Sec. 3.1 (zeroing) and Sec. 3.2 (persistence of small weights) on the base
    report.py        mean ± std tables, the learning-rate choice
"""
