"""Model implementations and the registry keyed by Hugging Face architecture name."""
