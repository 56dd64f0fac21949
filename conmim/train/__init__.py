"""Pre-training: the loop, one optimizer step, parameter groups, schedules and the non-finite step guard."""
