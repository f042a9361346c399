"""The Core ML ML-program format (.mlpackage)."""
