"""Needle-in-a-haystack and passkey generators: layout, depths, labels, determinism, errors."""

import pytest
import torch

from memorycore import InputError
from memorycore.tasks import (ANSWER, NEEDLE, QUERY, answer_accuracy, needle_batch, passkey_batch,
                              token_ranges)


def test_a_needle_holds_its_key_and_value_and_the_question_asks_for_it():
    inputs, labels = needle_batch(8, 64, value_len=3, vocab_size=64, random_state=0)
    assert inputs.shape == labels.shape == (8, 64)
    for row, label in zip(inputs, labels):
        start = int((row == NEEDLE).nonzero()[0])
        key, value = row[start + 1], row[start + 2:start + 5]
        assert row[-6].item() == QUERY and row[-5] == key and row[-4].item() == ANSWER
        assert torch.equal(row[-3:], value)
        # each answer token is the label of the position before it, nothing else is labelled
        assert torch.equal(label[-4:-1], value) and bool((label[:-4] == -100).all()) and label[-1] == -100


def test_token_ranges_do_not_overlap():
    ranges = token_ranges(256)
    (key_low, key_high), (filler_low, filler_high), (value_low, value_high) = (
        ranges["keys"], ranges["filler"], ranges["values"])
    assert ANSWER < key_low < key_high <= filler_low < filler_high <= value_low < value_high == 256
    inputs, _ = needle_batch(4, 200, vocab_size=256, random_state=1)
    haystack = inputs[:, :-7]
    assert bool(((haystack >= filler_low) & (haystack < filler_high) | (haystack < value_high)).all())


def test_depths_spread_evenly_from_first_to_last():
    inputs, _ = needle_batch(5, 103, value_len=2, vocab_size=64, random_state=0)
    starts = [int((row == NEEDLE).nonzero()[0]) for row in inputs]
    assert starts[0] == 0 and starts == sorted(starts)
    assert starts[-1] >= 103 - 5 - 2 * 4  # the last one ends next to the question
    fixed, _ = needle_batch(3, 103, value_len=2, vocab_size=64, depth=0.5, random_state=0)
    assert len({int((row == NEEDLE).nonzero()[0]) for row in fixed}) == 1


def test_several_needles_have_distinct_keys_and_one_is_asked():
    inputs, _ = needle_batch(16, 128, num_needles=4, value_len=2, vocab_size=64, random_state=2)
    for row in inputs:
        starts = (row[:-5] == NEEDLE).nonzero().flatten()
        assert len(starts) == 4
        keys = row[starts + 1]
        assert len(set(keys.tolist())) == 4 and int(row[-4]) in keys.tolist()


def test_passkey_repeats_one_filler_phrase_and_uses_one_key():
    inputs, _ = passkey_batch(6, 96, vocab_size=64, random_state=3)
    assert len({int(row[int((row == NEEDLE).nonzero()[0]) + 1]) for row in inputs}) == 1
    row = inputs[0]
    start = int((row == NEEDLE).nonzero()[0])
    haystack = torch.cat([row[:start], row[start + 7:-8]])
    assert len(set(haystack.tolist())) <= 16


def test_the_same_seed_gives_the_same_sequences():
    a, b = needle_batch(4, 64, vocab_size=64, random_state=7), needle_batch(4, 64, vocab_size=64, random_state=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_answer_accuracy_counts_whole_answers():
    labels = torch.full((2, 5), -100)
    labels[:, 2:4] = torch.tensor([[7, 8], [7, 8]])
    logits = torch.zeros(2, 5, 10)
    logits[0, 2, 7] = logits[0, 3, 8] = 1.0  # the first answer right
    logits[1, 2, 7] = logits[1, 3, 9] = 1.0  # the second half right
    assert answer_accuracy(logits, labels) == 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 10}, "too short"), ({"depth": 1.5}, "depth"), ({"filler": "lorem"}, "filler"),
    ({"vocab_size": 8}, "vocab_size"), ({"num_needles": 0}, "num_needles"),
    ({"num_needles": 2, "fixed_key": True}, "fixed_key"), ({"num_needles": 40, "vocab_size": 64, "seq_len": 1000}, "keys"),
])
def test_bad_settings_say_what_to_fix(kwargs, match):
    settings = {"num_examples": 2, "seq_len": 64, **kwargs}
    with pytest.raises(InputError, match=match):
        needle_batch(**settings)
