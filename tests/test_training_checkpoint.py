"""fit_model's training checkpoints: a run killed and resumed ends where an uninterrupted run ends."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from memorycore import InputError
from memorycore.training import fit_model


class Killed(Exception):
    pass


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))


def data():
    x = torch.randn(96, 4, generator=torch.Generator().manual_seed(1))
    return TensorDataset(x, x.sum(-1, keepdim=True)), TensorDataset(x[:20], x[:20].sum(-1, keepdim=True))


def train(checkpoint=None, *, resume=False, kill_at=None, every=3, val=True):
    """Train with dropout, a noisy augmentation drawn from an extra generator and validation; raise at the
    ``kill_at``-th training step (counting from the start of this call)."""
    model, augment, calls = make_model(), torch.Generator().manual_seed(5), [0]

    def loss(model, batch):
        if model.training:
            calls[0] += 1
            if calls[0] == kill_at:
                raise Killed
        x, y = batch
        noise = torch.randn(x.shape, generator=augment) * 0.01 if model.training else 0
        return nn.functional.mse_loss(model(x + noise), y)

    train_data, val_data = data()
    history = fit_model(model, loss, train_data, val_data if val else None, epochs=4, batch_size=8,
                        max_steps_per_epoch=7, patience=None, verbose=False, device="cpu", checkpoint=checkpoint,
                        checkpoint_every=every, resume=resume, generators=[augment])
    return model, history


@pytest.mark.parametrize("kill_at, every, val", [(12, 3, True), (8, None, True), (17, 5, False), (3, 2, True)])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, kill_at, every, val):
    expected, expected_history = train(val=val)
    path = tmp_path / "run.safetensors"
    with pytest.raises(Killed):
        train(path, kill_at=kill_at, every=every, val=val)
    assert path.exists()
    resumed, history = train(path, resume=True, every=every, val=val)
    for a, b in zip(expected.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert history.train_loss == pytest.approx(expected_history.train_loss, rel=1e-12)
    assert history.val_loss == expected_history.val_loss
    assert history.best_epoch == expected_history.best_epoch


def test_resuming_a_finished_run_returns_its_weights(tmp_path):
    path = tmp_path / "run.safetensors"
    first, _ = train(path)
    again, history = train(path, resume=True, kill_at=1)  # would raise if it trained a step
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert len(history.train_loss) == 4


def test_resume_without_a_checkpoint_starts_afresh_and_another_run_is_refused(tmp_path):
    path = tmp_path / "run.safetensors"
    with pytest.warns(UserWarning, match="starts afresh"):
        train(path, resume=True)
    model, (train_data, _) = make_model(), data()
    with pytest.raises(InputError, match="another training run.*batch_size"):
        fit_model(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), train_data, epochs=4, batch_size=16,
                  verbose=False, checkpoint=path, resume=True)
    with pytest.raises(InputError, match="checkpoint_every"):
        fit_model(model, lambda m, b: m(b[0]).sum(), train_data, checkpoint=path, checkpoint_every=0)


def killed_at_epoch(monkeypatch, epoch):
    """Make the fit loop die (as from Ctrl-C) when it starts its ``epoch``-th epoch; returns the undo."""
    import memorycore.training as training

    calls, original = [0], training._train_epoch

    def train_epoch(*args, **kwargs):
        calls[0] += 1
        if calls[0] == epoch:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "_train_epoch", train_epoch)
    return lambda: monkeypatch.setattr(training, "_train_epoch", original)


def test_forecaster_and_dna_classifier_resume_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    import numpy as np
    import pandas as pd

    from forecast import MemoryForecaster
    from genomics import DNAClassifier

    t = np.arange(300)
    series = pd.DataFrame({"a": np.sin(t / 4), "b": np.cos(t / 7)},
                          index=pd.date_range("2024-01-01", periods=300, freq="h", name="date"))
    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list("ACGT"), 40)) for _ in range(60)]
    cases = [
        (lambda: MemoryForecaster(lookback=24, horizon=8, d_model=8, heads=2, patch_len=8, stride=4, epochs=3,
                                  dropout=0.3, max_steps_per_epoch=4, verbose=False, device="cpu"), (series,)),
        (lambda: DNAClassifier(dim=8, heads=2, chunk_size=8, stem_kernel=4, kmer_sizes=(2,), epochs=3, batch_size=16,
                               verbose=False, device="cpu"), (sequences, [i % 2 for i in range(60)])),
    ]
    for index, (make, data) in enumerate(cases):
        expected = make().fit(*data)
        path = tmp_path / f"run{index}.safetensors"
        undo = killed_at_epoch(monkeypatch, 3)
        with pytest.raises(KeyboardInterrupt):
            make().fit(*data, checkpoint=path)
        undo()
        resumed = make().fit(*data, checkpoint=path, resume=True)
        for a, b in zip(expected.network_.state_dict().values(), resumed.network_.state_dict().values()):
            assert torch.equal(a, b)
        assert resumed.history_.val_loss == expected.history_.val_loss
