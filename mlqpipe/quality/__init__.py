"""Quality: the evaluator (numpy forward pass), reports, gates and the summary tables."""
