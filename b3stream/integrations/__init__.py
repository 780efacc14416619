"""b3stream's batches inside other trainers.

- ``sentence_transformers.py``: :class:`B3BatchSampler` (a sentence-transformers batch sampler that batches a
  ``datasets.Dataset`` by a b3stream schedule), :func:`mine_schedule` / :class:`B3Miner` (the schedule mined
  from that dataset and a SentenceTransformer by b3stream's mining stages) and :class:`B3RemineCallback`
  (re-mined from the model being trained at chosen epoch starts) and :func:`with_hard_negatives` (B3++ through
  the dataset's negative columns). docs/sentence_transformers.md.
"""
