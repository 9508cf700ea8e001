"""Training: the loop, its step, optimizer and schedule, budget, progressive resizing, logging, reports."""
