"""The pure protocol core: membership, topology, faults, liveness and catch-up decisions. No I/O."""
