"""Inside the model: what each layer predicts, where attention looks, what surprises it, how two runs differ.

``lens`` (logit lens), ``attention`` (captured weights), ``score`` (surprise of a
given text), ``compare`` (two models or settings side by side); ``hooks`` are
the scoped captures they share. Core returns numpy-backed records; views draw them.
"""

from .attention import AttentionMap, attention
from .compare import Comparison, compare
from .lens import LogitLens, logit_lens
from .score import Scored, score

__all__ = ["LogitLens", "logit_lens", "AttentionMap", "attention", "Scored", "score", "Comparison", "compare"]
