"""nbtool.worker.auto: (door to be written)."""
