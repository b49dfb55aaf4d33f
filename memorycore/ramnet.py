"""RAM-Net (arXiv 2602.11958): a sparse addressable-memory layer with explicit recurrent state."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memorycore.kernels.ramnet import TouchedRows, pdma_step, pdma_touched, product_topk
from memorycore.causal_conv import causal_conv
from memorycore.errors import InputError
from memorycore.validation import check_positive, head_width

MAX_SLOTS = 2**30  # beyond this one head's state alone would not fit in any accelerator's memory


class RAMNetState:
    """Recurrent state of :class:`RAMNet`; carry it between calls to stream a sequence.

    Attributes
    ----------
    slots : Tensor [batch, heads, slots, value_dim]
        The slot values S (float32).
    normaliser : Tensor [batch, heads, slots]
        The write-weight normaliser z (starts at 1 / slots).
    conv : Tensor [batch, conv_kernel - 1, channels] or None
        The last q/k/v projections before the causal convolution (None without convolution).
    position : int
        Tokens seen so far: the offset of the CAPE cyclic shift.

    A forward pass returns the memory as the rows it touched and builds the full ``slots`` / ``normaliser`` tensors
    (O(slots) memory) only when one of them is first read, so training that discards the state never allocates them,
    and a state passed back to the layer (streaming) is read through its touched rows, not built.
    The state is never changed by a forward pass; :meth:`RAMNet.step` updates ``slots`` / ``normaliser`` in place.
    """

    def __init__(self, slots: Tensor | None, normaliser: Tensor | None, conv: Tensor | None, position: int,
                 *, touched: TouchedRows | None = None) -> None:
        self._slots, self._normaliser, self._touched = slots, normaliser, touched
        self.conv, self.position = conv, position
        self._lent = False  # whether a state made from this one reads our built tensors (then step copies them)

    @property
    def slots(self) -> Tensor | None:
        self._build()
        return self._slots

    @property
    def normaliser(self) -> Tensor | None:
        self._build()
        return self._normaliser

    def _build(self) -> None:
        if self._touched is not None:
            self._slots, self._normaliser = self._touched.materialise()
            self._touched = None

    def _memory(self) -> tuple[Tensor | TouchedRows | None, Tensor | None]:
        """The memory as :func:`memorycore.kernels.ramnet.pdma_touched` takes it: still as touched rows if not built yet."""
        if self._touched is not None:
            return self._touched, None
        self._lent = self._slots is not None
        return self._slots, self._normaliser

    def _own_memory(self) -> None:
        """Before an in-place update: copy the built tensors if a state made from this one still reads them."""
        self._build()
        if self._lent:
            self._slots, self._normaliser = self._slots.clone(), self._normaliser.clone()
            self._lent = False

    def memory_shape(self) -> tuple[int, ...] | None:
        """Shape of ``slots`` without building it (None for a state without memory)."""
        if self._touched is not None:
            batch, heads, _, dim = self._touched.rows.shape
            return (batch, heads, self._touched.num_slots, dim)
        return None if self._slots is None else tuple(self._slots.shape)

    def detach(self) -> "RAMNetState":
        """The same state cut from the autograd graph (truncated back-propagation through time)."""
        conv = None if self.conv is None else self.conv.detach()
        if self._touched is not None:
            touched = self._touched._replace(
                rows=self._touched.rows.detach(), norms=self._touched.norms.detach(),
                base_slots=_detach(self._touched.base_slots), base_normaliser=_detach(self._touched.base_normaliser))
            return RAMNetState(None, None, conv, self.position, touched=touched)
        detached = RAMNetState(_detach(self._slots), _detach(self._normaliser), conv, self.position)
        if self._slots is not None:  # both hold the same tensors now: an in-place step on either copies first
            self._lent = detached._lent = True
        return detached

    def __repr__(self) -> str:
        return f"RAMNetState(memory {self.memory_shape()}, position={self.position})"


def _detach(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


class RAMNet(nn.Module):
    """RAM-Net: linear attention over a large, sparsely addressed slot memory.

    Each head owns ``factor_size ** factors`` slots of ``value_dim`` values. A token's key is split into ``factors``
    groups of ``factor_size`` logits; the Kronecker product of the groups' softmaxes is a distribution over the slots
    of which only the ``top_k`` largest entries are kept (found exactly by a beam merge, never forming all slots).
    The token writes its value into those K slots (PDMA: ``S <- Diag(1 - w)^gamma S + w^T v`` with a normaliser
    ``z`` updated the same way) and reads ``o = r Diag(z + eps)^{-1} S`` through the K slots addressed by its query.
    With ``cape=True`` the addresses are cyclically shifted by the token's position, so a read at t and a write at
    t' overlap as a function of t - t' only (relative addressing; the paper uses it in shallow layers). The state is
    O(slots x value_dim) per head whatever the length, and a token costs O(top_k value_dim + factors top_k^2).

    q/k/v are linear projections followed by a causal depthwise convolution; the q/k logits of each head are scaled
    by ``exp(alpha)``, a learned per-head temperature. The reads of all heads are projected back to ``dim``.

    Parameters
    ----------
    dim : int
        Model width; input and output are ``[batch, time, dim]``.
    heads : int, default 4
        Independent memories.
    factors : int, default 5
        U, the order of the product softmax.
    factor_size : int, default 4
        d_p, the logits per factor; each head has ``factor_size ** factors`` slots (default 4^5 = 1024). Prefer
        many small factors to a few large ones (MQAR measurements: docs/ramnet.md).
    top_k : int, default 8
        K, slots written and read per token.
    gamma : float, default 1.0
        Forgetting exponent in [0, 4]: 0 keeps a cumulative mean, 1 an exponential moving average, > 1 forgets faster.
    value_dim : int, optional
        d_v, width of a slot; defaults to ``dim // heads``.
    cape : bool, default True
        Cyclic positional shift of the addresses (relative addressing); False addresses by content alone.
    conv_kernel : int, default 4
        Width of the causal depthwise convolution after the projections; 0 disables it.
    chunk_size : int, default 16
        Tokens per chunk of the chunk-form training path; results do not depend on it (16-32 is fastest on CPU).
    eps : float, default 1e-6
        Added to the normaliser before the division in the read.
    balance : float, default 0
        Strength of a slot-balance regulariser applied while training (see Notes); 0 trains on your loss alone, as
        the paper does. Try 0.1 when the layer's reads lose its writes.
    normalize_reads : bool, default False
        Weigh a read's ``top_k`` slots by their weights divided by their sum (as top-K routers renormalise their
        gates): with many slots the paper's raw weights, and so the reads, start tiny. Writes are unchanged.
    temperature : float, default 1.0
        Initial value of the learned per-head temperature ``exp(alpha)`` that scales the q/k logits: how much weight
        the chosen slots carry at first, not which are chosen.

    Notes
    -----
    A read whose K slots hold nothing written yet returns zero and passes no gradient to its address, so a layer whose
    reads move away from its writes cannot find them again (a collapse seen on MQAR, docs/ramnet.md). With
    ``balance > 0``, in training mode, the layer adds to the gradient of its q and k logits that of
    ``balance / 2 * (imbalance(q) + imbalance(k))``, ``imbalance = factor_size * sum_j P_j^2 - 1`` averaged over heads
    and factors, ``P`` a factor's softmax averaged over the call's batch and time: 0 when every index is used equally
    often, however sharp each token's own address (as mixture-of-experts routers balance their experts). The output and
    your loss value do not include it. Not the default: it can also keep a layer from learning (measurements:
    docs/ramnet.md). :meth:`addresses` shows which slots are read and written.

    Examples
    --------
    >>> import torch
    >>> from memorycore import RAMNet
    >>> layer = RAMNet(64, heads=4, factors=3, factor_size=8, top_k=4)  # 512 slots per head
    >>> y, state = layer(torch.randn(2, 32, 64))
    >>> y.shape, state.slots.shape
    (torch.Size([2, 32, 64]), torch.Size([2, 4, 512, 16]))
    >>> y_next, state = layer(torch.randn(2, 8, 64), state=state)  # stream on with the carried state
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 4,
        factors: int = 5,
        factor_size: int = 4,
        top_k: int = 8,
        gamma: float = 1.0,
        value_dim: int | None = None,
        cape: bool = True,
        conv_kernel: int = 4,
        chunk_size: int = 16,
        eps: float = 1e-6,
        balance: float = 0.0,
        normalize_reads: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive(dim=dim, heads=heads, factors=factors, top_k=top_k, chunk_size=chunk_size)
        value_dim = head_width(dim, heads, value_dim, "value_dim")
        if not isinstance(factor_size, int) or factor_size < 2:
            raise InputError(f"factor_size must be an integer >= 2 (a softmax over one logit addresses nothing), "
                             f"got {factor_size!r}")
        slots = factor_size**factors
        if slots > MAX_SLOTS:
            raise InputError(f"factor_size**factors = {factor_size}**{factors} slots is more than {MAX_SLOTS}; "
                             "use fewer factors or a smaller factor_size")
        if top_k > slots:
            raise InputError(f"top_k={top_k} is more than the {slots} slots; lower top_k or add factors")
        if not 0 <= gamma <= 4:
            raise InputError(f"gamma must be in [0, 4] (0 cumulative mean, 1 moving average), got {gamma}")
        if not isinstance(conv_kernel, int) or conv_kernel < 0:
            raise InputError(f"conv_kernel must be an integer >= 0 (0 disables the convolution), got {conv_kernel!r}")
        if not eps > 0:
            raise InputError(f"eps must be > 0, got {eps}")
        if not 0 <= balance < float("inf"):
            raise InputError(f"balance must be a finite number >= 0 (0 turns the regulariser off), got {balance}")
        if not 0 < temperature < float("inf"):
            raise InputError(f"temperature must be a finite number > 0 (it multiplies the q/k logits), "
                             f"got {temperature}")
        self.dim, self.heads, self.factors, self.factor_size = dim, heads, factors, factor_size
        self.slots, self.top_k, self.gamma, self.value_dim = slots, top_k, float(gamma), value_dim
        self.cape, self.conv_kernel, self.chunk_size, self.eps = cape, conv_kernel, chunk_size, eps
        self.balance, self.normalize_reads = float(balance), bool(normalize_reads)
        self.key_dim = factors * factor_size
        channels = heads * (2 * self.key_dim + value_dim)

        self.to_qkv = nn.Linear(dim, channels, bias=False)
        self.qkv_conv = causal_conv(channels, conv_kernel)
        # alpha: q/k weights scaled by exp(alpha)
        self.log_temperature = nn.Parameter(torch.full((heads,), math.log(temperature)))
        self.to_out = nn.Linear(heads * value_dim, dim, bias=False)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> RAMNetState:
        """The empty memory: zero slots, normaliser 1 / slots, zero convolution history, position 0."""
        device = device or self.to_qkv.weight.device
        slots = torch.zeros(batch_size, self.heads, self.slots, self.value_dim, device=device)
        normaliser = torch.full((batch_size, self.heads, self.slots), 1.0 / self.slots, device=device)
        return RAMNetState(slots, normaliser, self._without_memory(batch_size, device).conv, 0)

    def _without_memory(self, batch_size: int, device: torch.device) -> RAMNetState:
        """The initial state without ``slots`` / ``normaliser``: ``pdma_touched`` starts from the empty memory."""
        conv = self.qkv_conv.empty_history(batch_size, device, self.to_qkv.weight.dtype)
        return RAMNetState(None, None, conv, 0)

    def forward(self, x: Tensor, state: RAMNetState | None = None) -> tuple[Tensor, RAMNetState]:
        """Write the sequence into the slots and read it back causally.

        Parameters
        ----------
        x : Tensor [batch, time, dim]
        state : RAMNetState, optional
            The state returned by the previous call (not modified); None starts from the empty memory.
            Feeding a sequence in pieces gives the same output as one call.

        Returns
        -------
        y : Tensor [batch, time, dim]
        state : RAMNetState
        """
        self._check_input(x, state, time_axis=True)
        if state is None:  # pdma_touched starts from the empty memory without building it
            state = self._without_memory(x.shape[0], x.device)
        read_index, read_weight, write_index, write_weight, v, conv = self._addresses(x, state)
        out, touched = pdma_touched(  # a carried state stays as touched rows: no O(slots) work per call
            v, write_index, write_weight, read_index, read_weight, *state._memory(),
            gamma=self.gamma, eps=self.eps, num_slots=self.slots, chunk_size=self.chunk_size,
        )
        y = self.to_out(out.transpose(1, 2).flatten(2).to(x.dtype))
        return y, RAMNetState(None, None, conv, state.position + x.shape[1], touched=touched)

    @torch.no_grad()
    def step(self, x: Tensor, state: RAMNetState | None = None) -> tuple[Tensor, RAMNetState]:
        """One token of inference, O(top_k value_dim) per head whatever the number of slots.

        Parameters
        ----------
        x : Tensor [batch, dim]
        state : RAMNetState, optional
            Updated IN PLACE and returned (copying the memory would cost O(slots)); keep a ``copy.deepcopy`` if you
            need the old state. States that ``forward`` or ``detach`` made from it are not affected (the memory they
            share is copied once before the first such update).

        Returns
        -------
        y : Tensor [batch, dim]
        state : RAMNetState
        """
        if x.ndim != 2:
            raise InputError(f"step takes one token per sequence, [batch, {self.dim}]; got {list(x.shape)}")
        x = x[:, None]
        self._check_input(x, state, time_axis=False)
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        state._own_memory()  # states made from it by forward keep their memory
        read_index, read_weight, write_index, write_weight, v, conv = self._addresses(x, state)
        out = pdma_step(
            v[:, :, 0], write_index[:, :, 0], write_weight[:, :, 0], read_index[:, :, 0], read_weight[:, :, 0],
            state.slots, state.normaliser, gamma=self.gamma, eps=self.eps,
        )
        y = self.to_out(out.flatten(1).to(x.dtype))
        state.conv, state.position = conv, state.position + 1  # the same object: no second holder of its memory
        return y, state

    def read(self, x: Tensor, state: RAMNetState | None = None, conv: Tensor | None = None,
             position: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Read the slots in ``state`` with the queries of ``x``, without writing anything.

        Titans' memory-as-context reads each segment from the memory the previous segment left. ``conv`` is the
        convolution history of this read-only stream (None: zeros), kept apart from the history of what is written;
        ``position`` is that of x's first token for CAPE's shift (default: the tokens ``state`` has written).

        Returns
        -------
        y : Tensor [batch, time, dim]
        conv : Tensor or None
            The read stream's new convolution history.
        """
        self._check_input(x, state, time_axis=True)
        batch, time, _ = x.shape
        state = state or self.initial_state(batch, x.device)
        slots, normaliser = state.slots, state.normaliser
        if slots is None:  # a state that never wrote: the empty memory
            empty = self.initial_state(batch, x.device)
            slots, normaliser = empty.slots, empty.normaliser
        qkv, conv_tail = self.qkv_conv(self.to_qkv(x), conv)
        q = qkv.view(batch, time, self.heads, -1).transpose(1, 2)[..., :self.key_dim]
        logits = q.reshape(batch, self.heads, time, self.factors, self.factor_size)
        read_index, read_weight = self._decode(logits * self.log_temperature.exp()[:, None, None, None],
                                               state.position if position is None else position)
        if self.normalize_reads:
            read_weight = read_weight / read_weight.sum(-1, keepdim=True)
        flat = read_index.flatten(2)  # [b, h, t * k]
        rows = slots.gather(2, flat[..., None].expand(*flat.shape, self.value_dim)).view(
            *read_index.shape, self.value_dim)
        coef = read_weight / (normaliser.gather(2, flat).view_as(read_index) + self.eps)
        out = (coef[..., None] * rows).sum(-2)  # [b, h, t, value_dim]
        return self.to_out(out.transpose(1, 2).flatten(2).to(x.dtype)), conv_tail

    @torch.no_grad()
    def addresses(self, x: Tensor, state: RAMNetState | None = None) -> dict[str, Tensor]:
        """The slots each token reads and writes, and their weights: to inspect what the layer learnt to address.

        Parameters
        ----------
        x : Tensor [batch, time, dim]
        state : RAMNetState, optional
            As in :meth:`forward` (its position shifts CAPE addresses, its history feeds the convolution).

        Returns
        -------
        dict of str to Tensor [batch, heads, time, top_k]
            ``read_slots``, ``read_weights``, ``write_slots``, ``write_weights`` (slots as int64 indices).
        """
        self._check_input(x, state, time_axis=True)
        if state is None:
            state = self._without_memory(x.shape[0], x.device)
        read_slots, read_weights, write_slots, write_weights, _, _ = self._addresses(x, state)
        return {"read_slots": read_slots, "read_weights": read_weights, "write_slots": write_slots,
                "write_weights": write_weights}

    def _addresses(self, x: Tensor, state: RAMNetState) -> tuple[Tensor, ...]:
        """Read and write slots and weights [b, h, t, k], values [b, h, t, d] and the new convolution history."""
        batch, time, _ = x.shape
        qkv, conv = self.qkv_conv(self.to_qkv(x), state.conv)
        qkv = qkv.view(batch, time, self.heads, -1).transpose(1, 2)  # [b, h, t, 2 key_dim + value_dim]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        temperature = self.log_temperature.exp()[:, None, None, None]
        shape = (batch, self.heads, time, self.factors, self.factor_size)
        q_logits, k_logits = q.reshape(shape) * temperature, k.reshape(shape) * temperature
        if self.balance and self.training and torch.is_grad_enabled():
            q_logits = _WithPenaltyGradient.apply(q_logits, self.balance / 2 * slot_imbalance(q_logits))
            k_logits = _WithPenaltyGradient.apply(k_logits, self.balance / 2 * slot_imbalance(k_logits))
        read_index, read_weight = self._decode(q_logits, state.position)
        if self.normalize_reads:
            read_weight = read_weight / read_weight.sum(-1, keepdim=True)
        write_index, write_weight = self._decode(k_logits, state.position)
        return read_index, read_weight, write_index, write_weight, v, conv

    def _decode(self, logits: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Top-K slots and weights of the product softmax, cyclically shifted by position under CAPE."""
        log_weight, slot = product_topk(logits, self.top_k)
        if self.cape:
            # [P_t(a)]_i = a_{(i + t) mod M}: the address entry j lands on slot (j - t) mod M
            positions = torch.arange(start, start + logits.shape[2], device=slot.device)
            slot = torch.remainder(slot - positions[:, None], self.slots)
        return slot, log_weight.exp()

    def _check_input(self, x: Tensor, state: RAMNetState | None, *, time_axis: bool) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise InputError(f"expected input of shape [batch, time, {self.dim}], got {list(x.shape)}")
        if time_axis and x.shape[1] == 0:
            raise InputError("the input sequence is empty (time = 0); pass at least one token")
        if x.shape[0] == 0:
            raise InputError("the batch is empty (batch = 0); pass at least one sequence")
        if state is None:
            return
        expected = (x.shape[0], self.heads, self.slots, self.value_dim)
        if not isinstance(state, RAMNetState) or state.memory_shape() != expected:
            raise InputError(f"state does not fit this layer and batch: expected slots of shape {list(expected)}; "
                             "pass the state this layer returned for the same batch, or None")

    def state_size(self) -> dict[str, int]:
        """Floats of state per sequence: the whole memory, and the part one token touches (read + write rows)."""
        per_row = self.value_dim + 1
        return {"total": self.heads * self.slots * per_row, "per_token": self.heads * 2 * self.top_k * per_row}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, slots={self.factor_size}^{self.factors}={self.slots}, "
                f"top_k={self.top_k}, gamma={self.gamma}, value_dim={self.value_dim}, cape={self.cape}, "
                f"balance={self.balance}, normalize_reads={self.normalize_reads}")


def slot_imbalance(logits: Tensor) -> Tensor:
    """How unevenly a batch of addresses uses the slots, per factor: 0 when each index is chosen equally often.

    Parameters
    ----------
    logits : Tensor [batch, heads, time, factors, factor_size]

    Returns
    -------
    Tensor
        A scalar, ``factor_size * sum_j P_j^2 - 1`` averaged over heads and factors, where ``P`` is the factor's
        softmax averaged over batch and time; it lies in [0, factor_size - 1].
    """
    usage = torch.softmax(logits.float(), dim=-1).mean(dim=(0, 2))  # [heads, factors, factor_size]
    return (logits.shape[-1] * usage.square().sum(-1) - 1).mean()


class _WithPenaltyGradient(torch.autograd.Function):
    """Identity on ``x`` whose backward also differentiates ``penalty`` (computed from x) as if added to the loss."""

    @staticmethod
    def forward(ctx, x: Tensor, penalty: Tensor) -> Tensor:
        ctx.penalty_dtype = penalty.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones((), dtype=ctx.penalty_dtype, device=grad.device)


__all__ = ["RAMNet", "RAMNetState"]
