"""astolfo's engine, one subpackage per stage of the flow: checkpoint files (``checkpoint``),
what a folder holds (``library``), hashes and the catalog (``hashes``), recipes (``recipe``),
merge plans (``plan``), the merge (``merge``), detached jobs (``jobs``) and synthetic models
(``synth``). It never imports the UI (Textual, Rich or ``astolfo_tui``); any script can use it.
"""
