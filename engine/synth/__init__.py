"""Synthetic checkpoints for tests, benchmarks and the demo, and the demo folder itself."""
