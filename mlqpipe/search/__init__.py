"""Accuracy-aware search: per weight group, the smallest candidate setting that keeps the gates (`mlqpipe search`)."""
