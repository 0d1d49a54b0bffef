"""Built-in methods; importing this package registers them (see shrink.registry)."""

from . import heads_astar, heads_importance, recovery  # noqa: F401
