"""Built-in methods; importing this package registers them (see shrink.registry)."""

from . import heads_astar, heads_importance, recovery  # noqa: F401
from . import lowrank, weight_pruning  # noqa: F401,E402  (LadaBERT: low rank + weight pruning)
from . import l0  # noqa: F401,E402  (L0 structured pruning: heads, FFN, sub-layers)
from . import embedding_binary, embedding_codes  # noqa: F401,E402  (word embeddings as compositional or binary codes)
