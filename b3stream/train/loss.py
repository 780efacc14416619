"""InfoNCE over the global batch, with B3++ hard negatives and GradCache.

B3 changes which examples share a batch, not the objective: training is plain InfoNCE over the in-batch
negatives (B3++ adds a pool of hard negatives). For query ``q_i`` with positive ``d_i`` in a global batch
of |B| pairs, and a pool ``N`` of extra hard negatives shared by every query,

    l_i = -log  exp(q_i . d_i / tau)  /  ( sum_{j in B} exp(q_i . d_j / tau) + sum_{n in N} exp(q_i . n / tau) )

and the loss is the mean of ``l_i`` over the |B| queries (optionally averaged with the reverse, positive ->
query, term). tau defaults to 0.02 as in the paper.

Same-text positives. When the content keys of the texts are given (:mod:`b3stream.data.dedup`), every column
whose text equals query i's positive, other than its own target, is masked out of ``l_i``: a duplicated
document or a shared class label under another id is i's correct answer, not a negative. (In the reverse
term, the queries whose positive has d_i's text are masked likewise.) So is every column whose text is one
of query i's *known positives* (``known_keys``: the other positives of its query, from a FlagEmbedding
``pos`` list prepared one example per positive): another example of the same query in the batch, or a hard
negative with that text. The mask is local to each rank's queries; nothing more is gathered.

Distributed layout. Each rank embeds its slice of the batch (and its share of ``N``), then gathers every
rank's embeddings, so each query sees the whole global batch as negatives. A rank scores only *its own*
queries (a (n_local, |B| + |N|) logit block, not |B| x |B|); the gather's backward sums the gradient each
rank computed for every slice and hands each rank the part for its own embeddings, in one reduce-scatter
(each rank receives only its own rows, summed: 1/world of the traffic of an all-reduce of the whole
(|B| + |N|) x d gradient, whose other rows every rank would throw away). DeepSpeed then averages
parameter gradients over ranks, so each rank's loss is scaled by ``world / |B|`` (not ``1 / n_local``):
the averaged gradient is then exactly the gradient of the global mean, also when the last batch of an
epoch does not split evenly. The tests check this against one process holding the whole batch. The
gathers need every rank's row count; the trainer passes the counts its plan implies (``RankBatch.sizes``,
``RankBatch.negative_sizes``), so a step's collectives are the embeddings' and keys' gathers, the gradients'
reduce-scatters and the statistics' all-reduce, with no all-gather of counts and no ``.item()`` (a host wait
on NCCL) to read them.

Target columns. The logit block is ``[all |B| positives | all |N| hard negatives]``: the positives come
first, in global batch order, so the target of local query ``i`` on rank ``r`` is ``offset_r + i`` with or
without hard negatives. (Laying a per-query ``[d_i, n_i1..n_ih]`` group out instead moves the target to
``i * (h + 1)``; keeping ``arange`` there is the classic bug.)

GradCache. With ``chunk`` set, :class:`BatchEmbedder` embeds each side in sub-batches under non-reentrant
activation checkpointing: the forward keeps only each chunk's inputs and output embeddings, the loss is
computed on all embeddings at once, and the single ``engine.backward`` recomputes one chunk at a time. This
is GradCache's computation (embed without activations, loss on the cached embeddings, re-run each chunk
with its embedding gradient) expressed as *one* autograd graph: one forward and one backward per step, so
ZeRO's per-parameter gradient hooks fire exactly once per step, as with the plain loss. (Trainers that call
backward once per chunk trip ZeRO-2's "gradient computed twice" guard.) Memory: one chunk's activations
plus the |B| x d embeddings; compute: two forwards and one backward, as GradCache.

GradCache on CPU and glibc's heap. The tensors above hold one chunk at a time, but glibc's malloc raises
its mmap threshold to the size of the largest block it has freed (up to 32 MB), so after the first chunk
the chunk-sized activation blocks (a few MB to tens of MB each) come from the heap instead of fresh
mappings. Freed, they stay in the heap, and the small blocks that live on across chunks (chunk outputs,
parameter-gradient buffers, autograd nodes) land in their holes, so the next chunk's blocks no longer fit
and the heap grows: peak RSS rose by about 7-9 MB per example with chunks of 64 (measured: |B| = 64 ->
2.2 GB, 256 -> 4.0 GB for MiniLM at 128 tokens), while the live tensors stay flat. :func:`bound_cpu_heap`
fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``), so every block of 4 MB and more is mapped fresh and
returned on free; it runs once, the first time a chunked forward runs on CPU. The price is the page faults
of fresh mappings (about 0.3 s per GB allocated on a 2-core VM); GPU training never calls it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SIDES = ("query", "positive", "negative")


# --------------------------------------------------------------------------------------------------
# Cross-rank gather that keeps the gradient of the local slice
# --------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device | None = None) -> list[int]:
    """Every rank's row count (one tiny all_gather; ``[n]`` without a process group).

    The fallback for callers that do not know the counts (evaluation's shares): it costs a collective and,
    on NCCL, one host wait per ``.item()``. The training step passes the counts its plan implies instead
    (:func:`host_sizes`)."""
    rank, world = _world()
    if world == 1:
        return [n]
    # gloo reduces CPU tensors, NCCL needs them on the GPU.
    dev = device if device is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([n], dtype=torch.long, device=dev)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def all_gather_rows(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """All ranks' ``x`` (rows may differ per rank: padded to the largest, then trimmed)."""
    rank, world = _world()
    biggest = max(sizes)
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return [o[:s] for o, s in zip(out, sizes)]


def host_sizes(sizes: list[int] | None, rows: int, what: str = "rows") -> list[int] | None:
    """Every rank's row count as the caller knows it on the host (from the step's plan), checked against
    this rank's own ``rows``: a wrong count would silently mis-slice every rank's gather, so it is refused
    here, where the check costs nothing (a tensor's shape is on the host). None passes through (the caller
    then falls back to :func:`gather_sizes`)."""
    if sizes is None:
        return None
    rank, world = _world()
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or sizes[rank] != rows:
        raise ValueError(f"{what}: the given per-rank sizes {sizes} do not fit {world} rank(s) with {rows} "
                         f"row(s) on rank {rank}")
    return sizes


def reduce_scatter_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows ``x`` (every rank's, in rank order, ``sizes[r]`` rows of rank r) summed over ranks, each rank
    receiving its own rows only: one reduce-scatter over slices padded to the largest (none to pad when the
    sizes are equal). Nothing is exchanged when every size is 0 (the same on every rank)."""
    rank, world = _world()
    biggest = max(sizes)
    if biggest == 0:
        return x.new_zeros((0, *x.shape[1:]))
    if all(s == biggest for s in sizes):
        padded = x.contiguous()
    else:
        padded = x.new_zeros((world * biggest, *x.shape[1:]))
        start = 0
        for r, s in enumerate(sizes):
            padded[r * biggest : r * biggest + s] = x[start : start + s]
            start += s
    out = x.new_empty((biggest, *x.shape[1:]))
    # reduce_scatter_single: torch's newer name (reduce_scatter_tensor warns there); both work on gloo and NCCL
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, padded, op=dist.ReduceOp.SUM)
    return out[: sizes[rank]]


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums all ranks' gradients for the local rows (a
    reduce-scatter: each rank gets its own rows' sum, nothing else)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank, _ = _world()
        ctx.sizes = list(sizes)
        parts = all_gather_rows(x.detach(), sizes)
        parts[rank] = x.detach()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Rank r's loss depends on every rank's embeddings, so the gradient for our rows is the sum of
        # what each rank computed for them.
        return reduce_scatter_rows(grad, ctx.sizes), None


def gather(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """All ranks' rows of ``x`` in rank order, differentiable w.r.t. the local rows. Identity on one rank."""
    _, world = _world()
    if world == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes)


def _gather_keys(keys: torch.Tensor | None, sizes: list[int] | None, device: torch.device) -> torch.Tensor:
    """Every rank's int64 content keys in rank order (no gradient; NCCL needs them on the GPU)."""
    if keys is None:
        raise ValueError("content keys must be given for the positives and for the hard negatives alike")
    keys = keys.to(device=device, dtype=torch.long)
    _, world = _world()
    if world == 1:
        return keys
    if sizes is None:
        sizes = gather_sizes(keys.shape[0], device)
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return torch.cat(all_gather_rows(keys.to(dev), sizes)).to(device)


# --------------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------------


@dataclass
class LossOutput:
    """``loss`` is this rank's share (its gradient, averaged over ranks, is that of the global mean);
    the statistics are global (reduced over ranks), detached, for logging.

    The statistics stay on the device until one is read: reading ``global_loss`` (or any of the four)
    copies all four to the host at once, which waits for the GPU. A loop that reads them only on its
    logging steps lets the host run ahead on the others. ``pos_sims`` / ``hardest_sims`` stay on the
    device likewise (TensorBoard's histogram copies them when it writes one)."""

    loss: torch.Tensor
    stats: torch.Tensor  # [mean l_i, mean q_i . d_i, mean hardest negative, accuracy], global, detached
    batch_size: int  # |B| (global)
    num_hard_negatives: int  # |N| (global hard negatives)
    pos_sims: torch.Tensor | None = None  # this rank's q_i . d_i (for histograms)
    hardest_sims: torch.Tensor | None = None  # this rank's most similar negative per query
    _floats: list[float] | None = field(default=None, repr=False)

    STATS = ("loss", "pos_sim", "hardest_neg_sim", "accuracy")  # the rows of ``stats``, in order

    def device_stats(self) -> dict[str, torch.Tensor]:
        """The four statistics by name as 0-d views of ``stats``: nothing is copied to the host."""
        return dict(zip(self.STATS, self.stats.unbind()))

    def floats(self) -> list[float]:
        """The four statistics as Python floats (one device-to-host copy, then cached)."""
        if self._floats is None:
            self._floats = [float(v) for v in self.stats.tolist()]
        return self._floats

    @property
    def global_loss(self) -> float:
        """Mean l_i over the global batch (the number to log)."""
        return self.floats()[0]

    @property
    def pos_sim(self) -> float:
        """Mean cosine q_i . d_i."""
        return self.floats()[1]

    @property
    def hardest_neg_sim(self) -> float:
        """Mean over queries of the most similar negative (in-batch or hard)."""
        return self.floats()[2]

    @property
    def accuracy(self) -> float:
        """Share of queries whose positive outranks every negative."""
        return self.floats()[3]


class InfoNCE:
    """InfoNCE over the gathered global batch (tau = ``temperature``; see the module docstring).

    Args:
        temperature: tau; the paper uses 0.02.
        symmetric: also average in the positive -> query direction (in-batch queries as negatives).
    """

    def __init__(self, temperature: float = 0.02, symmetric: bool = False, mask_duplicates: bool = True):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.tau = temperature
        self.symmetric = symmetric
        self.mask_duplicates = mask_duplicates

    def __call__(self, q: torch.Tensor, d: torch.Tensor, n: torch.Tensor | None = None,
                 d_keys: torch.Tensor | None = None, n_keys: torch.Tensor | None = None,
                 sizes: list[int] | None = None, negative_sizes: list[int] | None = None,
                 known_keys: torch.Tensor | None = None) -> LossOutput:
        """``q``, ``d``: this rank's (n_local, dim) query and positive embeddings (row i pairs with row i);
        ``n``: this rank's share of the hard negatives (any count, also 0), or None. ``d_keys`` / ``n_keys``:
        int64 content keys of those positives / negatives; with ``mask_duplicates`` same-text columns are
        masked (module docstring). ``sizes`` / ``negative_sizes``: every rank's number of queries / hard
        negatives, when the caller knows them (the training step's plan does): the step then gathers only
        embeddings and keys, with no collective and no host wait to learn the counts; without them each is
        gathered (:func:`gather_sizes`). ``known_keys``: (n_local, w) int64 keys of each query's known
        positives (padded with its own positive's key), masked like same-text positives (module docstring)."""
        if q.shape != d.shape:
            raise ValueError(f"queries {tuple(q.shape)} and positives {tuple(d.shape)} must pair row by row")
        # Similarities in fp32 even when the encoder runs in bf16: tau = 0.02 multiplies errors by 50.
        q, d = q.float(), d.float()
        rank, world = _world()
        sizes = host_sizes(sizes, q.shape[0], "queries") or gather_sizes(q.shape[0], q.device)
        negative_sizes = None if n is None else host_sizes(negative_sizes, n.shape[0], "hard negatives")
        if n is not None and negative_sizes is None and world > 1:
            negative_sizes = gather_sizes(n.shape[0], q.device)  # once, for the embeddings and the keys
        total = sum(sizes)
        offset = sum(sizes[:rank])
        d_all = gather(d, sizes)
        keys = d_all
        n_neg = 0
        if n is not None:
            n_all = gather(n.float(), negative_sizes)
            n_neg = n_all.shape[0]
            keys = torch.cat([d_all, n_all])
        target = torch.arange(offset, offset + q.shape[0], device=q.device)
        same = None
        if self.mask_duplicates and d_keys is not None:
            key_all = _gather_keys(d_keys, sizes, q.device)
            if n is not None:
                key_all = torch.cat([key_all, _gather_keys(n_keys, negative_sizes, q.device)])
            same = key_all[None, :] == d_keys.to(q.device)[:, None]
            if known_keys is not None:  # one column of known keys at a time: memory of one (n_local, cols) mask
                known_keys = known_keys.to(q.device)
                for c in range(known_keys.shape[1]):
                    same |= key_all[None, :] == known_keys[:, c : c + 1]
            same[torch.arange(len(target), device=q.device), target] = False

        logits = q @ keys.T / self.tau
        if same is not None:
            logits = logits.masked_fill(same, float("-inf"))
        per_query = F.cross_entropy(logits, target, reduction="none")
        loss = per_query.sum()
        if self.symmetric:
            q_all = gather(q, sizes)
            rev_logits = d @ q_all.T / self.tau
            if same is not None:
                rev_logits = rev_logits.masked_fill(same[:, :total], float("-inf"))
            rev = F.cross_entropy(rev_logits, target, reduction="none")
            loss = 0.5 * (loss + rev.sum())
        # world / total: DeepSpeed averages gradients over ranks, so this makes the result the gradient
        # of the mean over all |B| queries however the batch was split.
        scaled = loss * (world / total)

        with torch.no_grad():
            sims = logits.detach() * self.tau
            pos = sims.gather(1, target[:, None]).squeeze(1)
            masked = sims.clone()
            masked.scatter_(1, target[:, None], float("-inf"))
            hardest = masked.max(dim=1).values if masked.shape[1] > 1 else torch.zeros_like(pos)
            hardest = hardest.nan_to_num(neginf=-1.0)  # every other column masked: no negative at all
            stats = torch.stack([loss.detach(), pos.sum(), hardest.sum(), (pos > hardest).float().sum()])
            if world > 1:
                stats = stats.to(q.device if dist.get_backend() == "nccl" else "cpu")
                dist.all_reduce(stats)
            stats = stats / total
        # No .tolist() / .cpu() here: each would make the host wait for the GPU on every step (LossOutput).
        return LossOutput(loss=scaled, stats=stats, batch_size=total, num_hard_negatives=n_neg, pos_sims=pos,
                          hardest_sims=hardest)


# --------------------------------------------------------------------------------------------------
# The module DeepSpeed wraps: one forward embeds every side of the local batch (GradCache when chunked)
# --------------------------------------------------------------------------------------------------


_HEAP_BOUND: bool | None = None  # None: not tried yet; else whether mallopt took effect
MMAP_THRESHOLD = 4 << 20  # 4 MiB: MiniLM's per-chunk activations at chunk 64 are 12-50 MB


def bound_cpu_heap(threshold: int | None = None) -> bool:
    """Fix glibc's mmap threshold so that freed large blocks go back to the OS (module docstring). Once per
    process; ``B3STREAM_MMAP_THRESHOLD`` (bytes, 0: leave malloc alone) overrides ``threshold``. Returns
    whether the setting is in effect (False off glibc, e.g. macOS or musl)."""
    global _HEAP_BOUND
    if _HEAP_BOUND is not None:
        return _HEAP_BOUND
    env = os.environ.get("B3STREAM_MMAP_THRESHOLD")
    threshold = int(env) if env not in (None, "") else (threshold or MMAP_THRESHOLD)
    _HEAP_BOUND = False
    if threshold > 0 and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
            M_MMAP_THRESHOLD = -3
            _HEAP_BOUND = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1
        except (OSError, AttributeError):
            pass
    return _HEAP_BOUND


def token_extents(mask: torch.Tensor) -> torch.Tensor:
    """Per row of an attention mask, one past the position of its last real token (right padding: the
    row's length; left padding: the width)."""
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    return mask.shape[1] - mask.flip(1).ne(0).int().argmax(1)


def _trim(features: dict[str, torch.Tensor], extents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Drop all-padding columns on the right (a chunk of short texts needs fewer positions). ``extents``:
    the rows' :func:`token_extents`, computed on the host by the data loader so that finding the cut does
    not wait for the GPU; without them they are read from the mask."""
    mask = features["attention_mask"]
    if mask.shape[1] == 0:
        return features
    keep = int((token_extents(mask) if extents is None else extents).max())
    if keep >= mask.shape[1]:
        return features
    return {k: v[:, :keep] for k, v in features.items()}


FUSE_MAX_PADDING = 0.1  # fuse_sides "auto": the most padding (a share of the real forwards' tokens) a fused step may add


def fusing_pays(batch: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether one padded forward over every side adds at most :data:`FUSE_MAX_PADDING` tokens to the separate
    forwards (read from the tensors' shapes, so the host never waits for the device)."""
    shapes = [tuple(f["input_ids"].shape) for f in batch.values() if f is not None and f["input_ids"].shape[0]]
    if len(shapes) < 2:
        return False
    separate = sum(rows * width for rows, width in shapes)
    fused = sum(rows for rows, _ in shapes) * max(width for _, width in shapes)
    return fused <= (1 + FUSE_MAX_PADDING) * separate


class BatchEmbedder(torch.nn.Module):
    """Embeds ``{"query": features, "positive": features, "negative": features}`` in one forward.

    One forward (and so one ``engine.backward``) per step whatever the chunking, which is what ZeRO's
    gradient partitioning expects. With ``chunk`` set each side runs in sub-batches of ``chunk`` rows
    under non-reentrant activation checkpointing (GradCache, see the module docstring); dropout masks are
    replayed exactly when a chunk is recomputed (the checkpoint restores the RNG state).

    With ``fuse_sides`` (and no chunking) all sides go through the encoder as ONE batch, each padded on
    the right to the longest side's width: half the kernel launches of a forward per side, which is what
    a small model on a GPU is bound by; on a CPU the extra padding of the shorter side costs more than
    the launches save. Padding is masked, so the embeddings are those of the separate forwards.
    ``fuse_sides="auto"`` fuses a step only when the padding adds at most :data:`FUSE_MAX_PADDING` of the
    separate forwards' tokens (sides of about one width, e.g. symmetric tasks): queries of 32 tokens padded
    to positives of 128 would cost 60% more tokens, which a compute-bound student (any LLM) pays in full.

    Args:
        encoder: a :class:`b3stream.encoder.Encoder` (its ``forward(input_ids, attention_mask)``).
        chunk: GradCache sub-batch size; None embeds each side in one pass.
        fuse_sides: one padded forward for all sides: True, False, or "auto" (decided per step from the
            sides' widths); ignored with ``chunk``.
        pad_id: the token id that pads ``input_ids`` when sides are fused (masked: any id works).
    """

    def __init__(self, encoder: torch.nn.Module, chunk: int | None = None, fuse_sides: bool | str = False,
                 pad_id: int = 0):
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"grad_cache_chunk must be >= 1, got {chunk}")
        if fuse_sides not in (True, False, "auto"):
            raise ValueError(f"fuse_sides must be True, False or 'auto', got {fuse_sides!r}")
        self.encoder = encoder
        self.chunk = chunk
        self.fuse_sides = fuse_sides if chunk is None else False
        self.pad_id = pad_id

    def _embed(self, features: dict[str, torch.Tensor], extents: torch.Tensor | None = None) -> torch.Tensor:
        n = features["input_ids"].shape[0]
        if self.chunk is None or not torch.is_grad_enabled():
            return self.encoder(**features)
        if features["input_ids"].device.type == "cpu":
            bound_cpu_heap()  # else the heap grows by about one chunk's blocks per chunk (module docstring)
        if n <= self.chunk:  # a single chunk still gets the memory saving of recomputation
            return checkpoint(self.encoder, **features, use_reentrant=False)
        parts = []
        for start in range(0, n, self.chunk):
            rows = slice(start, start + self.chunk)
            part = _trim({k: v[rows] for k, v in features.items()}, None if extents is None else extents[rows])
            parts.append(checkpoint(self.encoder, **part, use_reentrant=False))
        return torch.cat(parts)

    def forward(self, batch: dict[str, dict[str, torch.Tensor]],
                extents: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``extents``: optional host-side token extents per side (``LocalBatch.extents``)."""
        if self.fuse_sides is True or (self.fuse_sides == "auto" and fusing_pays(batch)):
            return self._fused(batch)
        out = {}
        for side in SIDES:
            features = batch.get(side)
            if features is None:
                continue
            if features["input_ids"].shape[0] == 0:  # e.g. this rank's share of few hard negatives
                ref = next(self.encoder.parameters())
                out[side] = torch.zeros(0, self.encoder.dim, dtype=ref.dtype, device=ref.device)
                continue
            out[side] = self._embed(features, None if extents is None else extents.get(side))
        return out

    def _fused(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        sides = [side for side in SIDES if side in batch]
        rows = [batch[side]["input_ids"].shape[0] for side in sides]
        # An empty side (a rank's share of few hard negatives) may lack keys the tokenizer adds elsewhere
        # (token_type_ids): only sides with rows are joined; split() still hands it its 0 rows.
        full = [side for side, n in zip(sides, rows) if n]
        width = max(batch[side]["input_ids"].shape[1] for side in full)
        joined = {}
        for key in batch[full[0]]:
            fill = self.pad_id if key == "input_ids" else 0
            joined[key] = torch.cat([torch.nn.functional.pad(batch[side][key], (0, width - batch[side][key].shape[1]),
                                                             value=fill) for side in full])
        emb = self.encoder(**joined)
        return dict(zip(sides, emb.split(rows)))
