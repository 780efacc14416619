"""b3stream: contrastive embedding training with smart batch mining (B3, B3++, GCBS baselines).

B3 is "Breaking the Batch Barrier of Contrastive Learning via Smart Batch Mining" (2025): a teacher ranks
every example's positive against every query, ranks p..p+m form a sparse graph, METIS cuts it into
communities of K mutually strong negatives, and a batch of |B| is |B|/K communities.
"""

__version__ = "0.1.0"

from .schedule import Schedule, load_schedule  # noqa: E402  (public loader)

__all__ = ["Schedule", "load_schedule", "__version__"]
