"""Checkpoints that load no code: resuming a run unpickles nothing but tensors and plain data.

DeepSpeed reads every checkpoint file of a run (``mp_rank_*_model_states.pt``, ``*_optim_states.pt``)
through its checkpoint engine, whose ``torch.load`` passes ``weights_only=False``: a file planted in
``RUN/checkpoints/`` would run any code it likes on resume. :class:`WeightsOnlyCheckpointEngine` replaces
that engine's reader with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, allowing
beyond tensors and containers only the few DeepSpeed classes its ZeRO optimizer states hold (their values
are set as attributes; no constructor or method of theirs runs). A file that needs anything else is refused
with the file and the class named. The sampler's position is saved as tensors and lists
(:func:`portable`), so no numpy class is needed either.
"""

from __future__ import annotations

import pickle

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from ..data.manifest import DataError


class CheckpointError(DataError):
    """A checkpoint file that would need more than the restricted unpickler allows, or does not load."""


def allowed_globals() -> list:
    """The classes DeepSpeed 0.19 writes into ZeRO optimizer states (found by
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints of ZeRO 0-3, LoRA and full)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None):
    """``torch.load`` with the restricted unpickler and :func:`allowed_globals`."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            raise CheckpointError(
                f"{path}: refused to load: it holds objects that could run code when unpickled ({', '.join(found)}). "
                "b3stream resumes only from checkpoints it wrote; if you trust this file, load it yourself") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise CheckpointError(f"{path}: the checkpoint does not load ({e})") from None


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading with the restricted unpickler (writing as before)."""

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location=map_location)


def weights_only_engine(engine) -> None:
    """Make ``engine`` (a DeepSpeed engine) read its checkpoints with :func:`load_weights_only`."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"the DeepSpeed checkpoint engine {type(current).__name__} is not supported: b3stream "
                              "loads checkpoints only through the torch engine, with weights_only=True")
    # The engine DeepSpeed configured, kept as it is (its settings and state); only the class, and so the
    # reader, changes: the subclass adds no state of its own.
    current.__class__ = WeightsOnlyCheckpointEngine


def portable(value):
    """``value`` (the sampler's state) with numpy arrays and scalars as tensors and Python numbers, which the
    restricted unpickler reads without allowing any numpy class."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v) for v in value)
    return value

