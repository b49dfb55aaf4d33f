"""Evolving NAMM's scorer: a toy task whose answer is known, exact resumption, the saved scorer, bad input."""

import pytest
import torch
from namm_helpers import PlantedTokenTask

from memorycore import CheckpointError, InputError
from memorycore.namm import BAMScorer, FunctionTask, NAMMPress, fit_namm

SMALL = BAMScorer(hidden=4)  # 337 parameters: a few seconds of evolution


def test_evolution_learns_to_keep_the_planted_token_and_evict_the_rest(tmp_path):
    task = PlantedTokenTask()
    model = task.model()
    result = fit_namm(model, task, generations=12, population=12, batch_size=4, scorer=SMALL, interval=16,
                      out=tmp_path / "namm.safetensors", verbose=False)
    # perfect: the planted token and the newest kept, 62 of 64 evicted: 1 + 62 / 64
    assert result.best_fitness > 1.9
    assert result.history[-1]["mean"] > result.history[0]["mean"] + 0.5
    # on examples it never saw, the saved scorer keeps the planted token and evicts most of the rest
    press = NAMMPress(tmp_path / "namm.safetensors", interval=16)
    batch = task.sample(16, torch.Generator().manual_seed(12345))
    with press(model):
        scores = task.score(model, batch)
    assert scores.min() > 1.5, scores


class Killed(Exception):
    pass


def test_a_killed_and_resumed_evolution_ends_where_an_uninterrupted_one_does(tmp_path):
    task = PlantedTokenTask()
    model = task.model()
    settings = dict(population=6, batch_size=2, scorer=SMALL, interval=16, seed=3, verbose=False)
    whole = fit_namm(model, task, generations=4, **settings)

    calls = {"count": 0}

    def score_then_die(model, batch):
        calls["count"] += 1
        if calls["count"] > 2 * 7 + 3:  # dies inside the third generation (7 scores a generation)
            raise Killed
        return task.score(model, batch)

    checkpoint = tmp_path / "evolution.safetensors"
    with pytest.raises(Killed):
        fit_namm(model, FunctionTask(task.sample, score_then_die), generations=4, checkpoint=checkpoint, **settings)
    resumed = fit_namm(model, task, generations=4, checkpoint=checkpoint, **settings)
    assert resumed.history == whole.history
    assert torch.equal(resumed.scorer.vector(), whole.scorer.vector())
    # a finished run resumed asks for nothing more
    again = fit_namm(model, FunctionTask(task.sample, score_then_die), generations=4, checkpoint=checkpoint,
                     **settings)
    assert again.history == whole.history


def test_one_log_line_per_generation_when_stderr_is_not_a_terminal(capsys):
    task = PlantedTokenTask()
    fit_namm(task.model(), task, generations=2, population=4, batch_size=1, scorer=SMALL, interval=16)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("generation 2/2: best ") and "mean" in lines[1]


def test_bad_evolution_input_raises_input_errors(tmp_path):
    task = PlantedTokenTask()
    model = task.model()
    with pytest.raises(InputError, match="population must be a positive integer"):
        fit_namm(model, task, generations=1, population=0)
    with pytest.raises(InputError, match="sigma0 must be"):
        fit_namm(model, task, generations=1, sigma0=-1.0)
    with pytest.raises(InputError, match="scorer must be a BAMScorer"):
        fit_namm(model, task, generations=1, scorer="namm.safetensors")
    with pytest.raises(InputError, match="task must have sample"):
        fit_namm(model, object(), generations=1)
    checkpoint = tmp_path / "evolution.safetensors"
    fit_namm(model, task, generations=1, population=4, batch_size=1, scorer=SMALL, interval=16, checkpoint=checkpoint,
             verbose=False)
    with pytest.raises(InputError, match="other settings"):
        fit_namm(model, task, generations=2, population=5, batch_size=1, scorer=SMALL, interval=16,
                 checkpoint=checkpoint, verbose=False)
    with pytest.raises(CheckpointError, match="holds a NAMMEvolution, not a NAMMScorer"):
        NAMMPress(checkpoint)
