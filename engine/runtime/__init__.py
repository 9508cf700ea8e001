"""What every stage shares: the run folder, checkpoints, the host's execution plan and env.json."""
