"""Comparing N models in one read: task-vector norms, the Gram matrix of their deltas, cosines,
consensus, influence and findings (clones, mixes, outliers, families), per component and per
SDXL UNet block, cached by the files' SHA256."""
