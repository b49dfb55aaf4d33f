"""Language models on the Titans architectures (MemoryLM)."""
