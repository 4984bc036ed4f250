"""The merge: the run's orchestration, its progress, resume state, NaN policy and pipeline;
the buffer layout, I/O threads, outputs, the arithmetic and its CPU/CUDA backends; devices
and the events the merge reports through.
"""
