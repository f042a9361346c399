"""The engine: which weights each stage selects (select), what it will do (plan), doing it (execute), the
quantization modes, and the coremltools-compatible API."""
