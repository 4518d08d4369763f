"""Learning: datasets and partitions, models, the local trainer, evaluation."""
