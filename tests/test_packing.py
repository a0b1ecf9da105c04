"""Packing documents into BOS-led sequences, against an independent reference.

The reference below is written from the spec in `gemmascope/harvest/packing.py`'s
docstring, one token at a time in plain Python, and shares no code with `pack`.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from gemmascope.harvest.packing import (
    ROLE_BOS,
    ROLE_EOS,
    ROLE_PAD,
    ROLE_TEXT,
    pack,
    tokenize_and_pack,
)

BOS, EOS, PAD = 2, 1, 0


def reference_pack(documents, context_length, *, bos, eos, pad):
    """(ids, document, role) as lists of lists, straight from the spec."""
    stream = []  # (token, document index, role)
    for d, doc in enumerate(documents):
        for token in doc:
            stream.append((token, d, ROLE_TEXT))
        stream.append((eos, d, ROLE_EOS))
    body = context_length - 1
    ids, docs, roles = [], [], []
    for start in range(0, len(stream), body):
        piece = stream[start:start + body]
        while len(piece) < body:
            piece.append((pad, -1, ROLE_PAD))
        ids.append([bos] + [t for t, _, _ in piece])
        docs.append([-1] + [d for _, d, _ in piece])
        roles.append([ROLE_BOS] + [r for _, _, r in piece])
    return ids, docs, roles


def check_against_reference(documents, context_length, bos=BOS, eos=EOS, pad=PAD):
    packed = pack(documents, context_length, bos=bos, eos=eos, pad=pad)
    ids, docs, roles = reference_pack(documents, context_length, bos=bos, eos=eos, pad=pad)
    n = len(ids)
    assert packed.input_ids.shape == (n, context_length)
    assert packed.document.shape == (n, context_length)
    assert packed.role.shape == (n, context_length)
    assert packed.input_ids.dtype == np.int32
    assert packed.document.dtype == np.int32
    assert packed.role.dtype == np.int8
    assert packed.input_ids.tolist() == ids
    assert packed.document.tolist() == docs
    assert packed.role.tolist() == roles
    assert packed.n_documents == len(documents)
    # Rows per sequence: the text positions, counted independently.
    expected_rows = [sum(r == ROLE_TEXT for r in row) for row in roles]
    assert packed.rows_per_sequence.tolist() == expected_rows
    assert packed.rows_per_sequence.dtype == np.int64
    assert packed.keep.tolist() == [[r == ROLE_TEXT for r in row] for row in roles]
    assert int(packed.rows_per_sequence.sum()) == sum(len(d) for d in documents)
    return packed


def random_documents(rng: random.Random) -> list[list[int]]:
    n_docs = rng.choice([0, 1, 2, 3, 5, 8, 13])
    max_len = rng.choice([1, 3, 10, 40])
    # Token ids above the special ids so text and special tokens are distinguishable.
    return [
        [rng.randrange(3, 50_000) for _ in range(rng.randint(0, max_len))]
        for _ in range(n_docs)
    ]


@pytest.mark.parametrize("seed", range(200))
def test_pack_matches_reference_on_random_documents(seed):
    rng = random.Random(seed)
    documents = random_documents(rng)
    context_length = rng.choice([2, 3, 4, 7, 16, 33])
    check_against_reference(documents, context_length)


def test_empty_document_list_gives_no_sequences():
    packed = check_against_reference([], 8)
    assert packed.input_ids.shape == (0, 8)
    assert packed.rows_per_sequence.tolist() == []
    assert packed.n_documents == 0


def test_single_one_token_document():
    packed = check_against_reference([[77]], 5)
    assert packed.input_ids.tolist() == [[BOS, 77, EOS, PAD, PAD]]
    assert packed.document.tolist() == [[-1, 0, 0, -1, -1]]
    assert packed.role.tolist() == [[ROLE_BOS, ROLE_TEXT, ROLE_EOS, ROLE_PAD, ROLE_PAD]]
    assert packed.rows_per_sequence.tolist() == [1]


def test_documents_exactly_filling_sequences_need_no_padding():
    # context_length 5 -> 4 stream tokens per sequence; each doc + EOS is 4 tokens.
    documents = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]
    packed = check_against_reference(documents, 5)
    assert packed.input_ids.tolist() == [
        [BOS, 10, 11, 12, EOS],
        [BOS, 20, 21, 22, EOS],
        [BOS, 30, 31, 32, EOS],
    ]
    assert not (packed.role == ROLE_PAD).any()
    assert packed.rows_per_sequence.tolist() == [3, 3, 3]


def test_document_spanning_sequences_keeps_its_index():
    packed = check_against_reference([[5, 6, 7, 8, 9, 10, 11], [12]], 4)
    assert packed.input_ids.tolist() == [
        [BOS, 5, 6, 7],
        [BOS, 8, 9, 10],
        [BOS, 11, EOS, 12],
        [BOS, EOS, PAD, PAD],
    ]
    assert packed.document.tolist() == [
        [-1, 0, 0, 0],
        [-1, 0, 0, 0],
        [-1, 0, 0, 1],
        [-1, 1, -1, -1],
    ]
    assert packed.rows_per_sequence.tolist() == [3, 3, 2, 0]


def test_context_length_two_puts_one_stream_token_per_sequence():
    packed = check_against_reference([[40, 41], [42]], 2)
    assert packed.input_ids.tolist() == [[BOS, 40], [BOS, 41], [BOS, EOS], [BOS, 42], [BOS, EOS]]
    assert packed.role[:, 1].tolist() == [ROLE_TEXT, ROLE_TEXT, ROLE_EOS, ROLE_TEXT, ROLE_EOS]
    assert packed.document[:, 1].tolist() == [0, 0, 0, 1, 1]
    assert packed.rows_per_sequence.tolist() == [1, 1, 0, 1, 0]


def test_empty_documents_still_get_their_eos():
    # `pack` itself keeps empty documents (tokenize_and_pack drops them first).
    packed = check_against_reference([[], [9], []], 8)
    assert packed.input_ids.tolist() == [[BOS, EOS, 9, EOS, EOS, PAD, PAD, PAD]]
    assert packed.document.tolist() == [[-1, 0, 1, 1, 2, -1, -1, -1]]
    assert packed.rows_per_sequence.tolist() == [1]


def test_special_token_ids_inside_text_keep_the_text_role():
    # A document containing the EOS, BOS and pad ids as text: masked by role, not by id.
    documents = [[EOS, BOS, PAD, 100], [BOS]]
    packed = check_against_reference(documents, 6)
    assert packed.input_ids.tolist() == [[BOS, EOS, BOS, PAD, 100, EOS], [BOS, BOS, EOS, PAD, PAD, PAD]]
    assert packed.role.tolist() == [
        [ROLE_BOS, ROLE_TEXT, ROLE_TEXT, ROLE_TEXT, ROLE_TEXT, ROLE_EOS],
        [ROLE_BOS, ROLE_TEXT, ROLE_EOS, ROLE_PAD, ROLE_PAD, ROLE_PAD],
    ]
    assert packed.keep.tolist() == [
        [False, True, True, True, True, False],
        [False, True, False, False, False, False],
    ]
    assert packed.rows_per_sequence.tolist() == [4, 1]


def test_pad_equal_to_eos_is_still_masked_by_role():
    # Tokenizers without a pad token pad with EOS; roles must still tell them apart.
    packed = check_against_reference([[7, 8, 9]], 8, pad=EOS)
    assert packed.input_ids.tolist() == [[BOS, 7, 8, 9, EOS, EOS, EOS, EOS]]
    assert packed.role.tolist() == [[ROLE_BOS, 0, 0, 0, ROLE_EOS, ROLE_PAD, ROLE_PAD, ROLE_PAD]]


class CharTokenizer:
    """A tiny tokenizer (a test input): one token per character, ids = ord(c) + 10."""

    bos_token_id = 2
    eos_token_id = 1

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id
        self.calls = []

    def __call__(self, texts, add_special_tokens, split_special_tokens):
        self.calls.append((list(texts), add_special_tokens, split_special_tokens))
        return {"input_ids": [[ord(c) + 10 for c in text] for text in texts]}


def test_tokenize_and_pack_drops_empty_documents_and_uses_tokenizer_ids():
    tokenizer = CharTokenizer(pad_token_id=0)
    packed = tokenize_and_pack(tokenizer, ["ab", "", "c"], 4)
    assert tokenizer.calls == [(["ab", "", "c"], False, True)]
    a, b, c = ord("a") + 10, ord("b") + 10, ord("c") + 10
    assert packed.input_ids.tolist() == [[2, a, b, 1], [2, c, 1, 0]]
    assert packed.document.tolist() == [[-1, 0, 0, 0], [-1, 1, 1, -1]]
    assert packed.n_documents == 2


def test_tokenize_and_pack_pads_with_eos_when_tokenizer_has_no_pad():
    tokenizer = CharTokenizer(pad_token_id=None)
    packed = tokenize_and_pack(tokenizer, ["a"], 5)
    assert packed.input_ids.tolist() == [[2, ord("a") + 10, 1, 1, 1]]
    assert packed.role.tolist() == [[ROLE_BOS, ROLE_TEXT, ROLE_EOS, ROLE_PAD, ROLE_PAD]]


def test_tokenize_and_pack_of_no_texts_does_not_call_tokenizer():
    tokenizer = CharTokenizer(pad_token_id=0)
    packed = tokenize_and_pack(tokenizer, [], 4)
    assert tokenizer.calls == []
    assert packed.input_ids.shape == (0, 4)
