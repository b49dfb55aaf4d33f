"""Exceptions raised for bad user input.

Every application raises :class:`InputError` (a ``ValueError``) with a message that says what was wrong and what to
do; the command line turns it into one line on stderr and exit code 2, never a traceback.
"""


class MemorycoreError(Exception):
    """Base class of the errors memorycore raises on purpose."""


class InputError(MemorycoreError, ValueError):
    """The user's data, file or arguments cannot be used; the message says why and what to do."""


class CheckpointError(InputError):
    """A model file is missing, not a memorycore checkpoint, or corrupt."""


class TrainingError(MemorycoreError, FloatingPointError):
    """Training diverged (the loss became NaN or infinite); the message says which knob to turn."""
