"""What is in a folder of models: finding the files, diagnosing each one from its header,
the reports, and the report cache.
"""
