"""The CPU thread rule (memorycore.devices) applied by every estimator and bench script, and the progress lines that
fit_model writes where stderr is not a terminal."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import forecast.estimator
import genomics.estimator
from bench._arguments import apply_threads
from cli import app
from forecast import MemoryForecaster
from genomics import DNAClassifier
from memorycore.devices import DEFAULT_THREADS, resolve_threads, torch_threads
from memorycore.errors import InputError
from memorycore.training import fit_model


@pytest.fixture
def caller_threads():
    """The test's caller runs with 3 threads: an estimator must use its own count and give 3 back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(previous)


def test_the_rule_is_one_thread_unless_told():
    assert DEFAULT_THREADS == 1 and resolve_threads(None) == 1 and resolve_threads(4) == 4
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(InputError, match="n_threads"):
            resolve_threads(bad)


def test_torch_threads_restores_the_callers_count_even_on_error(caller_threads):
    with pytest.raises(RuntimeError):
        with torch_threads(None):
            assert torch.get_num_threads() == 1
            raise RuntimeError
    assert torch.get_num_threads() == caller_threads


class _Stop(Exception):
    pass


def _recording_fit_model(seen):
    def fake(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise _Stop

    return fake


@pytest.mark.parametrize("n_threads, expected", [(None, 1), (2, 2)])
def test_dna_classifier_fits_and_predicts_by_the_rule(monkeypatch, caller_threads, n_threads, expected):
    seen = []
    monkeypatch.setattr(genomics.estimator, "fit_model", _recording_fit_model(seen))
    classifier = DNAClassifier(dim=8, heads=2, epochs=1, n_threads=n_threads, verbose=False, device="cpu")
    with pytest.raises(_Stop):
        classifier.fit(["ACGTACGTAA", "TTTTGGGGCC"] * 4, [0, 1] * 4)
    assert seen == [expected] and torch.get_num_threads() == caller_threads

    monkeypatch.undo()
    classifier.fit(["ACGTACGTAA", "TTTTGGGGCC"] * 4, [0, 1] * 4)
    monkeypatch.setattr(classifier, "_window_probabilities",
                        lambda windows: seen.append(torch.get_num_threads()) or np.full((len(windows), 2), 0.5))
    classifier.predict(["ACGTACGTAA"])
    assert seen[-1] == expected and torch.get_num_threads() == caller_threads


def test_forecaster_fits_by_the_rule_and_the_override(monkeypatch, caller_threads):
    frame = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=400, freq="h"),
                          "y": np.sin(np.arange(400) / 5.0)})
    for n_threads, expected in ((None, 1), (2, 2)):
        seen = []
        monkeypatch.setattr(forecast.estimator, "fit_model", _recording_fit_model(seen))
        with pytest.raises(_Stop):
            MemoryForecaster(lookback=24, horizon=8, epochs=1, n_threads=n_threads, verbose=False,
                             device="cpu").fit(frame)
        assert seen == [expected] and torch.get_num_threads() == caller_threads
    with pytest.raises(InputError, match="n_threads must be a positive integer or None, got 0"):
        MemoryForecaster(n_threads=0).fit(frame)


def test_bench_scripts_and_command_line_use_the_rule(caller_threads):
    assert apply_threads(None) == 1 and apply_threads(2) == 2
    result = CliRunner().invoke(app, ["forecast", "fit", "--threads", "0", "--out", "m.safetensors"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --threads must be >= 1")
    for command in ("predict", "evaluate", "plot"):
        result = CliRunner().invoke(app, ["forecast", command, "--model", "m.safetensors", "--data", "d.csv",
                                          "--threads", "0"])
        assert result.exit_code == 2 and result.stderr == "error: --threads must be >= 1, got 0\n", result.output


def test_progress_off_a_terminal_is_one_line_per_epoch(capsys):
    x = torch.randn(64, 3)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    model = torch.nn.Linear(3, 1)

    def loss(network, batch):
        return ((network(batch[0]) - batch[1]) ** 2).mean()

    fit_model(model, loss, data, data, epochs=3, batch_size=16, device="cpu", description="demo", patience=None)
    lines = capsys.readouterr().err.splitlines()  # pytest's captured stderr is not a terminal
    assert len(lines) == 3
    value = r"\d+\.\d{4}"
    for epoch, line in enumerate(lines, start=1):
        pattern = (rf"demo: epoch {epoch}/3 train {value} val {value} \(best {value}\), "
                   r"\d+ s elapsed, at most \d+ s left")
        assert re.fullmatch(pattern, line), line
    assert lines[-1].endswith("at most 0 s left")

    fit_model(model, loss, data, None, epochs=2, batch_size=16, device="cpu", description="plain")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" train")[0] for line in lines] == ["plain: epoch 1/2", "plain: epoch 2/2"]
    assert "val" not in lines[0]

    fit_model(model, loss, data, None, epochs=2, batch_size=16, device="cpu", verbose=False)
    assert capsys.readouterr().err == ""


def test_language_model_fits_and_generates_by_the_rule(monkeypatch, caller_threads):
    import memorycore.lm.estimator as lm_estimator
    from memorycore.lm import MemoryLM

    text = "to be or not to be " * 40
    for n_threads, expected in ((None, 1), (2, 2)):
        seen = []
        monkeypatch.setattr(lm_estimator, "fit_model", _recording_fit_model(seen))
        with pytest.raises(_Stop):
            MemoryLM(dim=16, depth=1, heads=2, max_steps=2, n_threads=n_threads, verbose=False).fit(text)
        assert seen == [expected] and torch.get_num_threads() == caller_threads
    monkeypatch.undo()
    model = MemoryLM(dim=16, depth=1, heads=2, max_steps=2, eval_interval=2, n_threads=2, verbose=False).fit(text)
    pieces = model.generate("to", 3, seed=0, stream=True)
    assert torch.get_num_threads() == caller_threads  # nothing drawn yet
    next(iter(pieces))
    assert torch.get_num_threads() == 2  # while the stream is drawn
    pieces.close()
    assert torch.get_num_threads() == caller_threads
