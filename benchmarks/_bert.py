"""The BERT-style encoder the transformer benchmarks measure: a Hugging Face ``BertModel`` built from a
config (random weights, nothing downloaded), one tensor out so every runtime returns the same thing."""

from __future__ import annotations

from typing import Any


def bert_encoder(layers: int, hidden: int, seq_len: int, *, mean_pool: bool = False) -> Any:
    """``input_ids -> last_hidden_state`` (or its mean over the sequence: one embedding per sequence);
    64-wide heads, FFN 4 x hidden, vocabulary 8000, seeded, in eval mode."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    class Encoder(nn.Module):
        def __init__(self, bert: nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            hidden_states = self.bert(input_ids=input_ids).last_hidden_state
            return hidden_states.mean(dim=1) if mean_pool else hidden_states

    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        vocab_size=8000,
        max_position_embeddings=max(512, seq_len),
    )
    torch.manual_seed(0)
    return Encoder(BertModel(config).eval()).eval()
