"""The training engine: checkpoints and networks, the objectives, the trainer and the search loop."""
