"""astolfo's engine: checkpoint files, architectures, inspection, hashing, recipes, the merge
and jobs. It never imports the UI (Textual or ``astolfo_tui``); any script can use it."""
