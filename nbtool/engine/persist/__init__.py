"""nbtool.engine.engine.persist: (door to be written)."""
