"""KV-cache presses: H2O, L2 norm and NAMM (evolved eviction).

>>> press = H2OPress(budget=0.25)
>>> with press(model):                      # doctest: +SKIP
...     y, state = model(x)
>>> press.stats                             # doctest: +SKIP

See docs/namm.md.
"""

from memorycore.namm.features import SpectrogramFeatures
from memorycore.namm.press import BudgetPress, H2OPress, L2NormPress, LayerStats, Press
from memorycore.namm.registry import PRESSES, make_press
from memorycore.namm.scorer import BAMScorer, NAMMPress

__all__ = ["Press", "BudgetPress", "H2OPress", "L2NormPress", "NAMMPress", "BAMScorer", "SpectrogramFeatures",
           "LayerStats", "make_press", "PRESSES"]
