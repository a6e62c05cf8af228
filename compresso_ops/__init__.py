"""compresso-ops: declarative structured pruning with the Compresso method."""

from . import _autoregister

_autoregister.install()
