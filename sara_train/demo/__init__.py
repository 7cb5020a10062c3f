"""The glyph demo: a small text-conditioned pixel diffusion model of font glyphs (``make demo``)."""
