"""memorycore: test-time-learning memory layers with explicit recurrent state.

Every sequence layer maps ``x [batch, time, dim] -> y [batch, time, dim]`` and takes and returns its state:
``y, state = layer(x, state=None)``.
"""

from importlib import import_module

from memorycore.errors import CheckpointError, InputError, MemorycoreError, TrainingError

__version__ = "0.3.0"

# The layers need torch, which takes seconds to import; they load on first use, so that the command line's --help
# and its error messages (memorycore.errors) come at once.
_LAZY = {
    "NeuralMemory": "memorycore.neural_memory", "NeuralMemoryState": "memorycore.neural_memory",
    "RAMNet": "memorycore.ramnet", "RAMNetState": "memorycore.ramnet",
    "MemoryBlock": "memorycore.blocks",
    "SlidingWindowAttention": "memorycore.attention", "KVCache": "memorycore.attention",
    "AttentionState": "memorycore.attention",
    "TitansModel": "memorycore.titans", "TitansConfig": "memorycore.titans", "TitansState": "memorycore.titans",
    "MemoryAsContext": "memorycore.titans", "MemoryAsGate": "memorycore.titans",
    "needle_batch": "memorycore.tasks", "passkey_batch": "memorycore.tasks", "answer_accuracy": "memorycore.tasks",
    "mqar_batch": "memorycore.mqar", "mqar_accuracy": "memorycore.mqar",
}

__all__ = [*_LAZY, "InputError", "CheckpointError", "TrainingError", "MemorycoreError", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'memorycore' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
