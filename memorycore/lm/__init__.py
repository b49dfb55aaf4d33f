"""Language models on the Titans architectures (MemoryLM): byte or BPE tokens, fit / generate / evaluate."""

from memorycore.lm.estimator import MemoryLM

__all__ = ["MemoryLM"]
