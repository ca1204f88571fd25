"""nbtool.worker.runtimes: (door to be written)."""
