from astolfo_tui.cli import entry

entry()
