"""Exact and approximate back-matching propagation for torch.nn networks.

    import backmatch_exact as bm
    engine = bm.attach(model, mode="exact")   # or "bp", "exact_weights", "approx"
    loss.backward()                           # p.grad holds the back-matched gradient
    engine.stats()                            # what each layer's solve did
    engine.detach()

``bm.attach(model, mode="exact", approximations=["gram"])`` makes some of Algorithm 1's
approximations (:class:`Approximations`); ``bm.attach(model, mode="exact", signals="joint")``
co-updates each layer's input units instead of letting each match on its own (``joint.py``).
``bm.optim`` has the paper's baselines, ``bm.models`` its networks, ``bm.data`` the shipped data
and loaders.
"""

from . import data, models, optim
from .approximations import Approximations
from .engine import BACKENDS, MODES, Engine, attach
from .errors import (BackMatchError, GraphError, NonFiniteError, SolveError, UnresolvedSolveWarning,
                     UnsupportedModuleError)

__version__ = "0.1.0"

__all__ = ["attach", "Engine", "MODES", "BACKENDS", "Approximations", "data", "models", "optim", "BackMatchError",
           "GraphError", "NonFiniteError", "SolveError", "UnsupportedModuleError", "UnresolvedSolveWarning"]
