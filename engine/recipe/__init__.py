"""Recipes: the data model, the TOML file, and the article's selection notation."""
