"""The Titans architectures (Behrouz et al., 2025, section 4): memory as context, gate and layer.

Every mixer here maps ``x [batch, time, dim]`` to ``(y, state)`` like the memory layers, so a stack of them streams,
decodes token by token and equals its whole-sequence forward pass. The long-term memory is a parameter:
``memory="neural"`` (:class:`NeuralMemory`) or ``memory="ramnet"`` (:class:`RAMNet`). Diagrams and decisions in
docs/titans.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memorycore.attention import AttentionState, KVCache, SlidingWindowAttention
from memorycore.blocks import MemoryBlock
from memorycore.errors import InputError
from memorycore.neural_memory import NeuralMemory, default_max_lr
from memorycore.ramnet import RAMNet
from memorycore.validation import check_positive

VARIANTS = ("mac", "mag", "mal", "lmm", "swa", "attention")
MEMORIES = ("neural", "ramnet")


@dataclass(frozen=True)
class TitansConfig:
    """Everything that shapes a :class:`TitansModel`.

    Attributes
    ----------
    dim, depth : int
        Model width and number of blocks.
    variant : str
        "mac", "mag", "mal" (the Titans architectures), "lmm" (the memory alone), "swa" (sliding-window attention
        alone) or "attention" (full causal attention).
    heads, kv_heads : int
        Attention heads and key/value heads (grouped-query attention; default ``heads``).
    window : int
        Tokens a sliding-window query sees, itself included (mag, mal, swa).
    segment_len : int
        MAC's segment: attention runs inside a segment, the memory carries what came before.
    persistent_tokens : int
        Learned key/value pairs every attention query sees (Titans Eq. 19); 0 for none.
    memory : str
        The long-term memory: "neural" (NeuralMemory) or "ramnet" (RAMNet).
    memory_heads, memory_depth, memory_chunk : int
        NeuralMemory's heads (default ``heads``), MLP depth and chunk size.
    memory_value_norm : bool
        NeuralMemory writes RMS-normalised values (its ``value_norm``).
    memory_forgetting : float
        NeuralMemory's initial forgetting gate, per token (its ``initial_forgetting``).
    memory_max_lr : float or None
        NeuralMemory's bound on the step one token's gradient takes (its ``max_lr``). None: NeuralMemory's
        default, a quarter of it in MAC (docs/titans.md: at the full bound MAC's memory weights ran away).
    mlp_expansion : int
        Hidden width of each block's gated MLP, as a multiple of ``dim``.
    dropout : float
        Dropout on every residual branch.
    rope : bool
        Rotary position embeddings in attention.
    """

    dim: int
    depth: int
    variant: str = "mac"
    heads: int = 4
    kv_heads: int | None = None
    window: int = 64
    segment_len: int = 64
    persistent_tokens: int = 4
    memory: str = "neural"
    memory_heads: int | None = None
    memory_depth: int = 2
    memory_chunk: int = 16
    memory_value_norm: bool = False
    memory_max_lr: float | None = None
    memory_forgetting: float = 0.01
    mlp_expansion: int = 4
    dropout: float = 0.0
    rope: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"unknown variant {self.variant!r}; pick one of {', '.join(VARIANTS)}")
        if self.memory not in MEMORIES:
            raise InputError(f"unknown memory {self.memory!r}; pick one of {', '.join(MEMORIES)}")
        check_positive(dim=self.dim, depth=self.depth, heads=self.heads, window=self.window,
                       segment_len=self.segment_len, memory_depth=self.memory_depth,
                       memory_chunk=self.memory_chunk, mlp_expansion=self.mlp_expansion)
        if self.dim % self.heads:
            raise InputError(f"dim={self.dim} is not divisible by heads={self.heads}; pick heads that divide dim")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.variant == "mac" and self.memory == "neural" and self.segment_len % self.memory_chunk:
            raise InputError(f"segment_len={self.segment_len} must be a multiple of memory_chunk="
                             f"{self.memory_chunk}: each segment's writes must end on a chunk of the memory")

    def to_dict(self) -> dict:
        return asdict(self)


def build_memory(config: TitansConfig, *, step_scale: float = 1.0) -> nn.Module:
    """The long-term memory layer ``config.memory`` names, wrapped to stream token by token exactly.

    ``step_scale`` scales the neural memory's default step bound where the config leaves ``memory_max_lr`` None.
    """
    heads = config.memory_heads or config.heads
    if config.memory == "ramnet":
        return StreamingMemory(RAMNet(config.dim, heads=heads))
    max_lr = config.memory_max_lr
    if max_lr is None:  # not `or`: an explicit 0 must reach NeuralMemory's error, not turn into the default
        max_lr = step_scale * default_max_lr(config.memory_chunk)
    return StreamingMemory(NeuralMemory(config.dim, heads=heads, depth=config.memory_depth,
                                        chunk_size=config.memory_chunk, value_norm=config.memory_value_norm,
                                        max_lr=max_lr, initial_forgetting=config.memory_forgetting))


class StreamState(NamedTuple):
    """A memory's state at its last chunk boundary, and the inputs it has seen since (fewer than a chunk)."""

    committed: Any
    pending: Tensor | None

    def detach(self) -> "StreamState":
        committed = None if self.committed is None else self.committed.detach()
        return StreamState(committed, None if self.pending is None else self.pending.detach())


class StreamingMemory(nn.Module):
    """A memory layer fed in pieces of any length, equal to one call on the whole sequence.

    NeuralMemory takes each chunk's gradients at the chunk's start weights, so a piece that ends inside a chunk
    cannot simply hand on its state. This keeps the state of the last chunk boundary and the inputs after it, and
    re-reads those inputs with each new piece: decoding one token costs at most one chunk. RAMNet streams exactly
    as it is and passes through.
    """

    def __init__(self, memory: nn.Module) -> None:
        super().__init__()
        self.memory = memory
        self.alignment = memory.chunk_size if isinstance(memory, NeuralMemory) else 1

    def forward(self, x: Tensor, state: StreamState | None = None) -> tuple[Tensor, StreamState]:
        committed, pending = state if state is not None else (None, None)
        seen = x if pending is None else torch.cat([pending, x], dim=1)
        y, after = self.memory(seen, committed)
        y = y[:, seen.shape[1] - x.shape[1]:]
        aligned = seen.shape[1] - seen.shape[1] % self.alignment
        if aligned == seen.shape[1]:
            return y, StreamState(after, None)
        if aligned:  # only pieces that end inside a chunk pay for this second pass over their aligned part
            committed = self.memory(seen[:, :aligned], committed)[1]
        return y, StreamState(committed, seen[:, aligned:])

    def read(self, x: Tensor, state: StreamState | None, conv: Tensor | None,
             position: int) -> tuple[Tensor, Tensor | None]:
        """Read without writing, from the memory at the last chunk boundary; x's first token is at ``position``."""
        return self.memory.read(x, None if state is None else state.committed, conv, position)


class MACState(NamedTuple):
    """State of :class:`MemoryAsContext`."""

    read: StreamState | None  # the memory as the previous segment left it: what this segment reads
    read_conv: Tensor | None  # convolution history of the read stream (the segment inputs)
    write: StreamState | None  # the memory being written with this segment's attention outputs
    attention: AttentionState | None  # this segment's keys and values (retrieved memory and inputs)
    position: int

    def detach(self) -> "MACState":
        return MACState(*(None if part is None else part.detach() for part in self[:4]), self.position)


class MemoryAsContext(nn.Module):
    """Titans MAC: the memory's retrieval is context for attention inside each segment.

    Per segment S of ``segment_len`` tokens: ``h = M*(q)`` read with the weights the previous segment left; causal
    attention over ``[persistent | h | S]``; the attention output ``y`` is written into the memory, and the block
    returns ``y * sigmoid(norm(M*(y)))``, the read after that write (paper Eq. 21-25). ``y`` is RMS-normalised
    before the memory reads it, as every other memory input is by its block's norm (unnormalised attention outputs
    drove the memory's weights to overflow within 50 training steps of a needle task).

    Decision (the paper is silent): ``h_j`` is derived from token j, so a token i attends to ``h_j`` only for
    ``j <= i`` (h_j sits at token j's position for the rotary embedding); the paper's plain concatenation would let
    token i see the retrievals of later tokens of its segment. Attention does not reach past the segment: what came
    before reaches it through the memory.
    """

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.segment_len = config.segment_len
        # MAC writes attention outputs, alike within a segment: a chunk's gradients add up in one direction, and at
        # the memory's usual bound its deep weights ran away (docs/titans.md)
        self.memory = build_memory(config, step_scale=0.25)
        self.attention = SlidingWindowAttention(config.dim, heads=config.heads, kv_heads=config.kv_heads,
                                                window=None, rope=config.rope,
                                                persistent_tokens=config.persistent_tokens)
        self.write_norm, self.gate_norm = nn.RMSNorm(config.dim), nn.RMSNorm(config.dim)

    def forward(self, x: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState]:
        if state is not None and not isinstance(state, MACState):
            raise InputError("state does not fit this MAC layer: pass the state it returned, or None")
        read, read_conv, write, attention, position = state or (None, None, None, None, 0)
        outputs, start = [], 0
        while start < x.shape[1]:
            end = min(x.shape[1], start + self.segment_len - position % self.segment_len)
            piece = x[:, start:end]
            retrieved, read_conv = self.memory.read(piece, read, read_conv, position)
            y, attention = self._attend(piece, retrieved, attention, position)
            written, write = self.memory(self.write_norm(y), write)  # the memory's input normalised, as in a block
            outputs.append(y * torch.sigmoid(self.gate_norm(written)))
            position += end - start
            start = end
            if position % self.segment_len == 0:  # the segment is complete: the next one reads what it wrote
                read, attention = write, None
        return torch.cat(outputs, dim=1), MACState(read, read_conv, write, attention, position)

    def _attend(self, piece: Tensor, retrieved: Tensor, state: AttentionState | None,
                position: int) -> tuple[Tensor, AttentionState]:
        attention = self.attention
        if state is None:
            state = AttentionState(KVCache.empty(piece.shape[0], attention.kv_heads, attention.head_dim,
                                                 device=piece.device, dtype=piece.dtype), position)
        q, k, v, state = attention.project(piece, state)
        _, retrieved_k, retrieved_v, _ = attention.project(retrieved, state)
        positions = torch.arange(position, position + piece.shape[1], device=piece.device)
        y, state = attention.attend(q, torch.cat([retrieved_k, k], 2), torch.cat([retrieved_v, v], 2), state,
                                    key_positions=torch.cat([positions, positions]))
        return attention.to_out(y), state


class MAGState(NamedTuple):
    """State of :class:`MemoryAsGate`: its attention's and its memory's."""

    attention: AttentionState | None
    memory: StreamState | None

    def detach(self) -> "MAGState":
        return MAGState(*(None if part is None else part.detach() for part in self))


class MemoryAsGate(nn.Module):
    """Titans MAG: sliding-window attention and the memory read the same input; the memory gates the attention.

    ``o = norm_y(SWA([persistent | x])) * sigmoid(norm_m(M(x)))``, both norms with learned vector weights.
    Decision: the persistent tokens enter the attention only; in the memory their role, an input-independent
    start, is already played by the memory's learned initial weights.
    """

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.attention = _window_attention(config)
        self.memory = build_memory(config)
        self.attention_norm, self.memory_norm = nn.RMSNorm(config.dim), nn.RMSNorm(config.dim)

    def forward(self, x: Tensor, state: MAGState | None = None) -> tuple[Tensor, MAGState]:
        if state is not None and not isinstance(state, MAGState):
            raise InputError("state does not fit this MAG layer: pass the state it returned, or None")
        attention_state, memory_state = state or (None, None)
        y, attention_state = self.attention(x, attention_state)
        m, memory_state = self.memory(x, memory_state)
        return self.attention_norm(y) * torch.sigmoid(self.memory_norm(m)), MAGState(attention_state, memory_state)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: ``W_out(silu(x W_gate) * x W_in)``."""

    def __init__(self, dim: int, expansion: int) -> None:
        super().__init__()
        hidden = dim * expansion * 2 // 3  # the parameter count of a plain MLP of the same expansion
        self.to_hidden = nn.Linear(dim, 2 * hidden, bias=False)
        self.to_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.to_hidden(x).chunk(2, dim=-1)
        return self.to_out(F.silu(gate) * value)


def _window_attention(config: TitansConfig, window: int | None = -1) -> SlidingWindowAttention:
    return SlidingWindowAttention(config.dim, heads=config.heads, kv_heads=config.kv_heads,
                                  window=config.window if window == -1 else window, rope=config.rope,
                                  persistent_tokens=config.persistent_tokens)


def _mixers(config: TitansConfig) -> list[nn.Module]:
    """The sequence mixers of one block, applied in order (each in its own pre-norm residual branch)."""
    variant = config.variant
    if variant == "mac":
        return [MemoryAsContext(config)]
    if variant == "mag":
        return [MemoryAsGate(config)]
    if variant == "mal":  # memory layer, then sliding-window attention
        return [build_memory(config), _window_attention(config)]
    if variant == "lmm":
        return [build_memory(config)]
    return [_window_attention(config, config.window if variant == "swa" else None)]


class TitansState(NamedTuple):
    """State of a :class:`TitansModel`: one entry per residual branch, in order."""

    layers: tuple

    def detach(self) -> "TitansState":
        return TitansState(tuple(layer.detach() for layer in self.layers))


class TitansModel(nn.Module):
    """A stack of pre-norm residual blocks (a sequence mixer, then a gated MLP) of one Titans variant.

    Maps ``x [batch, time, dim]`` to ``(y, TitansState)``; feed the state back to stream a sequence in pieces of
    any length (for MAC, the memory advances at segment boundaries) or to decode token by token. Keyword arguments
    are the fields of :class:`TitansConfig`.

    Examples
    --------
    >>> model = TitansModel(64, 2, variant="mag", window=32)
    >>> y, state = model(torch.randn(1, 100, 64))
    >>> y_next, state = model(torch.randn(1, 1, 64), state)
    """

    def __init__(self, dim: int, depth: int, **options: Any) -> None:
        super().__init__()
        self.config = TitansConfig(dim=dim, depth=depth, **options)
        blocks = []
        for _ in range(depth):
            mixers = _mixers(self.config)
            mlp = GatedMLP(dim, self.config.mlp_expansion)
            # every mixer gets a residual branch; the block's last one also carries the MLP
            blocks += [MemoryBlock(dim, mixer, mlp if last else None, dropout=self.config.dropout)
                       for last, mixer in zip([False] * (len(mixers) - 1) + [True], mixers)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim)

    @classmethod
    def from_config(cls, config: TitansConfig) -> "TitansModel":
        options = config.to_dict()
        return cls(options.pop("dim"), options.pop("depth"), **options)

    def forward(self, x: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        if state is not None and (not isinstance(state, TitansState) or len(state.layers) != len(self.blocks)):
            raise InputError(f"state does not fit this model: expected a TitansState of {len(self.blocks)} layers; "
                             "pass the state this model returned, or None")
        layer_states = state.layers if state is not None else (None,) * len(self.blocks)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states):
            x, layer_state = block(x, layer_state)
            new_states.append(layer_state)
        return self.norm(x), TitansState(tuple(new_states))

    def attention_layers(self) -> list[SlidingWindowAttention]:
        """Every attention layer, in order: what a KV-cache press acts on."""
        return [module for module in self.modules() if isinstance(module, SlidingWindowAttention)]
