"""nbtool.models: (door to be written)."""
