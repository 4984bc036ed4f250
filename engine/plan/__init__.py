"""From a checked recipe to a merge plan: the plan's data model, the checks, the builder and
the provenance metadata.
"""
