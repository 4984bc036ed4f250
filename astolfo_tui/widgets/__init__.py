"""Widgets of the astolfo app."""
