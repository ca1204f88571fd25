"""nbtool._util: (door to be written)."""
