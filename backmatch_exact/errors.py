"""Errors the engine raises. Each message names the layer (module path) it concerns."""


class BackMatchError(RuntimeError):
    """Base class of every error raised by backmatch_exact."""


class UnsupportedModuleError(BackMatchError, TypeError):
    """A module the engine has no back-matching rule for sits in the network."""


class GraphError(BackMatchError):
    """The forward pass did work outside the supported modules (functional op, residual branch)."""


class NonFiniteError(BackMatchError, FloatingPointError):
    """A NaN or infinity appeared in an input, a signal or a solution."""


class SolveError(BackMatchError):
    """Every factorization of a layer's Gram matrix failed."""


class UnresolvedSolveWarning(UserWarning):
    """A layer's weight solve ran in a dtype too coarse for its Gram's condition: its g'_W is not the exact answer."""
