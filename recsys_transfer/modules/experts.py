"""Building blocks of the multi-task models: feed-forward experts, softmax gates, and the CGC block of PLE.

Shape symbols: B rows, E experts, d an expert's output width, T tasks.

* :class:`Expert` -- a feed-forward expert as in MMoE (Ma et al. 2018): an :class:`MLP` whose every layer
  is ``Linear -> [BatchNorm] -> ReLU -> [Dropout]``, ending with its last hidden layer (``out_dim`` = that width).
* :class:`Gate` -- ``softmax(W x)`` over E experts (MMoE's gate; ``hidden`` non-empty puts an MLP before the softmax
  layer, as FuxiCTR's gates with ``gate_hidden_units`` do). :func:`mix` is the gated sum ``sum_e g_e f_e``.
* :class:`CGC` -- Customized Gate Control (Tang et al. 2020) and one extraction level of PLE: per task ``specific`` experts, ``shared`` experts common to all tasks, and per task a gate over
  its own and the shared experts; with ``shared_gate`` (every PLE level but the last) one more gate over ALL experts
  gives the shared output the next level's shared experts read.

Example::

    block = CGC(in_dim=32, num_tasks=2, specific=1, shared=2, hidden=(16,), shared_gate=True)
    x = torch.randn(4, 32)
    task_out, shared_out = block([x, x], x)  # [[4, 16], [4, 16]], [4, 16]
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.modules.mlp import MLP


class Expert(MLP):
    """A feed-forward expert: ``MLP(in_dim, hidden, out_dim=None)`` (ReLU after every layer, the last included)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] | list[int], dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        if not hidden:
            raise ValueError("an expert needs at least one hidden layer")
        super().__init__(in_dim, hidden, None, dropout, batch_norm)


class Experts(nn.ModuleList):
    """Several experts on one input, stacked: ``[B, in_dim] -> [B, E, d]``."""

    def __init__(self, count: int, in_dim: int, hidden: tuple[int, ...] | list[int], dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        super().__init__(Expert(in_dim, hidden, dropout, batch_norm) for _ in range(count))
        self.out_dim = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(x) for expert in self], dim=1)  # [B, E, d]


class Gate(nn.Module):
    """``softmax(MLP(x))`` over ``num_experts``: weights ``[B, E]``, each row summing to 1."""

    def __init__(self, in_dim: int, num_experts: int, hidden: tuple[int, ...] | list[int] = ()) -> None:
        super().__init__()
        self.net = MLP(in_dim, hidden, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)  # [B, E]


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The gated sum of expert outputs: ``weights [B, E]``, ``experts [B, E, d]`` -> ``[B, d]``."""
    return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)  # [B, 1, E] @ [B, E, d] -> [B, 1, d] -> [B, d]


class CGC(nn.Module):
    """One CGC block / PLE extraction level (module docstring).

    ``forward(task_inputs, shared_input)``: ``task_inputs`` one ``[B, in_dim]`` per task (the same tensor at the
    first level; task k's previous output above it), ``shared_input [B, in_dim]``. Returns ``(task outputs, shared
    output)``: ``T`` tensors ``[B, d]`` and ``[B, d]`` (None without ``shared_gate``). Task k's gate reads task k's
    input; the shared gate reads the shared input. :meth:`gate_weights` gives the
    weights the gates computed."""

    def __init__(self, in_dim: int, num_tasks: int, specific: int, shared: int, hidden: tuple[int, ...] | list[int],
                 shared_gate: bool = False, gate_hidden: tuple[int, ...] | list[int] = (), dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        super().__init__()
        if num_tasks < 1 or specific < 0 or shared < 0 or specific + shared < 1:
            raise ValueError(f"CGC: need >= 1 task and >= 1 expert per task gate, got {num_tasks} tasks, "
                             f"{specific} specific and {shared} shared experts")
        self.num_tasks, self.specific, self.shared = num_tasks, specific, shared
        self.task_experts = nn.ModuleList(Experts(specific, in_dim, hidden, dropout, batch_norm)
                                          for _ in range(num_tasks))
        self.shared_experts = Experts(shared, in_dim, hidden, dropout, batch_norm)
        self.task_gates = nn.ModuleList(Gate(in_dim, specific + shared, gate_hidden) for _ in range(num_tasks))
        self.shared_gate = Gate(in_dim, num_tasks * specific + shared, gate_hidden) if shared_gate else None
        self.out_dim = hidden[-1]

    def gate_weights(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor) -> list[torch.Tensor]:
        """Each task gate's weights ``[B, specific + shared]`` (then the shared gate's ``[B, T * specific + shared]``
        when it has one), as :meth:`forward` computes them."""
        out = [gate(x) for gate, x in zip(self.task_gates, task_inputs)]
        if self.shared_gate is not None:
            out.append(self.shared_gate(shared_input))
        return out

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor,
                ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        shared = self.shared_experts(shared_input) if self.shared else None  # [B, S, d]
        own = [experts(x) if self.specific else None for experts, x in zip(self.task_experts, task_inputs)]
        outputs = []
        for k, x in enumerate(task_inputs):
            pool = torch.cat([e for e in (own[k], shared) if e is not None], dim=1)  # [B, specific + S, d]
            outputs.append(mix(self.task_gates[k](x), pool))  # [B, d]
        if self.shared_gate is None:
            return outputs, None
        pool = torch.cat([e for e in (*own, shared) if e is not None], dim=1)  # [B, T * specific + S, d]
        return outputs, mix(self.shared_gate(shared_input), pool)  # [B, d]
