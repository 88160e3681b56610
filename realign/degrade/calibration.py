"""Layer-wise ("sequential") calibration for one-shot compression of decoder-only Hugging Face models.

GPTQ, SparseGPT and Wanda compress one decoder layer at a time from statistics of that layer's inputs on a small
calibration set. The inputs of layer k are the outputs of the *already compressed* layers 0..k-1, so every layer
is fitted to the activations it will actually see. Running the whole model once per layer would cost O(L^2)
layer evaluations; instead the inputs of the first layer are captured once and each layer is then called
directly, its outputs becoming the next layer's inputs (O(L)).

Also here: the input-statistics hooks (Hessian 2 X X^T / n, per-feature squared norms) and the damped inverse
Hessian Cholesky factor that GPTQ and SparseGPT share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch

from realign.degrade.targets import Target, damage_targets


class _StopForward(Exception):
    """Raised from inside the model once every decoder layer's inputs are recorded (skips the rest)."""


_NO_FORWARD = object()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of decoder layers: the ModuleList of same-class blocks that holds the most damage targets.

    Found by structure, not by attribute name, so it is `model.model.layers` (Llama, Qwen2, Mistral, Mixtral),
    `transformer.h` (GPT-2), `model.decoder.layers` (OPT), `gpt_neox.layers` (GPT-NeoX), ... alike."""
    targets = damage_targets(model)
    owners = {id(t.module) for t in targets.values()}
    best, best_count = None, 0
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(layer) for layer in module}) != 1:
            continue
        count = sum(id(sub) in owners for sub in module.modules())
        if count > best_count:
            best, best_count = module, count
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of decoder layers (a ModuleList of identical blocks "
                         f"holding its weight matrices); layer-wise calibration (gptq, wanda, sparsegpt) needs one")
    return best


def check_calibration(calibration, key: str = "") -> torch.Tensor:
    """The calibration token ids must be a non-empty [sequences, length] integer tensor (no padding)."""
    if (not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0
            or calibration.is_floating_point() or calibration.is_complex() or calibration.dtype == torch.bool):
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"{key}calibration must be a non-empty 2-D integer tensor [sequences, length] of token "
                         f"ids, got {shape}")
    return calibration.long()


def calibration_summary(calibration: torch.Tensor) -> dict:
    return {"sequences": int(calibration.shape[0]), "tokens": int(calibration.numel())}


def targets_by_layer(model) -> list[dict[str, Target]]:
    """The damage targets (targets.damage_targets) grouped by the decoder layer that holds them.

    Raises if a target sits outside every decoder layer: it could not be calibrated layer by layer."""
    targets = damage_targets(model)
    grouped = []
    for layer in decoder_layers(model):
        inside = {id(module) for module in layer.modules()}
        grouped.append({name: target for name, target in targets.items() if id(target.module) in inside})
    missing = set(targets) - {name for group in grouped for name in group}
    if missing:
        raise ValueError(f"weight matrices outside the decoder layers cannot be calibrated layer by layer: "
                         f"{sorted(missing)}")
    return grouped



def pruning_plan(model, sparsity, pattern, calibration, key: str = ""):
    """What a calibrated pruner (Wanda, SparseGPT) checks before any work: exactly one target (`sparsity` or an
    N:M `pattern`), the calibration windows, each decoder layer's damage targets, and that N:M groups fit every
    target's input width. Returns (target sparsity, (n, m) or None, calibration ids, targets by layer)."""
    from realign.degrade.nm import check_widths, resolve_target

    goal, nm = resolve_target(sparsity, pattern, key=key)
    calibration = check_calibration(calibration, key=key)
    groups = targets_by_layer(model)
    if nm is not None:
        for group in groups:
            check_widths(group, nm[1], key=key)
    return goal, nm, calibration, groups

def _first(output):
    # transformers 5.x decoder layers return the hidden-state tensor; 4.x returned a tuple led by it.
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture_layer_inputs(model, layers, calibration: torch.Tensor, batch_size: int):
    """Per calibration batch: the first layer's hidden-state input, and every layer's other call arguments.

    Each layer's `forward` is swapped for a recorder for the duration: layers 0..L-2 pass their input through
    untouched (so no layer is computed here) and the last one stops the forward, so the output head never runs
    either. The other arguments (attention mask, rotary position embeddings, position ids, ...) are recorded for
    every layer, not just the first, because models with mixed attention types (e.g. Qwen2 with sliding-window
    layers) pass each layer its own mask."""
    hidden: list[torch.Tensor] = []
    layer_args: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def record(index, *args, **kwargs):
        if args:
            states, args = args[0], args[1:]
        else:
            states = kwargs.pop("hidden_states")
        if index == 0:
            hidden.append(states.detach())
        layer_args[index].append((args, kwargs))
        if index == len(layers) - 1:
            raise _StopForward
        return states

    saved = [layer.__dict__.get("forward", _NO_FORWARD) for layer in layers]
    device = model.get_input_embeddings().weight.device
    try:
        for index, layer in enumerate(layers):
            layer.forward = partial(record, index)
        with torch.no_grad():
            for start in range(0, calibration.shape[0], batch_size):
                batch = calibration[start:start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for layer, forward in zip(layers, saved):
            if forward is _NO_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
    n_batches = -(-calibration.shape[0] // batch_size)
    if len(hidden) != n_batches or any(len(calls) != n_batches for calls in layer_args):
        raise RuntimeError(f"{type(model).__name__}: the forward did not call every decoder layer once per batch; "
                           f"layer-wise calibration does not support this model")
    return hidden, layer_args


def sequential_layers(model, calibration: torch.LongTensor,
                      batch_size: int = 8) -> Iterator[tuple[int, torch.nn.Module, Callable[[], None]]]:
    """Generator over the decoder layers in order. For each, yields (layer_index, layer_module, run) where
    run() feeds the calibration activations through that layer (with hooks the caller registered in place,
    e.g. on its Linear sub-modules to collect input statistics/Hessians). After the caller modifies the layer and
    resumes the generator, the (modified) layer's outputs are recomputed and become the next layer's inputs.

    `calibration` is [sequences, length] token ids without padding, fed `batch_size` sequences at a time. The
    model is in eval mode (restored afterwards) and runs without a KV cache, under no_grad; the caller should
    modify weights under torch.no_grad() too, and remove its hooks before resuming (they would otherwise also see
    the recomputation). run() may be called several times (e.g. to re-collect after compressing part of the
    layer). Activations are kept in the model's dtype on its device.
    """
    layers = decoder_layers(model)
    calibration = check_calibration(calibration)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        hidden, layer_args = _capture_layer_inputs(model, layers, calibration, batch_size)
        for index, layer in enumerate(layers):
            calls = layer_args[index]

            # Defaults bind this layer's inputs: `hidden` is rebound below, after the caller is done with run().
            def run(layer=layer, inputs=hidden, calls=calls) -> None:
                with torch.no_grad():
                    for states, (args, kwargs) in zip(inputs, calls):
                        layer(states, *args, **kwargs)

            yield index, layer, run
            with torch.no_grad():
                hidden = [_first(layer(states, *args, **kwargs)) for states, (args, kwargs) in zip(hidden, calls)]
            layer_args[index] = None  # this layer's masks/position embeddings are no longer needed
    finally:
        model.train(was_training)


class _ExpertInputs(torch.overrides.TorchFunctionMode):
    """Sees the inputs of each expert matrix of stacked MoE weights: every `F.linear(x, W[e])` (or `x @ W[e]`
    for transposed experts) whose matrix is a slice of a watched [E, ...] parameter reports x as expert e's."""

    FUNCS = (torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__, torch.mm)

    def __init__(self, targets: dict[str, Target], on_input):
        super().__init__()
        self.on_input = on_input
        self.watched: dict[int, tuple[torch.Tensor, dict[int, str]]] = {}
        for name, target in targets.items():
            param = getattr(target.module, target.param)
            self.watched.setdefault(param.untyped_storage().data_ptr(), (param, {}))[1][target.expert] = name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FUNCS and len(args) >= 2 and isinstance(args[1], torch.Tensor) and args[1].dim() == 2:
            x, w = args[0], args[1]
            entry = self.watched.get(w.untyped_storage().data_ptr())
            if entry is not None and tuple(w.shape) == tuple(entry[0].shape[1:]):
                param, names = entry
                expert = (w.storage_offset() - param.storage_offset()) // param.stride(0)
                if expert in names and x.shape[-1] == (w.shape[1] if func is torch.nn.functional.linear
                                                       else w.shape[0]):
                    x = x.detach()
                    self.on_input(names[expert], x.reshape(-1, x.shape[-1]).to(torch.float64))
        return func(*args, **(kwargs or {}))



def prune_layer_by_layer(model, calibration: torch.LongTensor, groups: list[dict], collect: Callable,
                         prune: Callable) -> dict[str, torch.Tensor]:
    """The loop of a calibrated pruner: decoder layer by decoder layer (sequential_layers), `collect(targets, run)`
    gathers each target's statistics on inputs from the already-pruned layers before it, then
    `prune(weight, statistics) -> (pruned weight, keep-mask)` prunes each target in place (its statistics freed as
    it goes). Returns {module name: keep-mask}."""
    masks = {}
    for index, _, run in sequential_layers(model, calibration):
        statistics = collect(groups[index], run)
        for name, target in groups[index].items():
            pruned, masks[name] = prune(target.weight, statistics.pop(name))
            target.assign(pruned)
    return masks

def _eager_experts(modules) -> None:
    """Run transformers experts modules with their plain per-expert loop (not grouped_mm/batched_mm), so that
    _ExpertInputs sees each expert's matrix product."""
    for module in modules:
        eager = getattr(type(module).forward, "__wrapped__", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__}: cannot find the per-expert (eager) forward of this experts "
                             f"module; layer-wise calibration cannot see its experts' inputs")
        module.forward = partial(eager, module)


@contextmanager
def _input_hooks(targets: dict[str, Target], on_input: Callable[[str, torch.Tensor], None]):
    """Call on_input(name, 2-D float64 inputs [tokens, in_features]) on every product of a target's matrix with
    its inputs: forward hooks on Linear/Conv1D modules, a torch function mode for stacked experts."""

    def hook(name, module, args, output):
        x = args[0].detach()
        on_input(name, x.reshape(-1, x.shape[-1]).to(torch.float64))

    experts = {name: target for name, target in targets.items() if target.kind == "experts"}
    handles = [target.module.register_forward_hook(partial(hook, name)) for name, target in targets.items()
               if target.kind != "experts"]
    modules = list({id(t.module): t.module for t in experts.values()}.values())
    mode = _ExpertInputs(experts, on_input) if experts else None
    try:
        _eager_experts(modules)
        if mode is None:
            yield
        else:
            with mode:
                yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            module.__dict__.pop("forward", None)


def collect_hessians(modules: dict[str, Target], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """H = 2 X X^T / n (float64, [in, in]) of each module's inputs over the n calibration tokens of one run().

    The layer-wise objective ||W X - W' X||^2 has this Hessian in W' (the factor 2 and the 1/n only rescale
    it, which the relative dampening makes irrelevant; they are kept to match the papers)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)

    def accumulate(name, x):
        sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        counts[name] += x.shape[0]

    with _input_hooks(modules, accumulate):
        run()
    _check_seen(counts)
    return {name: 2 * sums[name] / counts[name] for name in modules}


def collect_input_sq_norms(modules: dict[str, Target], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Per input feature j, the squared norm sum_t x_tj^2 over the calibration tokens (float64, [in])."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)

    def accumulate(name, x):
        sq = x.pow(2).sum(dim=0)
        sums[name] = sums[name] + sq if name in sums else sq
        counts[name] += x.shape[0]

    with _input_hooks(modules, accumulate):
        run()
    _check_seen(counts)
    return sums


def _check_seen(counts: dict[str, int]) -> None:
    unseen = sorted(name for name, count in counts.items() if count == 0)
    if unseen:
        raise RuntimeError(f"no calibration inputs reached {unseen} (an expert no calibration token was routed to, "
                           f"or run() is not feeding the right layer); more calibration sequences may help")


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float,
                            order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U = upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in float64, and the boolean
    mask of dead inputs (H_jj = 0: the input was always zero on the calibration set).

    Row i of U, divided by U_ii, is the OBS update that compensates an error in column i onto the columns after
    it, with the inverse Hessian already restricted to those columns: one factorisation replaces the
    per-column Gaussian elimination of the inverse. Dead inputs get H_jj = 1 so H stays invertible; callers
    zero their weights, which cannot matter on the calibration inputs. `order` permutes the columns first
    (GPTQ's act_order), after the dead-input fix and before dampening, as in the reference."""
    H = hessian.detach().to(torch.float64).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    if order is not None:
        H = H[order][:, order]
    H.diagonal().add_(damp * H.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"the calibration Hessian is not positive definite after dampening damp={damp}; "
                         f"use more calibration tokens or a larger damp")
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise ValueError(f"the inverse calibration Hessian is numerically singular (damp={damp}); "
                         f"use a larger damp")
    return upper, dead


def check_damp_block(damp, block_size, key: str = "") -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < float(damp) < math.inf:
        raise ValueError(f"{key}damp must be a positive number (fraction of the mean Hessian diagonal added to "
                         f"it, e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{key}block_size must be a positive integer, got {block_size!r}")
