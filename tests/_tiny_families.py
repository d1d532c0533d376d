"""Tiny random configs of every registered model family, sharing one small WordPiece tokenizer's special ids."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

# model_type -> one registered family each, and XLM-RoBERTa as the second member of RoBERTa's
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "modernbert", "mpnet")

# The ids of tests/conftest.py's tokenizer: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4.
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)


def tiny_config(model_type: str, vocab_size: int = 100, max_positions: int = 130, **extra: Any):
    """A 2-layer, 32-wide config of `model_type` (DeBERTa with relative attention and unshared position keys, so
    that its pos_key_proj / pos_query_proj Linears exist)."""
    if model_type == "distilbert":
        return AutoConfig.for_model(model_type, vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                    max_position_embeddings=max_positions, pad_token_id=0, **extra)
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=max_positions, **SPECIAL_IDS, **extra)
    if model_type == "modernbert":
        return AutoConfig.for_model(model_type, cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=2,
                                    local_attention=16, **common)
    if model_type == "electra":
        return AutoConfig.for_model(model_type, embedding_size=16, **common)
    if model_type == "deberta-v2":
        return AutoConfig.for_model(model_type, relative_attention=True, position_buckets=16, max_relative_positions=32,
                                    pos_att_type=["p2c", "c2p"], share_att_key=False, type_vocab_size=2,
                                    **common)
    return AutoConfig.for_model(model_type, **common)
