"""Model formats: each one's messages, I/O, structure, inventory, checks and writers."""
