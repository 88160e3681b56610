"""Which weights a degradation touches: every weight matrix a transformer block multiplies its activations by.

Targets are found by what a layer computes, not by one class:

- `linear`:  `torch.nn.Linear`, weight stored [out, in];
- `conv1d`:  transformers' `Conv1D` (GPT-2, GPT-1), a linear layer whose weight is stored transposed, [in, out];
- `experts`: the stacked expert weights of a mixture-of-experts block (transformers >= 5: one 3-D parameter per
  projection, e.g. Mixtral's `experts.gate_up_proj` [E, out, in]; `is_transposed` experts store [E, in, out]).
  Each expert's matrix is its own target, named `<experts module>.<parameter>.<expert>`.

Every method sees a target through `Target.weight`, an [out, in] *view* of the live parameter, so per-output-row
groups (RTN/GPTQ/NVFP4 grids, Wanda rows, N:M groups) always run along the input dimension, whatever the storage.
Linear and Conv1D targets are named by their module, as before (saved constraints stay loadable).

Embeddings and the (usually tied) output head stay in full precision, as in RTN/GPTQ/Wanda practice; so do MoE
routers (`untargeted_matrices` lists every such matrix, so a report can say what was left alone).
A weight matrix of an unknown layout (a 3-D parameter of a module that is not a transformers experts module) is
an error, never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("linear", "conv1d", "experts")


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return Conv1D


@dataclass(frozen=True, eq=False)
class Target:
    name: str
    kind: str
    module_name: str
    module: torch.nn.Module
    param: str                 # the parameter of `module` that holds the matrix
    expert: int | None = None  # index into a stacked [E, ...] expert parameter
    transposed: bool = False   # stored [in, out]

    @property
    def weight(self) -> torch.Tensor:
        """The matrix as an [out, in] view of the live parameter (through a parametrization, if one is attached)."""
        tensor = getattr(self.module, self.param)
        if self.expert is not None:
            tensor = tensor[self.expert]
        return tensor.T if self.transposed else tensor

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def parameter_name(self) -> str:
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    def assign(self, value: torch.Tensor) -> None:
        """Write an [out, in] matrix into the parameter (in place, through the view)."""
        from torch.nn.utils import parametrize

        if parametrize.is_parametrized(self.module, self.param):
            raise RuntimeError(f"{self.name}: cannot damage a parametrized weight (a constraint is attached)")
        view = self.weight
        if tuple(value.shape) != tuple(view.shape):
            raise ValueError(f"{self.name}: new weight has shape {tuple(value.shape)}, expected [out, in] "
                             f"{tuple(view.shape)}")
        with torch.no_grad():
            view.copy_(value)


def _own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters by name, a parametrized one under its own name (not `parametrizations.*`)."""
    from torch.nn.utils import parametrize

    tensors = dict(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        tensors.update((name, plist.original) for name, plist in module.parametrizations.items())
    return tensors


def _is_parametrization(module_name: str, module: torch.nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in f".{module_name}."


def _experts_targets(module_name: str, module: torch.nn.Module) -> list[Target]:
    """One target per expert of every stacked weight of a transformers experts module ([E, out, in] or, with
    `is_transposed`, [E, in, out]). 2-D stacked parameters ([E, out]) are biases."""
    found = []
    transposed = bool(getattr(module, "is_transposed", False))
    for param_name, param in _own_tensors(module).items():
        if param.dim() != 3:
            continue
        for expert in range(param.shape[0]):
            found.append(Target(f"{module_name}.{param_name}.{expert}", "experts", module_name, module, param_name,
                                expert=expert, transposed=transposed))
    return found


def _is_experts(module: torch.nn.Module) -> bool:
    # transformers' @use_experts_implementation sets `is_transposed` (and `has_gate`) on every experts module.
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") \
        and any(p.dim() == 3 for p in _own_tensors(module).values())


def damage_targets(model) -> dict[str, Target]:
    """Every damage target of `model` by name, in module order (see the module docstring)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    conv1d = _conv1d_class()
    found: dict[str, Target] = {}
    for module_name, module in model.named_modules():
        if module is output or _is_parametrization(module_name, module):
            continue
        if isinstance(module, torch.nn.Linear):
            found[module_name] = Target(module_name, "linear", module_name, module, "weight")
        elif conv1d and isinstance(module, conv1d):
            found[module_name] = Target(module_name, "conv1d", module_name, module, "weight", transposed=True)
        elif _is_experts(module):
            found.update((t.name, t) for t in _experts_targets(module_name, module))
        else:
            stacked = [name for name, p in _own_tensors(module).items() if p.dim() > 2]
            if stacked and not isinstance(module, torch.nn.modules.conv._ConvNd):
                raise ValueError(f"{module_name} ({type(module).__name__}) holds {'/'.join(stacked)} of unknown "
                                 f"layout (more than 2 dimensions, not a transformers experts module); damage cannot "
                                 f"target it and will not skip it silently")
    return found


def targets_by_parameter(targets) -> dict[tuple[int, str], list[Target]]:
    """Targets grouped by the parameter that stores them ((id(module), parameter name) -> targets)."""
    grouped: dict[tuple[int, str], list[Target]] = {}
    for target in (targets.values() if isinstance(targets, dict) else targets):
        grouped.setdefault((id(target.module), target.param), []).append(target)
    return grouped


def untargeted_matrices(model, targets: dict[str, Target] | None = None) -> list[str]:
    """Names of the weight matrices (>= 2-D parameters) that no target covers, other than embeddings and the
    output head: e.g. MoE routers. Reported with every damage so nothing is left out silently."""
    targets = damage_targets(model) if targets is None else targets
    covered = {(id(t.module), t.param) for t in targets.values()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    left = []
    for module_name, module in model.named_modules():
        if module is output or isinstance(module, torch.nn.Embedding) or _is_parametrization(module_name, module):
            continue
        for param_name, param in _own_tensors(module).items():
            if param.dim() >= 2 and (id(module), param_name) not in covered:
                left.append(f"{module_name}.{param_name}" if module_name else param_name)
    return left


def block_linears(model) -> dict[str, torch.nn.Module]:
    """The modules of the linear and conv1d targets by name (kept for callers that want modules)."""
    return {name: t.module for name, t in damage_targets(model).items() if t.kind != "experts"}


def validate_sparsity(sparsity, key: str = "sparsity") -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"{key} must be a number strictly between 0 and 1, got {sparsity!r}")
