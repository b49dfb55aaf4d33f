"""Titans neural long-term memory (Behrouz et al., 2025) as a sequence layer with explicit recurrent state."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memorycore.kernels.neural_memory import neural_memory
from memorycore.kernels.neural_memory.reference import mlp_forward
from memorycore.causal_conv import causal_conv
from memorycore.errors import InputError
from memorycore.validation import check_positive, head_width


def default_max_lr(chunk_size: int) -> float:
    """NeuralMemory's default bound on one gradient's total step: ``min(0.1, 1 / chunk_size)``."""
    return min(0.1, 1.0 / chunk_size)


class NeuralMemoryState(NamedTuple):
    """Recurrent state of :class:`NeuralMemory`; carry it between calls to stream a sequence.

    Attributes
    ----------
    weights : tuple of Tensor [batch, heads, d_in, d_out]
        The memory MLP's current weights, one tensor per layer (float32 or float64).
    momentum : tuple of Tensor
        The momentum ("past surprise") of each layer, same shapes as ``weights``.
    conv : Tensor [batch, conv_kernel - 1, 3 * heads * head_dim] or None
        The last q/k/v projections before the causal convolution (None when the layer has no convolution).
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    conv: Tensor | None

    def detach(self) -> "NeuralMemoryState":
        """The same state cut from the autograd graph (truncated back-propagation through time)."""
        return NeuralMemoryState(
            tuple(w.detach() for w in self.weights),
            tuple(s.detach() for s in self.momentum),
            None if self.conv is None else self.conv.detach(),
        )


class NeuralMemory(nn.Module):
    """Neural long-term memory: a deep MLP per head that learns at test time from surprise.

    Each token writes ``(k_t, v_t)`` into the memory by one step of gradient descent with momentum and weight decay on
    ``||M(k_t) - v_t||^2``, with data-dependent learning rate theta_t, momentum eta_t and decay alpha_t (per token and
    head: ``eta = sigmoid(.)``, ``alpha = sigmoid(.)`` and ``theta = max_lr * sigmoid(.) * (1 - eta)`` of linear maps
    of x_t), and reads ``y_t = M_t(q_t)`` (causal: a token sees itself and earlier tokens only). q, k and v are linear
    projections each followed by a causal depthwise convolution and SiLU; q and k are L2-normalised. The read is
    RMS-normalised per head, gated by ``silu(x W_g)`` and projected back to ``dim``. Training is chunk-wise parallel:
    inside a chunk of ``chunk_size`` tokens every gradient is taken at the chunk's start weights (Titans section 3.2);
    with ``chunk_size=1`` the layer is the exact token-by-token recurrence.

    Parameters
    ----------
    dim : int
        Model width; input and output are ``[batch, time, dim]``.
    heads : int, default 8
        Number of independent memories.
    head_dim : int, optional
        Width of each memory's keys and values; defaults to ``dim // heads`` (then ``dim`` must be divisible by heads).
    depth : int, default 2
        Layers of the memory MLP (1 = linear memory).
    expansion : int, default 4
        Hidden width of the memory MLP as a multiple of ``head_dim`` (unused when ``depth == 1``).
    chunk_size : int, default 64
        Tokens whose gradients share one set of base weights.
    momentum : bool, default True
        Use the momentum term (eta); False gives plain gradient descent with decay.
    weight_decay : bool, default True
        Use the forgetting gate (alpha); False never forgets.
    conv_kernel : int, default 4
        Width of the causal depthwise convolution after the q/k/v projections; 0 disables it.
    max_lr : float, optional
        Upper bound of the total step one gradient takes, ``theta / (1 - eta)`` (with momentum off: of theta).
        Default ``min(0.1, 1 / chunk_size)``: a chunk's gradients, all taken at the same weights, add up, so the
        bound shrinks with the chunk; the momentum replays each gradient ``1 / (1 - eta)`` times, hence the factor
        ``1 - eta`` in theta. Both keep a long sequence from overflowing the memory (docs/neural_memory.md).
    max_momentum : float, optional
        Opt-in upper bound of the momentum eta (``eta = max_momentum * sigmoid(.)``): how long a gradient keeps
        acting. Default None: ``eta = sigmoid(.)``, unbounded below 1.
    value_norm : bool, default False
        RMS-normalise each head's values (no learned scale) before they are written. ``max_lr`` bounds the step but
        not what is written: with values that grow with their projection (MAC writes attention outputs) a deep
        memory's weights can run away within one sequence (docs/titans.md). The read is RMS-normalised anyway, so
        unit values cost the memory only their relative sizes.
    initial_forgetting : float, default 0.01
        The forgetting gate alpha every token starts with, before training moves it (in (0, 1)). Training on short
        contexts barely moves it, so it sets how far back the memory reaches at test time: 1% a token keeps 8% of
        a write after 256 tokens, 0.1% keeps 77% (docs/titans.md).

    Examples
    --------
    >>> import torch
    >>> from memorycore import NeuralMemory
    >>> mem = NeuralMemory(64, heads=4, chunk_size=16)
    >>> x = torch.randn(2, 48, 64)
    >>> y, state = mem(x)
    >>> y.shape
    torch.Size([2, 48, 64])
    >>> y_next, state = mem(torch.randn(2, 16, 64), state=state)  # stream on with the carried state
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        head_dim: int | None = None,
        depth: int = 2,
        expansion: int = 4,
        chunk_size: int = 64,
        momentum: bool = True,
        weight_decay: bool = True,
        conv_kernel: int = 4,
        max_lr: float | None = None,
        max_momentum: float | None = None,
        value_norm: bool = False,
        initial_forgetting: float = 0.01,
    ) -> None:
        super().__init__()
        check_positive(dim=dim, heads=heads, depth=depth, expansion=expansion, chunk_size=chunk_size)
        head_dim = head_width(dim, heads, head_dim, "head_dim")
        if conv_kernel < 0:
            raise InputError(f"conv_kernel must be >= 0 (0 disables the convolution), got {conv_kernel}")
        if max_lr is None:
            max_lr = default_max_lr(chunk_size)
        if not 0 < max_lr < math.inf:
            raise InputError(f"max_lr must be a finite number > 0, got {max_lr}")
        if not 0 < initial_forgetting < 1:
            raise InputError(f"initial_forgetting must be in (0, 1), got {initial_forgetting}")
        if max_momentum is not None and not 0 < max_momentum < 1:
            raise InputError(f"max_momentum must be in (0, 1) or None, got {max_momentum}")
        self.max_momentum, self.value_norm = max_momentum, value_norm
        self.dim, self.heads, self.head_dim, self.depth = dim, heads, head_dim, depth
        self.chunk_size, self.conv_kernel, self.max_lr = chunk_size, conv_kernel, max_lr
        self.use_momentum, self.use_weight_decay = momentum, weight_decay
        inner = heads * head_dim

        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.qkv_conv = causal_conv(3 * inner, conv_kernel)
        self.to_gates = nn.Linear(dim, 3 * heads)  # theta, eta, alpha per head
        widths = [head_dim] + [head_dim * expansion] * (depth - 1) + [head_dim]
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.randn(heads, d_in, d_out) / math.sqrt(d_in)) for d_in, d_out in zip(widths, widths[1:])
        )
        self.out_norm = nn.RMSNorm(head_dim)
        self.to_out_gate = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self._init_gates(initial_forgetting)

    def _init_gates(self, forgetting: float) -> None:
        # Start from a memory whose gradients take half the maximum total step (theta = max_lr / 4, eta = 0.5) and
        # that forgets `forgetting` a token; zero weights make the gates start input-independent, the outer loop
        # then learns what to make of x.
        nn.init.zeros_(self.to_gates.weight)
        bias = self.to_gates.bias.detach().view(3, self.heads)
        bias[0].fill_(0.0)
        bias[1].fill_(0.0)
        bias[2].fill_(math.log(forgetting / (1 - forgetting)))

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> NeuralMemoryState:
        """The state before any token: the learned initial weights, zero momentum, zero convolution history."""
        device = device or self.to_qkv.weight.device
        dtype = torch.promote_types(self.initial_weights[0].dtype, torch.float32)
        weights = tuple(w.to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1) for w in self.initial_weights)
        momentum = tuple(torch.zeros_like(w) for w in weights)
        conv = self.qkv_conv.empty_history(batch_size, device, self.to_qkv.weight.dtype)
        return NeuralMemoryState(weights, momentum, conv)

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        """Write the sequence into the memory and read it back causally.

        Parameters
        ----------
        x : Tensor [batch, time, dim]
        state : NeuralMemoryState, optional
            The state returned by the previous call; None starts from the learned initial memory.
            Feeding a sequence in pieces gives the same output as one call when every piece but the last
            has a length that is a multiple of ``chunk_size``.

        Returns
        -------
        y : Tensor [batch, time, dim]
        state : NeuralMemoryState
        """
        self._check_input(x, state)
        batch, time, _ = x.shape
        if state is None:
            state = self.initial_state(batch, x.device)

        qkv, conv_tail = self.qkv_conv(self.to_qkv(x), state.conv)
        q, k, v = F.silu(qkv).view(batch, time, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.value_norm:
            v = F.rms_norm(v, (self.head_dim,))
        lr, log_eta, log_keep = self.gates(x)

        y, weights, momentum = neural_memory(
            q, k, v, lr, log_eta, log_keep, state.weights, state.momentum, self.chunk_size
        )
        return self._output(y, x), NeuralMemoryState(weights, momentum, conv_tail)

    def read(self, x: Tensor, state: NeuralMemoryState | None = None, conv: Tensor | None = None,
             position: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Retrieve ``M(q)`` for the queries of ``x`` from the memory in ``state``, without writing anything.

        Titans' memory-as-context reads each segment with the weights the previous segment left. ``conv`` is the
        convolution history of this read-only stream (None: zeros), kept apart from the history of what is written.
        ``position`` is accepted for the same call as :meth:`RAMNet.read`; this memory does not address by position.

        Returns
        -------
        y : Tensor [batch, time, dim]
        conv : Tensor or None
            The read stream's new convolution history.
        """
        self._check_input(x, state)
        batch, time, _ = x.shape
        state = state or self.initial_state(batch, x.device)
        qkv, conv_tail = self.qkv_conv(self.to_qkv(x), conv)
        q = F.normalize(F.silu(qkv).view(batch, time, 3, self.heads, self.head_dim)[:, :, 0].transpose(1, 2), dim=-1)
        _, pre_activations = mlp_forward(q.to(state.weights[0].dtype), state.weights)
        return self._output(pre_activations[-1].to(q.dtype), x), conv_tail

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head RMS norm of the read ``y [b, h, t, d]``, gated by x, projected back to ``dim``."""
        # the norm's weight in the read's dtype: under bf16 autocast a float32 weight sends torch.rms_norm to its slow
        # unfused path (with a warning on every call)
        norm = self.out_norm
        y = F.rms_norm(y, norm.normalized_shape, norm.weight.to(y.dtype), norm.eps)
        y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        y = y * F.silu(self.to_out_gate(x))
        return self.to_out(y)

    def _check_input(self, x: Tensor, state: NeuralMemoryState | None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise InputError(f"expected input of shape [batch, time, {self.dim}], got {list(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise InputError(f"the input is empty (batch {x.shape[0]}, time {x.shape[1]}); pass at least one token "
                             "of one sequence")
        if state is None:
            return
        # a state of another layer would run: the memory's shapes come from the state, so compare them here
        expected = [(x.shape[0], *w.shape) for w in self.initial_weights]
        given = getattr(state, "weights", None), getattr(state, "momentum", None)
        if not isinstance(state, NeuralMemoryState) or any(
                ws is None or [tuple(w.shape) for w in ws] != expected for ws in given):
            raise InputError(f"state does not fit this layer and batch: expected memory weights of shapes "
                             f"{[list(e) for e in expected]}; pass the state this layer returned for the same "
                             "batch, or None")

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per token and head: learning rate theta, log momentum log(eta), log retention log(1 - alpha)."""
        raw = self.to_gates(x).float() if x.dtype in (torch.float16, torch.bfloat16) else self.to_gates(x)
        theta, eta, alpha = raw.view(*x.shape[:2], 3, self.heads).permute(2, 0, 3, 1)  # each [batch, heads, time]
        lr = self.max_lr * torch.sigmoid(theta)
        if not self.use_momentum:
            log_eta = torch.full_like(eta, float("-inf"))
        else:
            log_eta = F.logsigmoid(eta) + (math.log(self.max_momentum) if self.max_momentum is not None else 0.0)
            # the momentum replays a gradient 1 / (1 - eta) times: scale theta so that its total step stays <= max_lr
            lr = lr * -torch.expm1(log_eta)
        log_keep = F.logsigmoid(-alpha) if self.use_weight_decay else torch.zeros_like(alpha)
        return lr, log_eta, log_keep

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, depth={self.depth}, "
                f"chunk_size={self.chunk_size}, momentum={self.use_momentum}, weight_decay={self.use_weight_decay}"
                + (", value_norm=True" if self.value_norm else ""))
