"""The short causal convolution that the memory layers apply to their q/k/v projections."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CausalDepthwiseConv(nn.Conv1d):
    """Depthwise convolution over time that sees only the past, on ``[batch, time, channels]``.

    Its history (the last ``kernel - 1`` inputs) is carried between calls, so a sequence fed in pieces gives the same
    output as the whole. It is an ``nn.Conv1d`` (the same parameters, ``weight [channels, 1, kernel]`` and ``bias``,
    so checkpoints are interchangeable). On CPU it computes the output as a sum of ``kernel`` shifted products:
    PyTorch's depthwise ``conv1d`` backward takes twice as long there on many short sequences (the forecaster's
    672 x 12 tokens of 96 channels: 35 ms against 16 ms forward + backward, one thread) and no longer on long ones.
    On a GPU, where that was not measured, it runs ``conv1d``.

    Examples
    --------
    >>> conv = CausalDepthwiseConv(8, kernel=4)
    >>> y, history = conv(torch.randn(2, 10, 8))
    >>> y.shape, history.shape
    (torch.Size([2, 10, 8]), torch.Size([2, 3, 8]))
    """

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__(channels, channels, kernel, groups=channels)

    def empty_history(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> Tensor:
        """The history before the first token: zeros ``[batch, kernel - 1, channels]``."""
        return torch.zeros(batch_size, self.kernel_size[0] - 1, self.in_channels, device=device, dtype=dtype)

    def forward(self, x: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """``y [batch, time, channels]`` and the new history; ``history`` None starts from zeros."""
        kernel = self.kernel_size[0]
        if history is None:
            history = self.empty_history(x.shape[0], x.device, x.dtype)
        padded = torch.cat([history.to(x.dtype), x], dim=1)
        # the sum of shifts where it was measured faster (CPU); the accelerators keep their fused convolution
        out = self._shifted_sum(padded) if x.device.type == "cpu" else self._convolution(padded)
        return out, padded[:, padded.shape[1] - (kernel - 1):]

    def _shifted_sum(self, padded: Tensor) -> Tensor:
        kernel = self.kernel_size[0]
        time = padded.shape[1] - kernel + 1
        # sums in float32 at least, as conv1d does; the output in the input's dtype (under autocast: autocast's)
        weight = self.weight[:, 0].to(torch.promote_types(padded.dtype, torch.float32))  # [channels, kernel]
        out = padded[:, :time] * weight[:, 0]
        for shift in range(1, kernel):
            out = out + padded[:, shift:shift + time] * weight[:, shift]
        if self.bias is not None:
            out = out + self.bias
        return out.to(padded.dtype)

    def _convolution(self, padded: Tensor) -> Tensor:
        return super().forward(padded.transpose(1, 2)).transpose(1, 2)


class NoConvolution(nn.Module):
    """Stands in for :class:`CausalDepthwiseConv` when a layer has none (``conv_kernel=0``): the input unchanged,
    no history. It holds no parameters, so checkpoints are those of a layer without convolution."""

    def empty_history(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> None:
        return None

    def forward(self, x: Tensor, history: Tensor | None = None) -> tuple[Tensor, None]:
        return x, None


def causal_conv(channels: int, kernel: int) -> CausalDepthwiseConv | NoConvolution:
    """The q/k/v convolution of a memory layer: ``kernel`` 0 means none."""
    return CausalDepthwiseConv(channels, kernel) if kernel else NoConvolution()
