"""Exact and approximate back-matching propagation for torch.nn networks.

    import backmatch_exact as bm
    engine = bm.attach(model, mode="exact")   # or "bp", "exact_weights"
    loss.backward()                           # p.grad holds the back-matched gradient
    engine.stats()                            # what each layer's solve did
    engine.detach()
"""

from . import data, models, optim
from .engine import MODES, Engine, attach
from .errors import BackMatchError, GraphError, NonFiniteError, SolveError, UnsupportedModuleError

__version__ = "0.1.0"

__all__ = ["attach", "Engine", "MODES", "data", "models", "optim", "BackMatchError", "GraphError",
           "NonFiniteError", "SolveError", "UnsupportedModuleError"]
