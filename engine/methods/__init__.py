"""Merge methods beyond the weighted mean: their parameters and presets (``params``) and their
element-wise arithmetic over a streamed slice of a key (``streamed``), shared by every backend."""
