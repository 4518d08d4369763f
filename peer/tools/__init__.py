"""Tools built on the daemon: the demo, its launcher and evaluation, plots, status client, the netns testbed."""
