"""Training NAMM's scorer by evolution (CMA-ES, as the paper: population 32, sigma0 0.065, mean starting at 0).

Each generation draws a batch of task examples, scores the model on them with the full cache, then scores every
candidate scorer with its press applied; a candidate's fitness is the mean over the batch of pressed score / full
score (examples the full cache scores 0 on are left out: there is nothing to keep). pycma minimises, so it is told the
negated fitness.

Resuming without pickle: pycma's state holds numpy objects that only pickle would restore, and loading a pickle runs
whatever the file says. The checkpoint (one ``.safetensors`` file, written atomically after every generation) holds
instead the settings and every fitness value told so far; a resumed run rebuilds the strategy by replaying
``ask()`` / ``tell()`` with those values (no model is run), which is exact because the strategy draws its samples from
a numpy Generator seeded by ``seed``, and checks the rebuilt mean against the saved one.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.errors import CheckpointError, InputError
from memorycore.files import check_writable
from memorycore.namm.press import resolve_budget
from memorycore.namm.scorer import BAMScorer, NAMMPress
from memorycore.validation import POSITIVE, POSITIVE_INT, NON_NEGATIVE_INT, check_params

STATE_CLASS = "NAMMEvolution"
CONSTRAINTS = {"population": [POSITIVE_INT], "sigma0": [POSITIVE], "generations": [POSITIVE_INT],
               "batch_size": [POSITIVE_INT], "interval": [POSITIVE_INT], "seed": [NON_NEGATIVE_INT]}


@runtime_checkable
class NAMMTask(Protocol):
    """What :func:`fit_namm` trains on: examples, and a score per example for a model's answers.

    ``score`` runs the model as usual (our models' forward, or :func:`memorycore.namm.generate` for Hugging Face
    models); :func:`fit_namm` applies the press around it with ``with press(model):``.
    """

    def sample(self, batch_size: int, generator: torch.Generator) -> Any:
        """A batch of examples drawn with ``generator`` (the same generator state gives the same batch)."""

    def score(self, model: nn.Module, batch: Any) -> Tensor:
        """One score per example, higher is better (an accuracy, a negative loss made positive, ...)."""


@dataclass
class FunctionTask:
    """A :class:`NAMMTask` made of two functions."""

    sample: Callable[[int, torch.Generator], Any]
    score: Callable[[nn.Module, Any], Tensor]


@dataclass
class EvolutionResult:
    """What :func:`fit_namm` returns: the best scorer found, its fitness, and per generation the best and mean."""

    scorer: BAMScorer
    best_fitness: float
    history: list[dict[str, float]] = field(default_factory=list)


def fit_namm(model: nn.Module, task: NAMMTask, *, generations: int, population: int = 32, sigma0: float = 0.065,
             batch_size: int = 8, scorer: BAMScorer | None = None, interval: int = 512, budget: float | None = None,
             diagonal: bool = False, seed: int = 0, checkpoint: str | os.PathLike | None = None,
             out: str | os.PathLike | None = None, verbose: bool = True) -> EvolutionResult:
    """Evolve a NAMM scorer for ``model`` on ``task``.

    Parameters
    ----------
    model : nn.Module
        An attention model of ours, or a Hugging Face causal LM (eager attention).
    task : NAMMTask
        Examples and their scores; see :class:`NAMMTask`.
    generations : int
        Generations to reach (a resumed run continues up to this many).
    population, sigma0 : int, float
        CMA-ES population and initial step size (NAMM: 32, 0.065).
    batch_size : int, default 8
        Examples per generation, shared by all its candidates.
    scorer : BAMScorer, optional
        Its settings (hidden width, features) define the search space; its weights are ignored (the mean starts at 0).
    interval : int, default 512
        Tokens between evictions of the press while evaluating.
    budget : float in (0, 1], optional
        Evolve a scorer that ranks entries for a press keeping this share of the cache (``NAMMPress(budget=)``);
        default: the scorer decides what to keep (score >= 0), as NAMM.
    diagonal : bool, default False
        Diagonal covariance (linear time per generation) instead of the full one (cubic in the scorer's size).
    seed : int, default 0
        Seeds the strategy's samples and the task's batches.
    checkpoint : path, optional
        The evolution state, written after every generation; if it exists, the run resumes from it.
    out : path, optional
        Where the best scorer goes (``.safetensors``, settings and fitness in its JSON metadata).
    verbose : bool, default True
        A progress bar with the best and mean fitness on a terminal; one line per generation otherwise.

    Returns
    -------
    EvolutionResult
        The best candidate seen (on its generation's batch), its fitness, and the per-generation history.

    Notes
    -----
    The model runs in eval mode and without gradients while candidates are scored. Cost per generation: one full-cache
    and ``population`` pressed runs of the task's batch, plus pycma's update (measured on 2 busy CPU cores at the
    default 3585 parameters, population 32: 0.57 s full covariance, 0.012 s diagonal).

    Examples
    --------
    >>> from memorycore.namm import fit_namm, passkey_task
    >>> result = fit_namm(model, passkey_task(4096), generations=50, out="namm.safetensors")  # doctest: +SKIP
    """
    check_params(locals(), CONSTRAINTS)
    if not (callable(getattr(task, "sample", None)) and callable(getattr(task, "score", None))):
        raise InputError(f"task must have sample(batch_size, generator) and score(model, batch) methods (a NAMMTask "
                         f"or FunctionTask), got {type(task).__name__}")
    if scorer is not None and not isinstance(scorer, BAMScorer):
        raise InputError(f"scorer must be a BAMScorer (its settings define the search space), got "
                         f"{type(scorer).__name__}")
    for path in (checkpoint, out):
        if path is not None:
            check_writable(path)
    template = BAMScorer(scorer.hidden, scorer.features) if scorer is not None else BAMScorer()
    settings = {"population": population, "sigma0": sigma0, "batch_size": batch_size, "interval": interval,
                "diagonal": diagonal, "seed": seed, "dims": template.num_parameters, **template.config()}
    if budget is not None:  # only then: checkpoints written before budget= existed still resume
        settings["budget"] = resolve_budget(budget, None)
    run = _Run(template, settings)
    if checkpoint is not None and Path(checkpoint).exists():
        run.resume(checkpoint)
    training = model.training
    model.eval()  # dropout would make the fitness of the same candidate vary
    try:
        with _reporter(verbose, generations, len(run.fitness)) as report:
            for generation in range(len(run.fitness), generations):
                run.generation(model, task, generation)
                if checkpoint is not None:
                    run.save(checkpoint)
                report(generation, run.history[-1])
    finally:
        model.train(training)
    result = EvolutionResult(template.load_vector(run.best), run.best_fitness, run.history)
    result.scorer.budget = settings.get("budget")
    if out is not None:
        result.scorer.save(out, fitness=result.best_fitness, generations=len(run.fitness))
    return result


class _Run:
    """The evolution's state: pycma's strategy and everything needed to rebuild it."""

    def __init__(self, template: BAMScorer, settings: dict) -> None:
        import cma

        self.template, self.settings = template, settings
        generator = np.random.default_rng(settings["seed"])
        options = {"popsize": settings["population"], "seed": np.nan, "CMA_diagonal": settings["diagonal"],
                   "randn": lambda *shape: generator.standard_normal(shape), "verbose": -9, "verb_log": 0,
                   "verb_disp": 0, "tolflatfitness": math.inf}
        self.strategy = cma.CMAEvolutionStrategy(np.zeros(settings["dims"]), settings["sigma0"], options)
        self.fitness: list[np.ndarray] = []
        self.best = np.zeros(settings["dims"])
        self.best_fitness = -math.inf
        self.history: list[dict[str, float]] = []

    def generation(self, model: nn.Module, task: NAMMTask, generation: int) -> None:
        batch = task.sample(self.settings["batch_size"],
                            torch.Generator().manual_seed(self.settings["seed"] * 1_000_003 + generation))
        full = _scores(task, model, batch, "the full cache")
        candidates = self.strategy.ask()
        fitness = np.array([self._fitness(model, task, batch, full, x) for x in candidates])
        self._tell(candidates, fitness)

    def _fitness(self, model: nn.Module, task: NAMMTask, batch: Any, full: Tensor, candidate: np.ndarray) -> float:
        press = NAMMPress(BAMScorer(self.template.hidden, self.template.features).load_vector(candidate),
                          budget=self.settings.get("budget"), interval=self.settings["interval"])
        with press(model):
            pressed = _scores(task, model, batch, "the pressed cache")
        counted = full > 0
        if not bool(counted.any()):
            return 0.0
        return float((pressed[counted] / full[counted]).mean())

    def _tell(self, candidates: list, fitness: np.ndarray) -> None:
        self.strategy.tell(candidates, list(-fitness))
        self.fitness.append(fitness)
        best = int(np.argmax(fitness))
        if fitness[best] > self.best_fitness:
            self.best, self.best_fitness = np.array(candidates[best]), float(fitness[best])
        self.history.append({"best": float(fitness.max()), "mean": float(fitness.mean()),
                             "best_so_far": self.best_fitness})

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"fitness": torch.tensor(np.stack(self.fitness)), "best": torch.tensor(self.best),
                   "mean": torch.tensor(np.asarray(self.strategy.mean, dtype=np.float64))}
        save_checkpoint(path, tensors, {"class": STATE_CLASS, "settings": self.settings})

    def resume(self, path: str | os.PathLike) -> None:
        tensors, config = load_checkpoint(path, STATE_CLASS)
        if config.get("settings") != self.settings:
            raise InputError(f"{path} holds an evolution with other settings ({config.get('settings')}); pass the "
                             "same settings to resume it, or another checkpoint path to start afresh")
        try:
            fitness, mean = tensors["fitness"].numpy(), tensors["mean"].numpy()
        except KeyError:
            raise CheckpointError(f"{path} is an incomplete evolution state; remove it to start afresh") from None
        for values in fitness:
            self._tell(self.strategy.ask(), values)
        if not np.allclose(self.strategy.mean, mean, rtol=1e-9, atol=1e-12):
            raise CheckpointError(f"{path} cannot be resumed exactly (another version of cma or numpy replays it "
                                  "differently); remove it to start afresh")


def _scores(task: NAMMTask, model: nn.Module, batch: Any, what: str) -> Tensor:
    with torch.no_grad():
        scores = torch.as_tensor(task.score(model, batch), dtype=torch.float64).flatten().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise InputError(f"the task gave non-finite scores with {what}; scores must be finite numbers")
    return scores


class _reporter:
    """A rich progress bar with the best and mean fitness on a terminal, one line per generation elsewhere."""

    def __init__(self, verbose: bool, generations: int, done: int) -> None:
        self.verbose, self.generations, self.done = verbose, generations, done
        self.progress = None

    def __enter__(self) -> Callable[[int, dict], None]:
        if self.verbose and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from memorycore.training import stderr_console

            self.progress = Progress(TextColumn("NAMM evolution"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[fitness]}"), TimeRemainingColumn(),
                                     console=stderr_console())
            self.progress.__enter__()
            self.task = self.progress.add_task("", total=self.generations, completed=self.done, fitness="")
        return self.report

    def report(self, generation: int, record: dict) -> None:
        text = f"best {record['best']:.4f}, mean {record['mean']:.4f}, best so far {record['best_so_far']:.4f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=generation + 1, fitness=text)
        elif self.verbose:
            print(f"generation {generation + 1}/{self.generations}: {text}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
