"""nbtool.notebook.dashboard: (door to be written)."""
