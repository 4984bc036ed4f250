"""Hashes of model files: the data model (no torch), the one-read hasher, the SQLite catalog
and the relations hashes reveal (=sd, identical components).
"""
