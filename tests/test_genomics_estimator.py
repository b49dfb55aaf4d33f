"""DNAClassifier and its network: padding and batching invariances, strand symmetry, learning, persistence."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from genomics import DNAClassifier, reverse_complement
from genomics.data import encode, pad_tokens
from genomics.model import DNANetConfig, DNANetwork, KmerEmbedding, reverse_complement_batch
from memorycore import CheckpointError, InputError

TINY = dict(dim=16, blocks=1, heads=2, chunk_size=8, stem_kernel=8, kmer_sizes=(2, 3), batch_size=32, lr=2e-2,
            verbose=False, device="cpu")


def motif_task(n, length=48, seed=0):
    """Random DNA; class 1 carries the motif TATAAAAG somewhere, class 0 does not."""
    rng = np.random.default_rng(seed)
    sequences, labels = [], []
    for i in range(n):
        bases = list(rng.choice(list("ACGT"), length))
        if i % 2:
            start = rng.integers(0, length - 8)
            bases[start:start + 8] = "TATAAAAG"
        sequences.append("".join(bases))
        labels.append("motif" if i % 2 else "background")
    return sequences, labels


@pytest.fixture(scope="module")
def fitted():
    sequences, labels = motif_task(240)
    return DNAClassifier(epochs=8, validation_fraction=0.0, **TINY).fit(sequences, labels)


def build_network(num_classes: int, **params) -> DNANetwork:
    """The network DNAClassifier(**params) builds for ``num_classes``."""
    return DNANetwork(DNANetConfig.from_params(DNAClassifier(**params).get_params(), num_classes=num_classes))

def test_learns_a_motif_to_high_accuracy(fitted):
    sequences, labels = motif_task(100, seed=1)
    assert fitted.history_.train_loss[-1] < 0.5 * fitted.history_.train_loss[0]
    assert fitted.score(sequences, labels) >= 0.9
    assert list(fitted.classes_) == ["background", "motif"]


def test_predict_proba_rows_sum_to_one_and_match_predict(fitted):
    sequences, _ = motif_task(30, seed=2)
    proba = fitted.predict_proba(sequences)
    assert proba.shape == (30, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert (fitted.predict(sequences) == fitted.classes_[proba.argmax(axis=1)]).all()


def test_prediction_does_not_depend_on_batch_companions(fitted):
    short, long_ = "ACGTTATAAAAGCA", motif_task(1, seed=3)[0][0]
    alone = fitted.predict_proba([short])
    together = fitted.predict_proba([long_, short, long_[:20]])
    np.testing.assert_allclose(alone[0], together[1], atol=1e-6)
    # a batch narrower than the longest k-mer (3 here) less one, and the same sequence beside a long one
    np.testing.assert_allclose(fitted.predict_proba(["A"]), fitted.predict_proba(["A", long_])[:1], atol=1e-6)


@pytest.mark.parametrize("bidirectional, kmer_sizes", [(False, ()), (True, ()), (True, (1, 3))])
def test_network_ignores_padding(bidirectional, kmer_sizes):
    network = build_network(3, dim=16, blocks=2, heads=2, chunk_size=4, bidirectional=bidirectional,
                         kmer_sizes=kmer_sizes).eval()
    tokens = torch.from_numpy(pad_tokens([encode("ACGTACGTTGCAAC")], 14)[0])
    padded = torch.from_numpy(pad_tokens([encode("ACGTACGTTGCAAC")], 40)[0])
    lengths = torch.tensor([14])
    with torch.no_grad():
        torch.testing.assert_close(network(tokens, lengths), network(padded, lengths))


def test_kmer_embedding_indexes_overlapping_kmers():
    embedding = KmerEmbedding((2,), 1)
    with torch.no_grad():
        embedding.tables[0].weight.copy_(torch.arange(18.0)[:, None])  # row i holds i; 16: has an N; 17: padding
    embedding.tables[0].weight.data[17] = 0.0
    tokens = torch.from_numpy(pad_tokens([encode("ACGNTA"), encode("TTG")], 8)[0])
    out = embedding(tokens, torch.tensor([6, 3]))[..., 0]
    # AC=0*4+1, CG=1*4+2, GN and NT hold an N, TA=3*4+0; the last base starts no 2-mer; padding is zero.
    assert out.tolist() == [[1, 6, 16, 16, 12, 0, 0, 0], [15, 14, 0, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="between 1 and 8"):
        KmerEmbedding((9,), 4)


def test_kmers_longer_than_the_whole_batch_embed_to_zero():
    embedding = KmerEmbedding((2, 5), 4)
    tokens = torch.from_numpy(pad_tokens([encode("ACG"), encode("T")], 3)[0])
    with torch.no_grad():
        out = embedding(tokens, torch.tensor([3, 1]))
        only_2mers = embedding.tables[0](torch.tensor([[0 * 4 + 1, 1 * 4 + 2]]))  # AC, CG
    torch.testing.assert_close(out[0, :2], only_2mers[0])
    assert out[0, 2:].abs().sum() == 0 and out[1].abs().sum() == 0


def test_kmer_profile_reaches_the_head():
    network = build_network(2, dim=16, blocks=1, heads=2, chunk_size=4, kmer_sizes=(2, 3)).eval()
    assert network.head.in_features == 3 * 16
    tokens, lengths = (torch.from_numpy(a) for a in pad_tokens([encode("ACGTTGCA")], 8))
    with torch.no_grad():
        profile = network.features(tokens, lengths)[0, 32:]
        expected = network.kmers(tokens, lengths).sum(1)[0] / 7  # 7 positions start a 2-mer
    torch.testing.assert_close(profile, expected)


@pytest.mark.parametrize("kmer_sizes", [(), (2, 4)])
def test_reverse_complement_model_is_strand_symmetric(kmer_sizes):
    network = build_network(2, dim=16, blocks=1, heads=2, chunk_size=4, reverse_complement=True,
                         kmer_sizes=kmer_sizes).eval()
    sequences = ["ACGTTGACCATGAAC", "GGGATCCA"]
    tokens, lengths = (torch.from_numpy(a) for a in pad_tokens([encode(s) for s in sequences], 15))
    rc_tokens = torch.from_numpy(pad_tokens([encode(reverse_complement(s)) for s in sequences], 15)[0])
    assert torch.equal(reverse_complement_batch(tokens, lengths), rc_tokens)
    with torch.no_grad():
        torch.testing.assert_close(network(tokens, lengths), network(rc_tokens, lengths))
    plain = build_network(2, dim=16, blocks=1, heads=2, chunk_size=4).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(tokens, lengths), plain(rc_tokens, lengths))


def test_rc_predict_averages_both_strands(fitted):
    sequences, _ = motif_task(6, seed=7)
    both = clone(fitted).set_params(rc_predict=True)
    both.network_, both.classes_, both.max_length_ = fitted.network_, fitted.classes_, fitted.max_length_
    rc_sequences = [reverse_complement(s) for s in sequences]
    np.testing.assert_allclose(both.predict_proba(sequences), both.predict_proba(rc_sequences), atol=1e-6)
    expected = 0.5 * (fitted.predict_proba(sequences) + fitted.predict_proba(rc_sequences))
    np.testing.assert_allclose(both.predict_proba(sequences), expected, atol=1e-6)


def test_fit_is_reproducible_and_uses_validation_split(monkeypatch):
    import genomics.estimator

    sequences, labels = motif_task(64)
    params = dict(TINY, epochs=2, validation_fraction=0.25)
    seen = []
    real_fit = genomics.estimator.fit_model
    monkeypatch.setattr(genomics.estimator, "fit_model", lambda *a, **k: seen.append(a[2:4]) or real_fit(*a, **k))
    first = DNAClassifier(**params).fit(sequences, labels)
    second = DNAClassifier(**params).fit(sequences, labels)
    assert len(first.history_.val_loss) == 2
    train, val = seen[0]
    assert (len(train), len(val)) == (48, 16)
    rows = [{tuple(item[0].tolist()) for item in data} for data in (train, val)]
    assert not rows[0] & rows[1], "the validation sequences are also trained on"
    np.testing.assert_array_equal(first.predict_proba(sequences), second.predict_proba(sequences))


def test_long_sequences_are_windowed_with_warning(fitted):
    sequences, _ = motif_task(2, seed=4)
    long_sequence = sequences[0] * 3  # 144 bases, max_length_ 48
    assert fitted.max_length_ == 48
    with pytest.warns(UserWarning, match="overlapping windows"):
        proba = fitted.predict_proba([long_sequence])
    windows = [long_sequence[s:s + 48] for s in (0, 24, 48, 72, 96)]
    np.testing.assert_allclose(proba[0], fitted.predict_proba(windows).mean(axis=0), atol=1e-9)


def test_save_load_gives_identical_predictions(fitted, tmp_path):
    sequences, _ = motif_task(20, seed=5)
    path = fitted.save(tmp_path / "model.safetensors")
    loaded = DNAClassifier.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(sequences), fitted.predict_proba(sequences))
    assert list(loaded.classes_) == list(fitted.classes_) and loaded.get_params() == fitted.get_params()


def test_files_saved_before_the_shared_memory_block_still_load(fitted, tmp_path):
    """Until memorycore 0.3 the blocks named their parts forward_memory, mlp_norm and mlp."""
    from memorycore.checkpoint import load_checkpoint, save_checkpoint
    tensors, config = load_checkpoint(fitted.save(tmp_path / "new.safetensors"), "DNAClassifier")
    renames = ((".memory.", ".forward_memory."), (".mixer_norm.", ".mlp_norm."), (".mixer.", ".mlp."))
    old = {}
    for key, value in tensors.items():
        for new_name, old_name in renames:
            key = key.replace(new_name, old_name) if key.startswith("blocks.") else key
        old[key] = value
    assert any(".forward_memory." in key for key in old) and not any(".mixer." in key for key in old)
    save_checkpoint(tmp_path / "old.safetensors", old, config)
    sequences, _ = motif_task(20, seed=5)
    np.testing.assert_array_equal(DNAClassifier.load(tmp_path / "old.safetensors").predict_proba(sequences),
                                  fitted.predict_proba(sequences))


def test_load_rejects_foreign_and_corrupt_files(fitted, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        DNAClassifier.load(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("not a model")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        DNAClassifier.load(tmp_path / "text.safetensors")
    good = fitted.save(tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError):
        DNAClassifier.load(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a memorycore model"):
        DNAClassifier.load(tmp_path / "foreign.safetensors")
    from memorycore.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"class": "MemoryForecaster"})
    with pytest.raises(CheckpointError, match="not a DNAClassifier"):
        DNAClassifier.load(tmp_path / "other.safetensors")
    save_checkpoint(tmp_path / "wrong.safetensors", {"w": torch.zeros(2)},
                    {"class": "DNAClassifier", "params": {}, "classes": [0, 1], "max_length": 8})
    with pytest.raises(CheckpointError, match="corrupt DNAClassifier"):
        DNAClassifier.load(tmp_path / "wrong.safetensors")


def test_clone_and_pickle(fitted):
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params() and not hasattr(copy, "network_")
    restored = pickle.loads(pickle.dumps(fitted))
    sequences, _ = motif_task(10, seed=6)
    np.testing.assert_array_equal(restored.predict_proba(sequences), fitted.predict_proba(sequences))


def test_bad_input_errors(fitted):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        DNAClassifier(**TINY).predict(["ACGT"])
    with pytest.raises(InputError, match="sequence 1: unknown letter 'Z' at position 3"):
        fitted.predict(["ACGT", "ACZT"])
    with pytest.raises(InputError, match="single string"):
        fitted.predict("ACGT")
    with pytest.raises(InputError, match="at least two classes"):
        DNAClassifier(**TINY).fit(["ACGT", "ACGA"], [1, 1])
    with pytest.raises(InputError, match="2 sequences but 3 labels"):
        DNAClassifier(**TINY).fit(["ACGT", "ACGA"], [1, 0, 1])
    with pytest.raises(InputError, match="validation_fraction"):
        DNAClassifier(**dict(TINY, validation_fraction=1.5)).fit(["ACGT", "ACGA"], [1, 0])
    with pytest.raises(InputError, match="one-dimensional"):
        DNAClassifier(**TINY).fit(["ACGT", "ACGA"], [[1], [0]])
    for missing in (None, float("nan")):
        with pytest.raises(InputError, match="1 label\\(s\\) are missing .* sequence 1"):
            DNAClassifier(**TINY).fit(["ACGT", "ACGA", "ACGG"], [1, missing, 0])


@pytest.mark.parametrize("params, message", [
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(dim=0), "dim must be a positive integer"),
    (dict(blocks=-1), "blocks must be an integer >= 0"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
])
def test_bad_hyperparameters_are_refused_before_training(params, message):
    with pytest.raises(InputError, match=message):
        DNAClassifier(**dict(TINY, **params)).fit(["ACGT", "ACGA"], [1, 0])


def test_memory_lr_bounds_every_memory_of_the_network():
    network = build_network(2, dim=16, blocks=2, heads=2, memory_lr=0.015)
    memories = [m for block in network.blocks for m in (block.memory, block.backward_memory)]
    assert len(memories) == 4 and all(m.max_lr == 0.015 for m in memories)
