"""The two ways a merge ends early, shared by every part of the run that can end it."""

from __future__ import annotations


class MergeError(Exception):
    """The merge cannot go on; the message names the file (or model and key) and the reason."""

    def __init__(self, message: str, model_id: str | None = None, key: str | None = None):
        self.model_id = model_id
        self.key = key
        super().__init__(message)


class MergeCancelled(Exception):
    """The merge was cancelled; no output file and no partial file were left."""
