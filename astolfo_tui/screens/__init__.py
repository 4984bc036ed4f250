"""Screens of the astolfo app."""
