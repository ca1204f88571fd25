"""nbtool.notebook: (door to be written)."""
