"""Checkpoint files: the safetensors format (header, reader, streaming writer), the known
architectures and their schemas, key names.
"""
