"""Small infrastructure: atomic writes, the run lock, input fingerprints, units and timestamps."""
