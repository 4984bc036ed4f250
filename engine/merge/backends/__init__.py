"""Where a merge item is computed: the ``Backend`` protocol and its CPU and CUDA implementations."""
