"""nbtool.predict: (door to be written)."""
