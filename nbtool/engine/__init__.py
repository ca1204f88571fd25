"""nbtool.engine.engine: (door to be written)."""
