"""Data: the memory-mapped indexed format (writer, reader, verify), the token-budget batch sampler
and the padding/packing collates."""

from torchkiln.data.collate import PackedBlocks, PadCollate, block_causal_mask, packed_collate, pad_collate
from torchkiln.data.indexed import (
    DatasetFormatError,
    Field,
    IndexedDataset,
    IndexedDatasetWriter,
    SampleBatch,
    collate_samples,
    is_indexed_dataset,
    verify_indexed_dataset,
    write_indexed_dataset,
)
from torchkiln.data.sampler import TokenBudgetSampler, padding_efficiency

__all__ = [
    "DatasetFormatError",
    "Field",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "SampleBatch",
    "collate_samples",
    "is_indexed_dataset",
    "verify_indexed_dataset",
    "write_indexed_dataset",
    "PackedBlocks",
    "PadCollate",
    "TokenBudgetSampler",
    "block_causal_mask",
    "packed_collate",
    "pad_collate",
    "padding_efficiency",
]
