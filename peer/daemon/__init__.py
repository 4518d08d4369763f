"""The daemon: a supervisor that runs the training thread, the pusher, membership I/O, checkpoints, metrics."""
