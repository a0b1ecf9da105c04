"""Tokenise documents and pack them into fixed-length sequences that start with BOS.

Documents are tokenised without special tokens, each followed by EOS, concatenated into
one stream, and cut into `context_length - 1` token pieces, each prefixed with BOS; the
last sequence is right-padded. Every position carries a role, so BOS, EOS and padding
are masked by what they are, not by their token id (a document may contain "<eos>"
as text). Right padding under causal attention cannot change earlier positions, so
sequences need no attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROLE_TEXT, ROLE_BOS, ROLE_EOS, ROLE_PAD = 0, 1, 2, 3


@dataclass(frozen=True)
class PackedSequences:
    input_ids: np.ndarray  # int32 [n_sequences, context_length]
    document: np.ndarray  # int32 [n_sequences, context_length], shard-local; -1 for BOS and padding
    role: np.ndarray  # int8 [n_sequences, context_length]
    n_documents: int

    @property
    def keep(self) -> np.ndarray:
        """Positions whose activations are stored."""
        return self.role == ROLE_TEXT

    @property
    def rows_per_sequence(self) -> np.ndarray:
        return self.keep.sum(axis=1, dtype=np.int64)


def pack(
    documents: list[list[int]], context_length: int, *, bos: int, eos: int, pad: int
) -> PackedSequences:
    lengths = np.fromiter((len(d) + 1 for d in documents), dtype=np.int64, count=len(documents))
    total = int(lengths.sum())
    stream = np.empty(total, dtype=np.int32)
    stream_doc = np.repeat(np.arange(len(documents), dtype=np.int32), lengths)
    stream_role = np.full(total, ROLE_TEXT, dtype=np.int8)
    ends = np.cumsum(lengths)
    for doc, end in zip(documents, ends, strict=True):
        stream[end - len(doc) - 1:end - 1] = doc
    stream[ends - 1] = eos
    stream_role[ends - 1] = ROLE_EOS

    body = context_length - 1
    n_sequences = -(-total // body)
    shape = (n_sequences, body)

    def fill(values: np.ndarray, filler: int, dtype: type) -> np.ndarray:
        out = np.full(n_sequences * body, filler, dtype=dtype)
        out[:total] = values
        return out.reshape(shape)

    ids = np.empty((n_sequences, context_length), dtype=np.int32)
    document = np.full((n_sequences, context_length), -1, dtype=np.int32)
    role = np.empty((n_sequences, context_length), dtype=np.int8)
    ids[:, 0], role[:, 0] = bos, ROLE_BOS
    ids[:, 1:] = fill(stream, pad, np.int32)
    document[:, 1:] = fill(stream_doc, -1, np.int32)
    role[:, 1:] = fill(stream_role, ROLE_PAD, np.int8)
    return PackedSequences(ids, document, role, len(documents))


def tokenize_and_pack(tokenizer, texts: list[str], context_length: int) -> PackedSequences:
    """Tokenise with the model's tokenizer (no special tokens) and pack."""
    if texts:
        encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    else:
        encoded = []
    encoded = [d for d in encoded if d]
    return pack(
        encoded,
        context_length,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
