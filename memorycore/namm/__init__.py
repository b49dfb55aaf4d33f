"""KV-cache presses: H2O, L2 norm and NAMM (evolved eviction), for our attention models and Hugging Face causal LMs.

>>> press = H2OPress(budget=0.25)
>>> with press(model):                      # doctest: +SKIP
...     y, state = model(x)
>>> press.stats                             # doctest: +SKIP

See docs/namm.md.
"""

from memorycore.namm.evolution import EvolutionResult, FunctionTask, NAMMTask, fit_namm
from memorycore.namm.features import SpectrogramFeatures
from memorycore.namm.hf import HFSession, generate
from memorycore.namm.press import BudgetPress, H2OPress, L2NormPress, LayerStats, Press
from memorycore.namm.registry import PRESSES, make_press
from memorycore.namm.scorer import BAMScorer, NAMMPress
from memorycore.namm.tasks import AnswerTask, LossTask, model_logits, needle_task, passkey_task

__all__ = ["Press", "BudgetPress", "H2OPress", "L2NormPress", "NAMMPress", "BAMScorer", "SpectrogramFeatures",
           "LayerStats", "HFSession", "generate", "fit_namm", "NAMMTask", "FunctionTask", "EvolutionResult",
           "make_press", "PRESSES", "AnswerTask", "LossTask", "model_logits", "needle_task", "passkey_task"]
