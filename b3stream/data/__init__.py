"""Data layer: source files -> WebDataset shards with dense ids + manifest; readers by id and streaming."""

from .manifest import DataError, Manifest, check_stamp
from .reader import ShardedDataset
from .sources import FieldMap

__all__ = ["DataError", "FieldMap", "Manifest", "ShardedDataset", "check_stamp"]
