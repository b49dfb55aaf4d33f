"""A context longer than the lookback, read by the forecaster's memory as a stream (issue 28).

With ``MemoryForecaster(context_length=C)`` the memory blocks no longer read the lookback window's own tokens: they
read the series itself, cut into patches on one fixed grid (``patch_len`` steps every ``stride`` steps, counted from
the series' first row, values scaled by the fitted scaler), streamed chunk by chunk with the memory's carried state
(:class:`~memorycore.neural_memory.NeuralMemoryState`), so time and memory grow linearly with the context. The
forecast for an origin ``t`` (the first step forecast) reads the memory's outputs at the last ``n_tokens`` patches
that end at or before ``t`` (as many tokens as a lookback window has, so the head keeps its size); the EinFFT mixers,
the head, the linear path and the cycle then work on the lookback window as before. Because the memory is causal
(a token's read sees itself and earlier tokens only), nothing after the origin reaches a forecast.

- ``C`` an integer: each origin's memory starts from its learned initial state and reads the ``C // stride``
  patches before the origin (the last ``C`` steps, up to one patch).
- ``C = "all"``: one stream from the series' first row. The memory writes every patch it reads (its test-time
  learning) and carries its state through the training, validation and test rows as they arrive: at every origin it
  has read every observation before it. No outer gradient step is taken while predicting.

Training reads the same way (the decision, docs/forecasting.md "Long context"): with an integer ``C`` every training
window streams its whole context from the initial state, the gradient flowing through all of it. With "all" it is
truncated back-propagation through time: the states at every chunk boundary of the training rows are computed
without gradient (refreshed every ``REFRESH_STEPS`` optimiser steps, so they follow the weights), and each window
streams its last ``BPTT_CHUNKS`` chunks (and the patches after them) from the state before them, with gradient.
At test time that same stream runs from the first row, exactly (pieces aligned on chunks give the whole).

With ``n_blocks > 1`` the stream runs every block's memory half (``x + memory(LN(x))``) in turn; the EinFFT
halves mix the ``n_tokens`` read tokens of each window afterwards (their FFT over tokens is not causal, so it
cannot run on a stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from memorycore.errors import InputError
from memorycore.neural_memory import NeuralMemoryState

ALL = "all"
BPTT_CHUNKS = 4  # context_length="all": chunks a training window's gradient flows through (4 x 8 x 8 = 256 steps)
REFRESH_STEPS = 20  # context_length="all": optimiser steps between refreshes of the carried training states
_PIECE_CHUNKS = 64  # chunks per call when streaming a long series (pieces aligned on chunks: the same outputs)
_BATCH = 256


def check_context_length(context_length, lookback: int) -> None:
    """Raise one InputError unless ``context_length`` is None, "all" or an integer >= ``lookback``."""
    if context_length is None or context_length == ALL:
        return
    if isinstance(context_length, (int, np.integer)) and not isinstance(context_length, bool) \
            and context_length >= lookback:
        return
    raise InputError(f"context_length must be None (the memory reads the lookback window), 'all' (the whole series "
                     f"from its first row) or an integer >= lookback ({lookback}), got {context_length!r}")


def refuse_context(context_length) -> None:
    """InputError for the forecasts from lookback windows alone (GluonTS items, scaled windows) when the model has a
    context: its memory needs the series before each window."""
    if context_length is not None:
        raise InputError(f"this model reads a context (context_length={context_length!r}) before each window: "
                         "forecast with predict(data) or evaluate(data), which pass it the series, not windows alone")


def parse_context_length(text: str | None):
    """The command line's ``--context-length``: None, "all" or an integer (checked later against the lookback)."""
    if text is None or text == "" or text.lower() == "none":
        return None
    if text.lower() == ALL:
        return ALL
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--context-length must be an integer number of steps or 'all', got {text!r}") from None


@dataclass(frozen=True)
class Geometry:
    """The token grid of a network: patches of ``patch`` steps every ``stride`` steps, ``chunk`` tokens per memory
    chunk, ``window_tokens`` tokens read by the head, ``context_tokens`` per origin (None: "all")."""

    patch: int
    stride: int
    chunk: int
    window_tokens: int
    context_tokens: int | None

    @classmethod
    def of(cls, network) -> "Geometry":
        c = network.config
        patch, stride = (c.patch_len, c.stride) if c.embedding == "patch" else (1, 1)
        window = network.n_tokens
        context = None if c.context_length == ALL else max(window, int(c.context_length) // stride)
        return cls(patch, stride, c.chunk_size, window, context)

    def complete(self, origins: np.ndarray) -> np.ndarray:
        """Tokens whose patch ends at or before each origin (row index of the first forecast step)."""
        origins = np.asarray(origins, dtype=np.int64)
        return np.where(origins >= self.patch, (origins - self.patch) // self.stride + 1, 0)

    @property
    def bptt_chunks(self) -> int:
        return BPTT_CHUNKS

    def first_origin(self) -> int:
        """The earliest origin with a full context, so that every training window reads as much ("all": the
        ``bptt_chunks`` chunks its gradient flows through)."""
        tokens = self.bptt_chunks * self.chunk if self.context_tokens is None else self.context_tokens
        return self.patch + (tokens - 1) * self.stride

    def carry_start(self, rows: int, lookback: int) -> int:
        """Row (on the grid) from which predict() re-reads the end of a series of ``rows`` rows, given the stream's
        state at that row ("all", a chunk boundary) or from the initial memory (an integer context); at least
        ``lookback`` rows before the end."""
        complete = int(self.complete(rows))
        if self.context_tokens is None:
            step = self.chunk * self.stride
            return min(complete // self.chunk * step, max(0, rows - lookback) // step * step)
        return min(max(0, complete - self.context_tokens) * self.stride,
                   max(0, rows - lookback) // self.stride * self.stride)


def whole_series(prepared, parts: dict | None = None) -> np.ndarray | None:
    """The rows ``[0, test end)`` of the series that ``prepared`` (a :class:`~forecast.data.ProtocolData`) cut into
    overlapping splits, put back together: its scaled values, or with ``parts`` (a dict of per-split arrays, such
    as the cycle phases) those (None when they are None)."""
    split = prepared.split
    get = (lambda part: getattr(prepared, part)) if parts is None else parts.get
    if get("train") is None:
        return None
    pieces, end = [], 0
    for part in ("train", "val", "test"):
        start, stop = getattr(split, part)
        pieces.append(np.asarray(get(part))[max(0, end - start):])
        end = stop
    return np.concatenate(pieces)


# ------------------------------------------------------------------------------------------------- the stream
def series_patches(network, values: Tensor) -> Tensor:
    """Patches ``[rows, tokens, features]`` of a scaled series ``values [time, channels]`` on the grid from its
    first row: one row per channel (channel-independent) or one row holding all channels (mixing)."""
    g = Geometry.of(network)
    x = values.T.unsqueeze(-1) if network.independent else values.unsqueeze(0)  # [rows, time, k]
    if x.shape[1] < g.patch:
        return x.new_zeros(x.shape[0], 0, g.patch * x.shape[2])
    return x.unfold(1, g.patch, g.stride).flatten(2)  # [rows, n, k, patch] -> [rows, n, k * patch]


def read_tokens(network, embedded: Tensor, states: list | None = None) -> tuple[Tensor, list]:
    """Every block's memory half, ``x + dropout(memory(LN(x)))``, over ``embedded [rows, n, d]`` from ``states``
    (one per block; None: the initial memory). Returns the read tokens and the blocks' new states."""
    states = states if states is not None else [None] * len(network.blocks)
    new_states = []
    x = embedded
    for block, state in zip(network.blocks, states):
        read, state = block.memory(block.memory_norm(x), state)
        x = x + block.dropout(read)
        new_states.append(state)
    return x, new_states


def stream(network, patches: Tensor, states: list | None = None) -> list | None:
    """The blocks' states after embedding and reading ``patches [rows, n, f]`` from ``states`` (None: the initial
    memory), in pieces of ``_PIECE_CHUNKS`` chunks. Feeding a series in two calls, the second from the first's
    states, gives the same states when the first ends on a chunk boundary (NeuralMemory's pieces == whole)."""
    piece = _PIECE_CHUNKS * network.config.chunk_size
    for start in range(0, patches.shape[1], piece):
        _, states = read_tokens(network, network.embed(patches[:, start:start + piece]), states)
    return states


@torch.no_grad()
def chunk_states(network, patches: Tensor, first: int, last: int, states: list | None = None) -> list:
    """Per block, the states after ``first``, ``first + 1``, ..., ``last`` chunks of ``patches`` read from
    ``states`` (None: the initial memory), stacked: index i is the state after ``first + i`` chunks."""
    g = Geometry.of(network)
    states = stream(network, patches[:, :first * g.chunk], states)
    if states is None:
        states = [block.memory.initial_state(patches.shape[0], patches.device) for block in network.blocks]
    snapshots = [states]
    for chunk in range(first, last):
        _, states = read_tokens(network, network.embed(patches[:, chunk * g.chunk:(chunk + 1) * g.chunk]), states)
        snapshots.append(states)
    return [_stack([snapshot[block] for snapshot in snapshots]) for block in range(len(network.blocks))]


def windowed_states(network, patches: Tensor, origins: np.ndarray) -> list:
    """Integer context: per block, the memory after reading each origin's last ``context_tokens`` patches from the
    initial memory, ``[len(origins) * rows, ...]`` (window-major)."""
    g = Geometry.of(network)
    complete = g.complete(origins)
    if (complete < g.context_tokens).any():
        raise InputError(f"context_length={network.config.context_length} needs {g.first_origin()} rows before the "
                         f"forecast origin; the series has {int(np.min(origins))}")
    index = torch.as_tensor(complete[:, None] - g.context_tokens + np.arange(g.context_tokens),
                            device=patches.device)
    picked = patches[:, index].transpose(0, 1).reshape(-1, g.context_tokens, patches.shape[-1])
    _, states = read_tokens(network, network.embed(picked))
    return states


def state_at(network, values: Tensor, origin: int, states: list | None = None) -> list | None:
    """The memory before the window of ``origin`` (a row of the scaled series ``values [time, channels]``, the first
    step forecast), for one origin: "all" reads every complete chunk of ``values`` before it from ``states`` (the
    memory at ``values``' first row; None: the initial memory), an integer context its last patches."""
    patches = series_patches(network, values)
    g = Geometry.of(network)
    if g.context_tokens is not None:
        return windowed_states(network, patches, np.array([origin]))
    chunks = int(g.complete(origin)) // g.chunk
    return stream(network, patches[:, :chunks * g.chunk], states)


# ------------------------------------------------------------------------------------------------ forecasts
@torch.no_grad()
def context_forecasts(network, values: np.ndarray, phases: np.ndarray | None, starts: np.ndarray, *,
                      batch_size: int = _BATCH) -> np.ndarray:
    """Forecasts ``[len(starts), horizon, channels]`` of the windows starting at rows ``starts`` of the scaled
    series ``values [time, channels]`` (cycle phases ``phases [time]``), the memory having read the series before
    each window (from its first row with "all": it writes as it reads, through validation and test)."""
    network.eval()
    c, g = network.config, Geometry.of(network)
    series = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    starts = np.asarray(starts, dtype=np.int64)
    if not len(starts):
        return np.zeros((0, c.horizon, c.n_channels))
    patches = series_patches(network, series)
    bank, first = None, 0
    if g.context_tokens is None:
        chunks = g.complete(starts + c.lookback) // g.chunk
        first = int(chunks.min())
        bank = chunk_states(network, patches, first, int(chunks.max()))
    outputs = []
    for begin in range(0, len(starts), batch_size):
        batch = starts[begin:begin + batch_size]
        windows = series[torch.as_tensor(batch[:, None] + np.arange(c.lookback))]
        if bank is None:
            states = windowed_states(network, patches, batch + c.lookback)
        else:
            states = take_states(bank, g.complete(batch + c.lookback) // g.chunk - first)
        phase = None if phases is None else torch.as_tensor(np.asarray(phases)[batch], dtype=torch.long)
        outputs.append(network(windows, phase, memory_state=states).double().numpy())
    return np.concatenate(outputs)


def context_errors(network, values: np.ndarray, phases: np.ndarray | None, part: tuple[int, int], *,
                   max_windows: int | None = None) -> np.ndarray:
    """Errors (forecast - truth) ``[n, horizon, c]`` of the stride-1 windows inside rows ``part = (start, end)`` of
    the whole scaled series ``values`` (the memory reads everything before each window, in or out of the part)."""
    c = network.config
    starts = np.arange(part[0], part[1] - c.lookback - c.horizon + 1)
    if max_windows is not None and len(starts) > max_windows:
        starts = starts[np.unique(np.linspace(0, len(starts) - 1, max_windows).round().astype(int))]
    forecasts = context_forecasts(network, values, phases, starts)
    targets = np.lib.stride_tricks.sliding_window_view(np.asarray(values, dtype=np.float64), c.horizon, axis=0)
    return forecasts - targets[starts + c.lookback].transpose(0, 2, 1)


@torch.no_grad()
def context_roll_out(network, values: np.ndarray, first_phase: int | None, steps: int, *,
                     states: list | None = None) -> np.ndarray:
    """Forecast the ``steps`` rows after the end of the scaled series ``values [time, channels]``, feeding the
    forecasts back into the series past the horizon: ``[steps, channels]``. ``first_phase``: the cycle phase of
    ``values``' first row; ``states``: the memory at that row ("all"; None: the initial memory)."""
    network.eval()
    c = network.config
    series = np.asarray(values, dtype=np.float64)
    out, done = [], 0
    while done < steps:
        tensor = torch.as_tensor(series, dtype=torch.float32)
        memory = state_at(network, tensor, len(series), states)
        window = tensor[None, -c.lookback:]
        phase = None if first_phase is None else \
            torch.as_tensor([(first_phase + len(series) - c.lookback) % c.cycle_length])
        forecast = network(window, phase, memory_state=memory)[0].double().numpy()
        out.append(forecast)
        done += len(forecast)
        series = np.concatenate([series, forecast])
    return np.concatenate(out)[:steps]


def carried_state(network, values: Tensor, rows: int) -> list | None:
    """"all": the memory's states after reading the first ``rows`` rows of ``values`` (``rows`` on a chunk
    boundary, as :meth:`Geometry.carry_start` gives); None for an integer context."""
    g = Geometry.of(network)
    if g.context_tokens is not None:
        return None
    patches = series_patches(network, values)[:, :rows // g.stride]
    return stream(network, patches)


# ------------------------------------------------------------------------------------------------- training
class OriginWindows(Dataset):
    """The stride-1 windows of rows ``part = (start, end)`` of the scaled series ``values`` whose origin has a full
    context: items ``(window, target[, phase], origin)``, the origin being a row of ``values``."""

    def __init__(self, values: Tensor, part: tuple[int, int], lookback: int, horizon: int,
                 phases: np.ndarray | None, first_origin: int) -> None:
        self.values, self.lookback, self.horizon = values, lookback, horizon
        self.phases = None if phases is None else torch.as_tensor(np.asarray(phases), dtype=torch.long)
        first = max(part[0], first_origin - lookback)
        self.starts = np.arange(first, part[1] - lookback - horizon + 1)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int):
        start = int(self.starts[index])
        middle = start + self.lookback
        item = (self.values[start:middle], self.values[middle:middle + self.horizon])
        phase = () if self.phases is None else (self.phases[start],)
        return (*item, *phase, torch.tensor(middle))


class ContextLoss:
    """``loss(model, batch)`` over :class:`OriginWindows` batches for :func:`memorycore.training.fit_model`: the
    chosen loss while training, MSE in eval mode (as :func:`forecast.estimator.loss_function`).

    "all": while training, each window reads its last ``bptt_chunks`` chunks from the carried state before them,
    with gradient (truncated back-propagation through time); those states are recomputed without gradient every
    ``REFRESH_STEPS`` steps. In eval mode the states of one stream from row 0 are used, computed again after any
    training step.
    """

    def __init__(self, network, values: Tensor, train_end: int, criterion, mse) -> None:
        self.values, self.train_end = values, train_end
        self.criterion, self.mse = criterion, mse
        self.geometry = Geometry.of(network)
        self.patches = None
        self._bank, self._steps, self._eval_bank = None, 0, None

    def __call__(self, model, batch) -> Tensor:
        windows, targets, *rest = batch
        origins, phase = rest[-1].cpu().numpy(), rest[:-1]
        if self.patches is None or self.patches.device != windows.device:
            self.patches = series_patches(model, self.values.to(windows.device))
        g = self.geometry
        if g.context_tokens is not None:
            states = windowed_states(model, self.patches, origins)
        elif model.training:
            states = self._training_states(model, origins)
        else:
            if self._eval_bank is None:
                self._eval_bank = self._bank_of(model, int(g.complete(self.patches.shape[1] * g.stride)))
            states = take_states(self._eval_bank, g.complete(origins) // g.chunk)
        criterion = self.criterion if model.training else self.mse
        return criterion(model(windows, *phase, memory_state=states).float(), targets.float())

    def _training_states(self, model, origins: np.ndarray) -> list:
        self._eval_bank = None  # the weights move: the next evaluation streams again
        g = self.geometry
        if self._bank is None or self._steps % REFRESH_STEPS == 0:
            self._bank = self._bank_of(model, int(g.complete(self.train_end)))
        self._steps += 1
        first_chunk = g.complete(origins) // g.chunk - g.bptt_chunks
        length = g.bptt_chunks * g.chunk
        index = torch.as_tensor(first_chunk[:, None] * g.chunk + np.arange(length), device=self.patches.device)
        picked = self.patches[:, index].transpose(0, 1).reshape(-1, length, self.patches.shape[-1])
        _, states = read_tokens(model, model.embed(picked), take_states(self._bank, first_chunk))
        return states

    def _bank_of(self, model, tokens: int) -> list:
        was_training = model.training
        model.eval()
        try:
            return chunk_states(model, self.patches, 0, tokens // self.geometry.chunk)
        finally:
            model.train(was_training)


def _stack(states: list[NeuralMemoryState]) -> NeuralMemoryState:
    conv = None if states[0].conv is None else torch.stack([s.conv for s in states])
    return NeuralMemoryState(tuple(torch.stack(w) for w in zip(*(s.weights for s in states))),
                             tuple(torch.stack(m) for m in zip(*(s.momentum for s in states))), conv)


def take_states(bank: list[NeuralMemoryState], index: np.ndarray) -> list[NeuralMemoryState]:
    """Per block, the stacked states of ``bank`` (:func:`chunk_states`) at ``index[i]`` for window i, as one batch
    ``[len(index) * rows, ...]`` (window-major)."""
    chosen = torch.as_tensor(np.asarray(index))

    def take(t: Tensor) -> Tensor:
        picked = t[chosen.to(t.device)]  # [windows, rows, ...]
        return picked.reshape(-1, *picked.shape[2:])

    return [NeuralMemoryState(tuple(take(w) for w in s.weights), tuple(take(m) for m in s.momentum),
                              None if s.conv is None else take(s.conv)) for s in bank]


def training_data(network, values: np.ndarray, phases: np.ndarray | None, split, criterion, mse):
    """``(train, val, loss)`` for :func:`memorycore.training.fit_model`: the windows of the training and validation
    rows of the whole scaled series ``values`` with a full context, and the :class:`ContextLoss` reading it."""
    c, g = network.config, Geometry.of(network)
    series = torch.as_tensor(np.asarray(values[:split.val[1]]), dtype=torch.float32)
    train = OriginWindows(series, split.train, c.lookback, c.horizon, phases, g.first_origin())
    val = OriginWindows(series, split.val, c.lookback, c.horizon, phases, g.first_origin())
    if not len(train) or len(val) < len(range(split.val[0], split.val[1] - c.lookback - c.horizon + 1)):
        raise InputError(f"context_length={c.context_length} needs {g.first_origin()} rows before the first forecast "
                         f"origin: the training split ({split.train[1]} rows) is too short for it")
    return train, val, ContextLoss(network, series, split.train[1], criterion, mse)


# ------------------------------------------------------------------------------------------------ checkpoint
def state_tensors(states: list | None, prefix: str) -> dict[str, Tensor]:
    """The carried states as named tensors for a safetensors file (empty for None)."""
    tensors = {}
    for block, state in enumerate(states or []):
        for layer, (w, m) in enumerate(zip(state.weights, state.momentum)):
            tensors[f"{prefix}.{block}.weights.{layer}"] = w.detach().contiguous()
            tensors[f"{prefix}.{block}.momentum.{layer}"] = m.detach().contiguous()
        if state.conv is not None:
            tensors[f"{prefix}.{block}.conv"] = state.conv.detach().contiguous()
    return tensors


def states_from_tensors(tensors: dict[str, Tensor], prefix: str, blocks: int) -> list | None:
    """The inverse of :func:`state_tensors` (None when the file has no carried state)."""
    if not any(name.startswith(prefix + ".") for name in tensors):
        return None
    states = []
    for block in range(blocks):
        head = f"{prefix}.{block}."
        layers = sorted({int(n.split(".")[-1]) for n in tensors if n.startswith(head + "weights.")})
        states.append(NeuralMemoryState(tuple(tensors[f"{head}weights.{i}"] for i in layers),
                                        tuple(tensors[f"{head}momentum.{i}"] for i in layers),
                                        tensors.get(head + "conv")))
    return states
