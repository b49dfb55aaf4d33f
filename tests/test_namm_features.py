"""NAMM's features and scorer: the spectrogram against a direct STFT, the backward mask, save/load."""

import math

import pytest
import torch

from memorycore import CheckpointError, InputError
from memorycore.attention import KVCache
from memorycore.namm import BAMScorer, NAMMPress, SpectrogramFeatures
from memorycore.namm.features import recency_embedding


def direct_features(history: torch.Tensor, entry_position: int, features: SpectrogramFeatures) -> torch.Tensor:
    """The bias-corrected EMA of ``torch.stft`` magnitudes of one entry's whole attention series ``[queries]``."""
    padded = torch.cat([torch.zeros(features.n_fft - features.hop, dtype=history.dtype), history])
    spectra = torch.stft(padded, n_fft=features.n_fft, hop_length=features.hop, center=False,
                         window=torch.hann_window(features.n_fft, dtype=history.dtype), return_complex=True).abs()
    frame_ends = [features.hop * (f + 1) - 1 for f in range(spectra.shape[1])]  # the query each frame ends at
    ema, count = torch.zeros(features.bins, dtype=history.dtype), 0
    for frame, end in enumerate(frame_ends):
        if end >= entry_position:  # frames before the entry existed do not count
            ema = features.decay * ema + (1 - features.decay) * spectra[:, frame]
            count += 1
    return ema / (1 - features.decay ** count) if count else ema


@pytest.mark.parametrize("pieces", [[80], [16, 16, 48], [1] * 7 + [30, 43], [5, 50, 25]])
def test_spectrogram_features_equal_a_direct_stft(pieces):
    features = SpectrogramFeatures()
    queries, entries = sum(pieces), 6
    entry_positions = torch.tensor([0, 3, 10, 17, 40, 64])
    attention = torch.rand(queries, entries, dtype=torch.float64)
    attention[torch.arange(queries)[:, None] < entry_positions] = 0  # causal: no attention before an entry exists
    cache = KVCache(torch.zeros(1, 1, entries, 2), torch.zeros(1, 1, entries, 2), entry_positions.view(1, 1, -1),
                    torch.ones(1, 1, entries, dtype=torch.bool))
    end = 0
    for piece in pieces:
        end += piece
        cache = features.observe(cache, attention[end - piece:end][None, None].float(), end)
    got = features.of(cache, queries)[0, 0, :, :features.bins].double()
    for entry in range(entries):
        expected = direct_features(attention[:, entry], int(entry_positions[entry]), features)
        torch.testing.assert_close(got[entry], expected, rtol=1e-4, atol=1e-5)


def test_recency_embedding_is_sinusoidal_in_the_age():
    age = torch.tensor([0.0, 1.0, 100.0])
    embedding = recency_embedding(age, 8)
    assert embedding.shape == (3, 8)
    torch.testing.assert_close(embedding[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(embedding[2, 1], torch.tensor(math.sin(100 * 0.1)))


def test_bam_mask_is_backward():
    """A token's score depends on itself and newer tokens only: changing an older token leaves it alone."""
    scorer = BAMScorer(hidden=8)
    scorer.load_vector(0.3 * torch.randn(scorer.num_parameters))  # small weights: no saturated softmax
    features = torch.randn(1, 1, 10, scorer.features.width)
    positions, valid = torch.arange(10).view(1, 1, 10), torch.ones(1, 1, 10, dtype=torch.bool)
    base = scorer(features, positions, valid)
    changed = features.clone()
    changed[..., 6, :] += 3.0
    scores = scorer(changed, positions, valid)
    torch.testing.assert_close(scores[..., 7:], base[..., 7:])  # newer than the change: untouched
    assert (scores[..., :7] - base[..., :7]).abs().min() > 0  # itself and older: all moved
    # entries out of time order are masked by position, not by index
    order = torch.randperm(10)
    shuffled = scorer(features[..., order, :], positions[..., order], valid)
    torch.testing.assert_close(shuffled, base[..., order])


def test_padding_does_not_reach_valid_scores():
    scorer = BAMScorer(hidden=8).load_vector(torch.randn(BAMScorer(hidden=8).num_parameters))
    features = torch.randn(1, 2, 6, scorer.features.width)
    positions = torch.tensor([0, 1, 2, 3, 0, 0]).expand(1, 2, 6)
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6]).view(1, 2, 6)
    padded = features.clone()
    padded[0, 0, 4:] = 100.0
    assert torch.equal(scorer(features, positions, valid)[0, 0, :4], scorer(padded, positions, valid)[0, 0, :4])


def test_untrained_scorer_keeps_everything_and_has_zero_parameters():
    scorer = BAMScorer()
    assert scorer.hidden == 32 and scorer.features.bins == 17 and scorer.features.width == 25
    assert torch.count_nonzero(scorer.vector()) == 0
    assert torch.equal(scorer(torch.randn(1, 1, 5, 25), torch.arange(5).view(1, 1, 5),
                              torch.ones(1, 1, 5, dtype=torch.bool)), torch.zeros(1, 1, 5))


def test_scorer_round_trips_through_safetensors(tmp_path):
    scorer = BAMScorer(hidden=4, features=SpectrogramFeatures(n_fft=16, hop=8))
    scorer.load_vector(torch.randn(scorer.num_parameters))
    path = scorer.save(tmp_path / "namm.safetensors")
    loaded = BAMScorer.load(path)
    assert loaded.config() == scorer.config() and torch.equal(loaded.vector(), scorer.vector())
    assert isinstance(NAMMPress(path).scorer, BAMScorer)


def test_bad_scorer_input_raises_input_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        NAMMPress(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="n_fft must be an even integer"):
        BAMScorer(features=SpectrogramFeatures(n_fft=7))
    with pytest.raises(InputError, match="has 3585 parameters"):
        BAMScorer().load_vector(torch.zeros(5))
    with pytest.raises(InputError, match="scorer must be a BAMScorer"):
        NAMMPress(scorer=42)


def test_scores_computed_in_blocks_of_rows_equal_one_block():
    scorer = BAMScorer(hidden=8)
    scorer.load_vector(0.3 * torch.randn(scorer.num_parameters))
    features = torch.randn(2, 3, 11, scorer.features.width)
    positions = torch.randperm(11).expand(2, 3, 11)
    valid = torch.rand(2, 3, 11) > 0.2
    whole = scorer(features, positions, valid)
    scorer.row_block = 3
    torch.testing.assert_close(scorer(features, positions, valid), whole)


def test_namm_keeps_exactly_the_entries_scored_non_negative_and_the_newest():
    torch.manual_seed(2)
    scorer = BAMScorer(hidden=8)
    scorer.load_vector(0.5 * torch.randn(scorer.num_parameters))
    press = NAMMPress(scorer, interval=24)
    entries = 24
    cache = KVCache(torch.randn(1, 2, entries, 4), torch.randn(1, 2, entries, 4),
                    torch.arange(entries).expand(1, 2, entries).clone(), torch.ones(1, 2, entries, dtype=torch.bool))
    attention = torch.softmax(torch.randn(1, 2, entries, entries), -1).tril()  # queries 0..23
    observed = press.observe(cache, attention, entries)
    scores = scorer.score(observed, entries)
    pressed = press.compress("layer", cache, attention)
    for head in range(2):
        expected = {p for p in range(entries) if scores[0, head, p] >= 0} | {entries - 1}
        assert set(pressed.positions[0, head][pressed.valid[0, head]].tolist()) == expected
    assert 0 < int(pressed.lengths.sum()) < 2 * entries  # the draw evicts some and keeps some
