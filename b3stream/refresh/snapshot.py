"""Student snapshots: what the trainer hands the background miner in refreshed mode (``RUN/snapshots``).

The trainer and the miner meet only through files: snapshots one way (trainer -> miner), schedules the other
(:mod:`b3stream.schedule`); :class:`b3stream.run_paths.RunPaths` names the folders. A snapshot is everything
a miner needs to embed the data with the student as it was at one training step::

    RUN/snapshots/step-0000120/
        snapshot.json         step, epoch, the student's EncoderConfig, the data stamp, kind, weights sha256
        adapter/              LoRA / DoRA students: the PEFT adapter (save_pretrained; a few MB)
        model.safetensors     full fine-tuning: every weight of the backbone
        trained.npy           the ids trained so far in the current epoch (the miner mines them apart)

The trainer takes a snapshot in two parts (:func:`capture_weights`, then :func:`write_snapshot`): at the
snapshot step it copies the weights the snapshot saves to host memory (for a LoRA student only the adapter's,
so under ZeRO-3 only those are gathered), and the files, their SHA-256 and the pruning are written from
that copy, on a background thread while training goes on (:class:`b3stream.refresh.trainer.SnapshotWriter`);
the bytes are those a synchronous write of the model at that step gives.

A snapshot is written under a temporary name and renamed into place, so a folder named ``step-*`` is always
complete; a reader that finds one without a valid ``snapshot.json`` ignores it. Only the newest ``keep``
snapshots are kept, and the one a miner is mining from: the miner pins it (:func:`pin_snapshot`, a lease in
``RUN/refresh/lease.json``) before it reads it, and the trainer never prunes a pinned snapshot, so a miner
slower than ``keep`` snapshot intervals still finishes its refresh. The weights' SHA-256 is what the miner's
embed stage keys "up to date" on, and it is checked against the files every time a snapshot is used
(:func:`verify_snapshot`): a snapshot corrupted on disk, before or after it was first embedded, is refused
(:class:`SnapshotError`), never embedded.

A snapshot folder is data, like everything in a run folder: ``snapshot.json`` is typed
(:class:`b3stream.records.SnapshotMeta`), and its ``encoder`` never chooses what is loaded. The weights go
into the encoder the *reader* was configured with (the run's own student, ``RUN/config.yaml``), with
``trust_remote_code`` as the reading command says, once the record agrees with it on model, pooling and
lengths (:func:`snapshot_encoder`); a snapshot written for another student is refused.

Both sides of refreshed mode use this module (the trainer writes, the miner reads), so it imports only the
ground floor and :mod:`b3stream.encoder`: the mining stages are handed a snapshot by the miner
(:func:`b3stream.refresh.miner.snapshot_model`) and never read one themselves.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import EncoderConfig, LoraConfig, from_dict
from ..data.manifest import DataError
from ..encoder import Encoder, is_peft, weights_digest
from ..files import HOST, sweep_temps, tmp_name, write_json, writer_gone
from ..records import Lease, RecordError, SnapshotMeta, read_record, read_record_or_none
from ..run_paths import RunPaths

META = "snapshot.json"
TRAINED = "trained.npy"
_NAME = re.compile(r"^step-(\d{7,})$")


class SnapshotError(DataError):
    """A student snapshot whose files do not match its record or do not load: the miner skips it."""


@dataclass
class Snapshot:
    path: Path
    step: int
    meta: dict

    @property
    def encoder_config(self) -> EncoderConfig:
        """The student the snapshot says it was written by, as recorded (``trust_remote_code`` never taken
        from it: see :func:`snapshot_encoder`)."""
        from ..config import ConfigError

        try:
            cfg = from_dict(EncoderConfig, self.meta["encoder"], where=f"{self.path / META}: encoder")
        except ConfigError as e:
            raise SnapshotError(str(e)) from None
        return dataclasses.replace(cfg, trust_remote_code=False)

    @property
    def weights_sha256(self) -> str:
        return self.meta["weights_sha256"]

    @property
    def trained_ids(self) -> Path | None:
        """The ids trained in the snapshot's epoch before it (``trained.npy``), if the trainer wrote them."""
        path = self.path / TRAINED
        return path if path.is_file() else None


def snapshot_folder(run: str | Path) -> Path:
    return RunPaths(Path(run)).snapshots


def _snapshot_at(path: Path) -> Snapshot:
    """The snapshot in folder ``path``: a ``step-NNNNNNN`` name and a valid ``snapshot.json`` of that step;
    :class:`SnapshotError` otherwise (missing, crafted, or half a folder)."""
    m = _NAME.match(path.name)
    if m is None:
        raise SnapshotError(f"{path}: not a student snapshot folder (step-NNNNNNN/)")
    try:
        meta = read_record(path / META, SnapshotMeta)
    except RecordError as e:
        raise SnapshotError(str(e)) from None
    if meta is None or meta.step != int(m.group(1)):
        raise SnapshotError(f"{path}: not a complete student snapshot (step-NNNNNNN/ with {META} of that step)")
    return Snapshot(path=path, step=meta.step, meta=meta.model_dump())


def list_snapshots(run: str | Path) -> list[Snapshot]:
    """Complete snapshots of ``run``, oldest first; a folder whose record is missing or not valid is passed
    over (the folder is watched while training runs: nothing in it may stop the reader)."""
    folder = snapshot_folder(run)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if _NAME.match(path.name):
            try:
                found.append(_snapshot_at(path))
            except SnapshotError:
                continue
    return sorted(found, key=lambda s: s.step)


def read_snapshot(path: str | Path) -> Snapshot:
    """The snapshot in folder ``path``; :class:`SnapshotError` when it is not a complete, valid snapshot."""
    return _snapshot_at(Path(path))


def latest_snapshot(run: str | Path) -> Snapshot | None:
    found = list_snapshots(run)
    return found[-1] if found else None


def snapshot_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a snapshot of ``model`` saves (what ZeRO-3 must gather for it): a LoRA / DoRA
    student's adapter (its trainable parameters and every ``lora_`` / ``modules_to_save`` one), every
    parameter of a fully fine-tuned one."""
    if not is_peft(model):
        return list(model.parameters())
    return [p for name, p in model.named_parameters() if _adapter_name(name, p)]


def _adapter_name(name: str, p: torch.Tensor | None = None) -> bool:
    return (p is not None and p.requires_grad) or "lora_" in name or "modules_to_save" in name


@dataclass
class HostWeights:
    """What a snapshot saves, copied off the model at the snapshot step (:func:`capture_weights`): the
    tensors in host memory, ready to be written while the model trains on."""

    kind: str  # "lora" (the adapter's tensors, by state-dict name) or "full" (as safetensors' save_model keeps them)
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] | None = None  # full: the tied names safetensors drops, and the name each points to
    model: torch.nn.Module | None = None  # lora: the PEFT model, for its adapter config (never its weights)
    copied: object = None  # a CUDA event the copies were queued before (None: they are done)

    def wait(self) -> None:
        """Until the copies are complete (a no-op for copies from host memory)."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None


def capture_weights(model: torch.nn.Module) -> HostWeights:
    """Copy what a snapshot of ``model`` saves to host memory (call on one process, with those weights at
    hand: under ZeRO-3 inside ``GatheredParameters`` of :func:`snapshot_parameters`). From GPU memory the
    copies go into pinned buffers without waiting for the GPU (stream order keeps them before the next
    step's updates); :meth:`HostWeights.wait` waits for them, on the writer's thread."""
    state = model.state_dict()
    metadata = None
    if is_peft(model):
        kind = "lora"
        state = {k: v for k, v in state.items() if _adapter_name(k)} | \
            {k: state[k] for k, p in model.named_parameters() if p.requires_grad and k in state}
    else:
        from safetensors.torch import _remove_duplicate_names

        kind = "full"
        for kept, removed in _remove_duplicate_names(state).items():  # tied weights, as save_model drops them
            for name in removed:
                metadata = metadata or {}
                metadata.setdefault(name, kept)
                del state[name]
    cuda = any(v.is_cuda for v in state.values())
    tensors = {k: _host_copy(v) for k, v in state.items()}
    copied = None
    if cuda:
        copied = torch.cuda.Event()
        copied.record()
    return HostWeights(kind, tensors, metadata, model if kind == "lora" else None, copied)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if not t.is_cuda:
        return t.to("cpu", copy=True).contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)  # contiguous, whatever t's strides
    return out


def _write_weights(weights: HostWeights, folder: Path) -> None:
    weights.wait()
    if weights.kind == "lora":
        # PEFT's own save (adapter config, model card, safetensors) from the host copy, not the live weights;
        # the base embedding never goes with it: the miner loads the adapter into the run's own base model
        weights.model.save_pretrained(str(folder / "adapter"), state_dict=weights.tensors,
                                      save_embedding_layers=False)
    else:
        from safetensors.torch import save_file

        save_file(weights.tensors, str(folder / "model.safetensors"), metadata=weights.metadata)


def write_snapshot(run: str | Path, step: int, model: torch.nn.Module | HostWeights, encoder_cfg: EncoderConfig,
                   stamp: dict, epoch: int = 0, keep: int = 2, trained=None) -> Path:
    """Write the student's weights at ``step`` - a model (call on one process, with full weights at hand:
    under ZeRO-3 inside ``GatheredParameters``) or their :func:`capture_weights` copy, the trainer's
    background write - and prune all but the newest ``keep`` snapshots. ``trained``: the ids trained so far
    in this epoch (none at an epoch's start)."""
    weights = model if isinstance(model, HostWeights) else capture_weights(model)
    folder = snapshot_folder(run)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    sweep_temps(folder)  # a trainer killed while it wrote a snapshot left its temporary folder
    tmp = tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_weights(weights, tmp)
        kind = weights.kind
        if trained is not None and len(trained):
            np.save(tmp / TRAINED, np.asarray(trained, dtype=np.int64))
        write_json(tmp / META, {
            "step": int(step), "epoch": int(epoch), "kind": kind, "data": stamp, "created": time.time(),
            "encoder": dataclasses.asdict(encoder_cfg), "weights_sha256": weights_digest(tmp)[0],
        })
        with pins_locked(run):
            if final.exists():  # a resumed run re-reaching a step it snapshotted before
                if step in pinned_steps(run):  # a miner reads it: it stays, and the new copy is dropped
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    shutil.rmtree(final)
            if tmp.exists():
                os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with pins_locked(run):  # the lease is read and the snapshots pruned with no pin in between
        pinned = pinned_steps(run)
        for old in list_snapshots(run)[:-keep] if keep > 0 else []:
            if old.step not in pinned:
                shutil.rmtree(old.path, ignore_errors=True)
    return final


@contextmanager
def pins_locked(run: str | Path):
    """Hold the run's pin lock (``RUN/refresh/pins.lock``, flock) for the block: a miner pinning a snapshot
    and the trainer pruning or replacing snapshots never interleave (check-then-act on both sides)."""
    import fcntl

    paths = RunPaths(Path(run))
    paths.refresh.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.refresh / "pins.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def pin_snapshot(run: str | Path, step: int | None) -> bool:
    """The miner's lease on the snapshot of ``step`` (None: release it); returns whether the snapshot is
    there, pinned (False: it was pruned before the pin, and nothing is pinned). Taken under the pin lock, so
    the trainer prunes either before the pin (the miner sees it gone) or after (it sees the pin). One miner
    serves a run, so one lease file; it names the miner's process, so a lease of a miner that died is
    ignored."""
    lease = RunPaths(Path(run)).lease
    with pins_locked(run):
        if step is None:
            lease.unlink(missing_ok=True)
            return True
        if not (snapshot_folder(run) / f"step-{step:07d}" / META).is_file():
            return False
        write_json(lease, {"step": int(step), "pid": os.getpid(), "host": HOST, "time": time.time()})
        return True


def pinned_steps(run: str | Path) -> set[int]:
    """Snapshot steps a live miner holds a lease on (see :func:`pin_snapshot`). A lease file that is not
    one (crafted, damaged) pins nothing: the trainer reads it at every snapshot and must never stop on it."""
    lease = read_record_or_none(RunPaths(Path(run)).lease, Lease)
    if lease is None or writer_gone(lease.host, lease.pid, lease.time):
        return set()
    return {lease.step}


def verify_snapshot(snapshot: Snapshot) -> None:
    """Refuse a snapshot whose weight files no longer hash to the ``weights_sha256`` it was written with
    (a flipped byte, a truncated or replaced file): reads every weight file."""
    recorded = snapshot.meta.get("weights_sha256")
    actual = weights_digest(snapshot.path)[0]
    if not isinstance(recorded, str) or actual != recorded:
        raise SnapshotError(f"{snapshot.path}: the weight files do not match the SHA-256 recorded in {META} "
                            f"({str(recorded)[:12]}... recorded, {actual[:12]}... on disk); the snapshot is corrupt")


# What a snapshot's record must share with the student it is loaded into: the backbone, how it pools and
# how long its inputs are. (LoRA's shape is checked by loading: an adapter of another r does not fit.)
_SAME = ("model", "pooling", "normalize", "max_query_length", "max_positive_length", "attn_implementation")


def snapshot_encoder(snapshot: Snapshot, student: EncoderConfig) -> EncoderConfig:
    """The encoder ``snapshot``'s weights are loaded into: ``student`` (the run's own, as the reading
    command settled it, ``trust_remote_code`` included), once the snapshot's record agrees with it on
    :data:`_SAME`; :class:`SnapshotError` naming the first difference otherwise. So a ``snapshot.json``
    edited to name another model folder, or to ask for remote code, loads nothing. The LoRA shape (r,
    alpha, target modules) is the snapshot's: it describes the adapter file, and loading checks that the
    file fits it."""
    from ..encoder import resolve_model, settled

    recorded, want = snapshot.encoder_config, settled(student)
    if resolve_model(recorded.model) == resolve_model(want.model):  # only then is its folder read (settled)
        recorded = settled(recorded)
    for key in _SAME:
        a, b = getattr(recorded, key), getattr(want, key)
        if key == "model":
            a, b = resolve_model(a), resolve_model(b)
        if a != b:
            raise SnapshotError(f"{snapshot.path}: written for a student with {key} {a!r}, but this run's student "
                                f"has {b!r}; the snapshot is not this run's")
    return dataclasses.replace(want, model=student.model, lora=recorded.lora)  # the model as the run names it


def load_snapshot_encoder(snapshot: Snapshot, student: EncoderConfig | None = None,
                          device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """The student of ``snapshot`` as a frozen :class:`b3stream.encoder.Encoder` in eval mode, built as
    ``student`` says (:func:`snapshot_encoder`; None: as the snapshot records, without remote code, for
    a snapshot of your own); a snapshot whose files do not load is a :class:`SnapshotError`."""
    from safetensors import SafetensorError

    cfg = snapshot.encoder_config if student is None else snapshot_encoder(snapshot, student)
    try:
        return _load_snapshot_encoder(snapshot, cfg, device, dtype)
    except SnapshotError:
        raise
    except (SafetensorError, OSError, KeyError, RuntimeError, ValueError) as e:
        raise SnapshotError(f"{snapshot.path}: the snapshot does not load ({type(e).__name__}: {e})") from None


def _load_snapshot_encoder(snapshot: Snapshot, cfg: EncoderConfig, device, dtype):
    if snapshot.meta["kind"] == "lora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        encoder = Encoder(cfg, trainable=True, dtype=torch.float32)
        weights = load_file(str(snapshot.path / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(encoder.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise SnapshotError(f"{snapshot.path}: adapter does not fit the model ({result.unexpected_keys[:3]} ...)")
        # Adapter weights the file lacks would stay at their initialisation (LoRA B = 0: the base model)
        # and the refresh would silently embed with the base model; base weights are not in an adapter.
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k or "modules_to_save" in k]
        if missing:
            raise SnapshotError(f"{snapshot.path}: the adapter lacks {len(missing)} of the student's adapter "
                                f"weights ({missing[0]}, ...)")
    else:
        from safetensors.torch import load_model

        encoder = Encoder(dataclasses.replace(cfg, lora=LoraConfig(enabled=False)), trainable=False,
                          dtype=torch.float32)
        load_model(encoder.model, str(snapshot.path / "model.safetensors"))
    encoder.model.requires_grad_(False)
    encoder.model.eval()
    if dtype is not None:
        encoder.to(dtype)
    if device is not None:
        encoder.to(device)
    return encoder

