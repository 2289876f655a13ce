"""The meta learner's two controllers, as functions of a parameter dict.

Update controller: for every parameter tensor of theta an LSTM (hidden H, layer norm), run
per element over [pre(grad), pre(param), pre(loss)], issuing an input gate alpha and a
forget gate beta per element: theta_t = beta * theta_{t-1} - alpha * grad.
Stop controller: an LSTM over [pre(loss), pre(gradient norm of each parameter tensor)]
giving the stop probability p_t = sigmoid(w_s h + b_s).
pre(x) = (log|x| / p, sgn x) if |x| >= e^-p else (-1, e^p x), p = 10.
"""

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from model.params import Params

PREPROCESS_P = 10.0
UPDATE_INPUTS = 6  # pre(grad), pre(param), pre(loss): two values each
# Initial gates: alpha ~ 0.01 (a plain SGD step), beta ~ 0.998 (keep the parameter);
# initial stop probability ~ 0.1.
INITIAL_ALPHA_LOGIT = math.log(0.01 / 0.99)
INITIAL_BETA_LOGIT = 6.0
INITIAL_STOP_LOGIT = math.log(0.1 / 0.9)


def preprocess(x: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """[..., 2]: the gradient preprocessing of Andrychowicz et al. (2016)."""
    magnitude = x.abs()
    large = magnitude >= math.exp(-p)
    log_part = torch.where(large, torch.log(magnitude.clamp_min(math.exp(-p))) / p, -1.0)
    sign_part = torch.where(large, torch.sign(x), math.exp(p) * x)
    return torch.stack([log_part, sign_part], dim=-1)


def lstm_update(pre_gates: Tensor, bias: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
    """Layer-normalised LSTM cell from its pre-activations [n, 4H] = [inputs, hidden] @ W;
    returns the new hidden and cell [n, H]."""
    gates = F.layer_norm(pre_gates, pre_gates.shape[-1:]) + bias
    in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(in_gate) * torch.tanh(candidate)
    hidden = torch.sigmoid(out_gate) * torch.tanh(F.layer_norm(cell, cell.shape[-1:]))
    return hidden, cell


def init_update_controller(num_tensors: int, hidden: int, generator: torch.Generator) -> Params:
    params: Params = {}
    for index in range(num_tensors):
        params |= _init_lstm(f"update.{index}", UPDATE_INPUTS, hidden, 2, generator)
        params[f"update.{index}.out_bias"] = torch.tensor([INITIAL_ALPHA_LOGIT, INITIAL_BETA_LOGIT])
    return params


def init_stop_controller(num_tensors: int, hidden: int, generator: torch.Generator) -> Params:
    params = _init_lstm("stop", 2 + 2 * num_tensors, hidden, 1, generator)
    params["stop.out_bias"] = torch.tensor([INITIAL_STOP_LOGIT])
    return params


def _init_lstm(
    prefix: str, inputs: int, hidden: int, outputs: int, generator: torch.Generator
) -> Params:
    bound = 1.0 / math.sqrt(hidden)
    weight = (torch.rand(inputs + hidden, 4 * hidden, generator=generator) * 2 - 1) * bound
    # Output weights start small, so the first gates are the output biases' values.
    out_weight = (torch.rand(hidden, outputs, generator=generator) * 2 - 1) * 1e-3
    return {
        f"{prefix}.weight": weight,
        f"{prefix}.bias": torch.zeros(4 * hidden),
        f"{prefix}.out_weight": out_weight,
    }


def update_gates(
    meta: Params,
    sizes: list[int],
    grad: Tensor,
    theta: Tensor,
    loss: Tensor,
    hidden: Tensor,
    cell: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gates for S scenarios' flat parameters theta [S, n]: alpha, beta [S, n] and the new
    hidden, cell [S, n, H]; grad [S, n], loss [S].

    Each parameter tensor (a segment of `sizes` along n) has its own LSTM weights; the
    controller is elementwise, so scenarios batch as extra rows and the elementwise work
    runs on every segment at once.
    """
    num_scenarios, n = grad.shape
    inputs = torch.cat(
        [
            preprocess(grad),
            preprocess(theta),
            preprocess(loss)[:, None, :].expand(num_scenarios, n, 2),
            hidden,
        ],
        dim=-1,
    )  # [S, n, 6 + H]
    pre_gates = torch.cat(
        [
            part @ meta[f"update.{k}.weight"]
            for k, part in enumerate(torch.split(inputs, sizes, dim=1))
        ],
        dim=1,
    )  # [S, n, 4H]
    bias = torch.cat([meta[f"update.{k}.bias"].expand(m, -1) for k, m in enumerate(sizes)])
    hidden, cell = lstm_update(pre_gates, bias, cell)
    logits = torch.cat(
        [
            part @ meta[f"update.{k}.out_weight"] + meta[f"update.{k}.out_bias"]
            for k, part in enumerate(torch.split(hidden, sizes, dim=1))
        ],
        dim=1,
    )  # [S, n, 2]
    gate_values = torch.sigmoid(logits)
    return gate_values[..., 0], gate_values[..., 1], hidden, cell


def stop_probability(
    meta: Params, loss: Tensor, grad_norms: Tensor, hidden: Tensor, cell: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """p_t [S] and the new hidden, cell [S, H]; loss [S], grad_norms [S, K] (one norm per
    parameter tensor)."""
    inputs = torch.cat(
        [preprocess(loss), preprocess(grad_norms).flatten(start_dim=1), hidden], dim=-1
    )  # [S, 2 + 2K + H]
    hidden, cell = lstm_update(inputs @ meta["stop.weight"], meta["stop.bias"], cell)
    logit = hidden @ meta["stop.out_weight"] + meta["stop.out_bias"]  # [S, 1]
    return torch.sigmoid(logit).squeeze(-1), hidden, cell
