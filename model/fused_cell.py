"""The fused update-controller step (model/csrc/update_cell.cpp, in the compiled module of
model/kernels.py). It computes the same gates as `controllers.update_gates` to float
rounding, several times faster on the CPU, and its backward gives the controller weights'
gradients, so evaluation, serving and meta-training all run it. Where the module cannot be
built, adaptation uses the reference.
"""

import itertools
from types import ModuleType

import torch
from torch import Tensor

from model import kernels
from model.controllers import PREPROCESS_P
from model.params import Params

HIDDEN_SIZES = (8, 16, 32)  # the sizes the kernel is instantiated for


class _FusedStep(torch.autograd.Function):
    """One fused controller step; differentiable in the controller's weights through alpha
    and beta (the other inputs and the new states are constants to the first-order
    meta-gradient)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        extension: ModuleType,
        offsets: list[int],
        inputs: tuple[Tensor, ...],
        states_out: tuple[Tensor, Tensor],
        updating: Tensor,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        alpha, beta = extension.update_gates(
            *inputs, *weights, offsets, PREPROCESS_P, *states_out, updating
        )
        ctx.save_for_backward(*inputs, *weights)
        ctx.extension, ctx.offsets, ctx.updating = extension, offsets, updating
        return alpha, beta

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_alpha: Tensor, d_beta: Tensor
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        # A scenario that was not updating had constant (zero) gates: no gradient through it.
        updating = ctx.updating[:, None]
        d_alpha, d_beta = (torch.where(updating, d, 0.0).contiguous() for d in (d_alpha, d_beta))
        d_weights = ctx.extension.update_gates_backward(
            *saved, ctx.offsets, PREPROCESS_P, d_alpha, d_beta
        )
        return (None, None, None, None, None, *d_weights)


class FusedGates:
    """A drop-in for `controllers.update_gates` on one set of controller weights (packed
    once, so their gradients flow back through the packing). Its recurrent states are the
    kernel's lane-major [S, blocks, H, lanes] rather than the reference's [S, n, H]:
    `zero_state` makes them."""

    def __init__(self, extension: ModuleType, meta: Params, sizes: list[int], hidden_size: int):
        self.extension = extension
        self.offsets = [0, *itertools.accumulate(sizes)]
        lanes = int(extension.lanes)
        self.state_shape = (sum(-(-size // lanes) for size in sizes), hidden_size, lanes)
        self.packed = [
            torch.stack([meta[f"update.{k}.{part}"] for k in range(len(sizes))])
            for part in ("weight", "bias", "out_weight", "out_bias")
        ]

    def zero_state(self, num_scenarios: int, like: Tensor) -> Tensor:
        return like.new_zeros(num_scenarios, *self.state_shape)

    def __call__(
        self,
        _meta: Params,
        _sizes: list[int],
        grad: Tensor,
        theta: Tensor,
        loss: Tensor,
        hidden: Tensor,
        cell: Tensor,
        updating: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """alpha, beta [S, n] and the new states; without a backward pass to keep them for,
        the new states are `hidden` and `cell` themselves, updated in place. updating [S] bool
        (default: all): a scenario not updating gets zero gates and keeps its states, at no
        cost (a batch's stopped scenarios)."""
        # The controller's inputs are constants (first-order), whatever their graph.
        inputs = tuple(x.detach().contiguous() for x in (grad, theta, loss, hidden, cell))
        if updating is None:
            updating = torch.ones(grad.shape[0], dtype=torch.bool)
        if torch.is_grad_enabled() and any(w.requires_grad for w in self.packed):
            # The backward pass reads this step's states: keep them.
            states_out = (torch.empty_like(inputs[3]), torch.empty_like(inputs[4]))
            alpha, beta = _FusedStep.apply(
                self.extension, self.offsets, inputs, states_out, updating, *self.packed
            )
        else:
            # In place and called directly: fresh buffers and autograd's bookkeeping are a
            # measurable share of a step (docs/performance.md).
            states_out = (inputs[3], inputs[4])
            alpha, beta = self.extension.update_gates(
                *inputs, *self.packed, self.offsets, PREPROCESS_P, *states_out, updating
            )
        return alpha, beta, *states_out


def fused_update_gates(meta: Params, sizes: list[int], hidden_size: int) -> FusedGates | None:
    """The fused cell on these controller weights, or None where it does not apply: the
    weights are not float32 on the CPU, the hidden size is not built, or the cell cannot be
    built here."""
    controller = [value for name, value in meta.items() if name.startswith("update.")]
    if hidden_size not in HIDDEN_SIZES or any(
        w.device.type != "cpu" or w.dtype != torch.float32 for w in controller
    ):
        return None
    extension = kernels.load()
    if extension is None:
        return None
    return FusedGates(extension, meta, sizes, hidden_size)
