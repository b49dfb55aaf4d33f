"""memorycore: test-time-learning memory layers with explicit recurrent state.

Every sequence layer maps ``x [batch, time, dim] -> y [batch, time, dim]`` and takes and returns its state:
``y, state = layer(x, state=None)``.
"""

from memorycore.errors import CheckpointError, InputError, MemorycoreError, TrainingError
from memorycore.neural_memory import NeuralMemory, NeuralMemoryState
from memorycore.mqar import mqar_accuracy, mqar_batch
from memorycore.ramnet import RAMNet, RAMNetState

__version__ = "0.3.0"

__all__ = [
    "NeuralMemory", "NeuralMemoryState", "RAMNet", "RAMNetState", "mqar_batch", "mqar_accuracy",
    "InputError", "CheckpointError", "TrainingError", "MemorycoreError", "__version__",
]
