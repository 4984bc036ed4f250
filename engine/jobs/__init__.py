"""Detached merge jobs: their folder on disk (store), starting and controlling them (launch),
and the process that runs one (runner).
"""
