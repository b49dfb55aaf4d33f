"""Presses on Hugging Face causal LMs (transformers 5.x): a decode loop of our own over a pruned cache.

transformers' ``generate`` takes the cache's length for the number of tokens seen, so after a press evicts entries it
would give new tokens the wrong positions; and one cache tensor cannot hold a different number of entries per head.
:class:`HFSession` therefore feeds tokens at explicit ``position_ids``, keeps each layer's cache as one tensor per
layer padded to its longest head, and replaces the model's attention mask in every attention module by that layer's
own per-head mask (padding and evicted entries masked, the new tokens causal). The press needs attention weights, so
the model must run eager attention (``attn_implementation="eager"``); without a press any implementation that takes a
4-D additive mask works. Only full-attention layers are supported (not sliding-window caches).

Shapes: b batch, h query heads, g kv heads, t new tokens, c cached entries.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from memorycore.attention import KVCache
from memorycore.errors import InputError
from memorycore.namm.press import Press


class HFSession:
    """One batch of sequences run through a Hugging Face causal LM with an optional press.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM (``LlamaForCausalLM``, ...) whose attention modules have ``layer_idx``.
    press : Press, optional
        Applied every ``press.interval`` tokens; default the press of an enclosing ``with press(model)``, else none.

    Examples
    --------
    >>> session = HFSession(model, H2OPress(0.25, interval=64))     # doctest: +SKIP
    >>> logits = session.forward(input_ids)                        # prefill, pressed every 64 tokens
    >>> logits = session.forward(next_token[:, None])              # one more token at the right position
    """

    def __init__(self, model: nn.Module, press: Press | None = None) -> None:
        self.model = model
        self.press = press if press is not None else getattr(model, "_memorycore_press", None)
        self.attention = _attention_modules(model)
        implementation = getattr(model.config, "_attn_implementation", None)
        if self.press is not None and implementation != "eager":
            raise InputError(f"the press needs attention weights, which {implementation!r} attention does not give; "
                             "load the model with attn_implementation='eager' (or call "
                             "model.set_attn_implementation('eager'))")
        from transformers import DynamicCache

        self.cache = DynamicCache(config=model.config)
        self.tracks: dict[int, KVCache] = {}
        self.position = 0
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else \
            "past_key_values"

    @torch.no_grad()
    def forward(self, input_ids: Tensor, chunk_size: int | None = None) -> Tensor:
        """Logits ``[b, t, vocab]`` of the next tokens, fed in chunks (default: the press's interval, so that a long
        prompt is pressed every interval tokens as NAMM does)."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must be [batch, time] with time >= 1, got {list(input_ids.shape)}")
        chunk_size = chunk_size or (self.press.interval if self.press is not None else input_ids.shape[1])
        return torch.cat([self._step(piece) for piece in input_ids.split(chunk_size, dim=1)], dim=1)

    def lengths(self) -> dict[str, Tensor]:
        """Valid entries per layer, batch element and kv head."""
        return {_name(index): track.lengths for index, track in sorted(self.tracks.items())}

    def _step(self, input_ids: Tensor) -> Tensor:
        batch, time = input_ids.shape
        positions = torch.arange(self.position, self.position + time, device=input_ids.device)
        # a 4-D mask makes transformers skip building its own; each attention module gets its layer's mask instead
        placeholder = torch.zeros(batch, 1, time, 1, device=input_ids.device)
        with self._hooks(positions):
            self.model._memorycore_in_session = True  # lets the forward pass through a press's guard
            try:
                output = self.model(input_ids=input_ids, position_ids=positions[None].expand(batch, -1),
                                    attention_mask=placeholder, use_cache=True, **{self._cache_argument: self.cache})
            finally:
                self.model._memorycore_in_session = False
        self.position += time
        return output.logits

    @contextmanager
    def _hooks(self, positions: Tensor) -> Iterator[None]:
        handles = []
        for module in self.attention:
            handles.append(module.register_forward_pre_hook(self._masking(positions), with_kwargs=True))
            handles.append(module.register_forward_hook(self._pressing(positions)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _masking(self, positions: Tensor):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            track = self.tracks.get(module.layer_idx)
            heads = module.config.num_attention_heads
            kwargs["attention_mask"] = layer_mask(track, len(positions), heads, hidden.shape[0], hidden.dtype,
                                                  hidden.device)
            return args, kwargs
        return hook

    def _pressing(self, positions: Tensor):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            layer = self.cache.layers[module.layer_idx]
            cache = self._appended(module.layer_idx, layer.keys, layer.values, positions)
            if self.press is not None:
                weights = output[1]
                batch, heads, time, capacity = weights.shape
                groups = heads // cache.keys.shape[1]
                attention = weights.float().view(batch, -1, groups, time, capacity).mean(2)
                cache = self.press.compress(_name(module.layer_idx), cache, attention)
            cache = cache.keep(cache.valid)  # padding back to the end of each head (a no-op when there is none)
            layer.keys, layer.values = cache.keys, cache.values
            self.tracks[module.layer_idx] = cache
        return hook

    def _appended(self, index: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVCache:
        """The layer's cache after transformers appended the new keys at the end, padding left where it was."""
        batch, heads, capacity, _ = keys.shape
        time = len(positions)
        track = self.tracks.get(index) or KVCache.empty(batch, heads, keys.shape[-1], device=keys.device,
                                                        dtype=keys.dtype)
        if track.capacity + time != capacity:
            raise InputError(f"the Hugging Face cache of layer {index} changed outside this session; run one "
                             "HFSession per sequence batch and do not call the model with its cache in between")
        new_positions = positions.view(1, 1, time).expand(batch, heads, time)
        extras = {name: torch.cat([value, value.new_zeros(batch, heads, time, *value.shape[3:])], dim=2)
                  for name, value in track.extras.items()}
        return KVCache(keys, values, torch.cat([track.positions, new_positions], 2),
                       torch.cat([track.valid, track.valid.new_ones(batch, heads, time)], 2), extras)


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, *, max_new_tokens: int, press: Press | None = None,
             eos_token_id: int | None = None) -> Tensor:
    """Greedy decoding of a Hugging Face causal LM with a pruned cache; returns ``[b, prompt + new]`` token ids.

    The prompt is fed in chunks of the press's interval, then one token at a time at its true position; the press
    (given, or of an enclosing ``with press(model)``) evicts every ``interval`` tokens. Generation stops early once
    every sequence has produced ``eos_token_id``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    session = HFSession(model, press)
    sequences = input_ids
    logits = session.forward(input_ids)[:, -1]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = session.forward(token[:, None])[:, -1]
    return sequences


def layer_mask(track: KVCache | None, time: int, heads: int, batch: int, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """Additive mask ``[b, h, t, c + t]``: a layer's valid cached entries, then the new tokens causally."""
    causal = torch.ones(time, time, dtype=torch.bool, device=device).tril()
    allowed = causal.expand(batch, heads, time, time)
    if track is not None and track.capacity:
        valid = track.valid.repeat_interleave(heads // track.valid.shape[1], dim=1)
        allowed = torch.cat([valid[:, :, None, :].expand(-1, -1, time, -1), allowed], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not modules or not hasattr(model, "config"):
        raise InputError(f"{type(model).__name__} is not a Hugging Face causal LM with attention layers; pass a "
                         "model such as LlamaForCausalLM")
    return modules


def _name(index: int) -> str:
    return f"layers.{index}"
