"""Calibrated one-shot compression: layer-wise calibration, GPTQ, SparseGPT, Wanda, N:M helpers."""

import pytest
import torch

from realign.degrade import constraints
from realign.degrade.calibration import collect_hessians, collect_input_sq_norms, targets_by_layer, sequential_layers
from realign.degrade.gptq import gptq_quantize_model, gptq_quantize_weight
from realign.degrade.nm import nm_mask, nm_violations, parse_pattern
from realign.degrade.prune import magnitude_mask
from realign.degrade.quantize import fake_quantize, grid_violation, levels_per_group, rtn_grid, rtn_quantize
from realign.degrade.sparsegpt import sparsegpt_prune_model, sparsegpt_prune_weight
from realign.degrade.targets import block_linears
from realign.degrade.wanda import wanda_mask, wanda_prune_model


def random_calibration(n=8, seq_len=32, vocab=500, seed=0):
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def correlated_inputs(tokens, width, seed, dead=()):
    """Inputs with correlated features and uneven scales (what makes second-order methods beat RTN/magnitude)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, width, generator=g, dtype=torch.float64) @ torch.randn(width, width, generator=g,
                                                                                  dtype=torch.float64)
    X = X * torch.rand(width, generator=g, dtype=torch.float64).mul(3).add(0.1)
    X[:, list(dead)] = 0
    return X


def hessian_of(X):
    return 2 * X.T @ X / X.shape[0]


def output_error(W, W_hat, H):
    """||W X - W_hat X||^2 / n * 2 = tr(D H D^T) with D = W - W_hat."""
    D = (W - W_hat).to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", D, H, D))


def layer_hessians(model, calibration):
    """Every block Linear's input Hessian on the *uncompressed* model (sequential_layers without modification)."""
    groups = targets_by_layer(model)
    hessians = {}
    for index, _layer, run in sequential_layers(model, calibration):
        hessians.update(collect_hessians(groups[index], run))
    return hessians


# ---------------------------------------------------------------- layer-wise calibration


def test_sequential_layers_reproduce_the_forward_and_propagate_changes(tiny):
    model, _ = tiny
    calibration = random_calibration(n=7)  # batches of 3, 3, 1
    captured = {}
    model.model.norm.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))

    outputs, handles = [], []
    for index, layer, run in sequential_layers(model, calibration, batch_size=3):
        run()
        if index == 0:  # changes made to a layer must reach the next layers' inputs
            with torch.no_grad():
                layer.mlp.down_proj.weight.mul_(0.5)
        if index == len(model.model.layers) - 1:  # records the last layer's recomputed outputs
            handles.append(layer.register_forward_hook(lambda module, args, output: outputs.append(output)))
    handles[0].remove()
    with torch.no_grad():
        model(input_ids=calibration)
    assert len(outputs) == 3
    torch.testing.assert_close(torch.cat(outputs), captured["x"], atol=1e-5, rtol=0)
    assert model.training is False  # from_pretrained gives eval; sequential_layers must restore the mode


def test_sequential_layers_restores_the_layers_and_training_mode(tiny):
    model, _ = tiny
    model.train()
    for _ in sequential_layers(model, random_calibration(n=2)):
        pass
    assert model.training
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_sequential_layers_rejects_models_without_decoder_layers():
    with pytest.raises(ValueError, match="no stack of decoder layers"):
        next(sequential_layers(torch.nn.Linear(4, 4), random_calibration()))


# ---------------------------------------------------------------- GPTQ


def slow_gptq(W, H, bits, group_size, damp=0.01, act_order=False, sym=False):
    """GPTQ written plainly: one column at a time, with the full inverse Hessian of the remaining columns
    (Gaussian elimination after each column), no Cholesky factor, no blocks."""
    W = W.to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    cols = W.shape[1]
    # act_order: decreasing H_jj, ties by position, taken before dampening (which adds the same to every H_jj).
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)

    def grid(columns):
        if sym:
            scale = (2 * columns.abs().amax(dim=1) / (2**bits - 1)).clamp_min(1e-12)
            return scale[:, None], torch.full_like(scale[:, None], 2 ** (bits - 1))
        return rtn_grid(columns, bits, columns.shape[1])

    # Grids: static (original weights) with act_order, else fitted on the updated weights at the group's start.
    grids = {g // group_size: grid(W[:, g:g + group_size]) for g in range(0, cols, group_size)} if act_order else {}
    Q = torch.zeros_like(W)
    for j in order.tolist():
        g = j // group_size
        if not act_order and j % group_size == 0:
            grids[g] = grid(W[:, j:j + group_size])
        scale, zero = grids[g]
        q = fake_quantize(W[:, j:j + 1], scale, zero, bits)[:, 0]
        Q[:, j] = q
        W -= ((W[:, j] - q) / Hinv[j, j])[:, None] * Hinv[j][None, :]
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


@pytest.mark.parametrize("act_order,sym", [(False, False), (True, False), (False, True), (True, True)])
def test_gptq_matches_a_plain_column_by_column_reference(act_order, sym):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 64, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(256, 64, seed=2, dead=[5]))
    expected = slow_gptq(W, H, bits=3, group_size=16, act_order=act_order, sym=sym)
    # Block sizes that split groups across blocks (7), align with them (16) and hold everything (1000).
    for block_size in (7, 16, 1000):
        Q, scale, zero = gptq_quantize_weight(W, H, 3, 16, sym=sym, act_order=act_order, block_size=block_size)
        torch.testing.assert_close(Q, expected, atol=1e-9, rtol=0)
        assert grid_violation(Q, scale, zero, 3) < 1e-9
    assert torch.all(Q[:, 5] == 0)  # a dead input gets weight 0


def test_gptq_beats_rtn_on_a_random_layer():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 128, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(512, 128, seed=4))
    for bits in (2, 3, 4):  # measured ratios: 0.89, 0.57, 0.55 (act_order: 0.43, 0.35, 0.34)
        rtn_error = output_error(W, rtn_quantize(W, bits, 32), H)
        for act_order in (False, True):
            Q, _, _ = gptq_quantize_weight(W, H, bits, 32, act_order=act_order)
            assert output_error(W, Q, H) < 0.95 * rtn_error


@pytest.mark.parametrize("bits,sym,act_order", [(3, False, False), (3, False, True), (4, True, False),
                                                (2, True, True)])
def test_gptq_model_stays_on_its_grid(tiny, bits, sym, act_order):
    model, _ = tiny
    calibration = random_calibration()
    before = {name: linear.weight.detach().clone() for name, linear in block_linears(model).items()}
    constraint, grids = gptq_quantize_model(model, calibration, bits, 32, sym=sym, act_order=act_order)
    layers = block_linears(model)
    assert constraint["modules"] == sorted(layers) and constraint["kind"] == "grid"
    assert constraint["scheme"] == ("gptq-sym" if sym else "gptq-asym") and constraint["act_order"] == act_order
    assert constraint["calibration"] == {"sequences": 8, "tokens": 256}
    for name, linear in layers.items():
        scale, zero = grids[f"{name}.scale"], grids[f"{name}.zero"]
        assert scale.dtype == zero.dtype == torch.float64 and scale.shape == (linear.out_features,
                                                                                linear.in_features // 32)
        assert grid_violation(linear.weight, scale, zero, bits) < 1e-6
        assert levels_per_group(linear.weight, 32) <= 2**bits
        assert not torch.equal(linear.weight, before[name])
        if sym:
            assert torch.all(zero == 2 ** (bits - 1))
    assert constraints.check(model, constraint, grids)["ok"]


def test_gptq_layer_error_is_below_rtn_on_the_tiny_model(tiny):
    """GPTQ's defining property, on each Linear of the model with its real calibration inputs, at 3 bits."""
    model, _ = tiny
    hessians = layer_hessians(model, random_calibration())
    ratios = {}
    for name, linear in block_linears(model).items():
        W, H = linear.weight.detach().to(torch.float64), hessians[name]
        Q, _, _ = gptq_quantize_weight(W, H, 3, 32)
        ratios[name] = output_error(W, Q, H) / output_error(W, rtn_quantize(W, 3, 32), H)
    assert max(ratios.values()) < 1, ratios


# ---------------------------------------------------------------- SparseGPT


def slow_sparsegpt(W, H, sparsity=None, nm=None, damp=0.01):
    """SparseGPT with the whole layer as one block, written with explicit inverse-Hessian elimination."""
    W = W.to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    rows, cols = W.shape
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    # OBS saliency denominators: [H_F^-1]_jj with F = columns j.. (those not yet processed when j is reached).
    denominators, E = [], Hinv.clone()
    for j in range(cols):
        denominators.append(E[j, j].item())
        E -= E[:, j:j + 1] @ E[j:j + 1, :] / E[j, j]
    denominators = torch.tensor(denominators, dtype=torch.float64)
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    if nm is None:
        lowest = torch.argsort((W.pow(2) / denominators).flatten(), stable=True)[:round(sparsity * W.numel())]
        prune.view(-1)[lowest] = True
    for j in range(cols):
        if nm is not None and j % nm[1] == 0:
            prune[:, j:j + nm[1]] = ~nm_mask(W[:, j:j + nm[1]].pow(2) / denominators[j:j + nm[1]], *nm)
        q = W[:, j].masked_fill(prune[:, j], 0)
        W -= ((W[:, j] - q) / Hinv[j, j])[:, None] * Hinv[j][None, :]
        W[:, j] = q
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return W, ~prune


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (None, (2, 4)), (None, (1, 4))])
def test_sparsegpt_matches_a_plain_column_by_column_reference(sparsity, nm):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(10, 48, generator=g, dtype=torch.float64)
    H = hessian_of(correlated_inputs(200, 48, seed=6, dead=[3]))
    expected, expected_mask = slow_sparsegpt(W, H, sparsity=sparsity, nm=nm)
    pruned, mask = sparsegpt_prune_weight(W, H, sparsity=sparsity, nm=nm, block_size=1000)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(pruned, expected, atol=1e-9, rtol=0)
    if nm is not None:  # blocks of 10 are rounded down to multiples of M: the same N:M result
        blocked, blocked_mask = sparsegpt_prune_weight(W, H, nm=nm, block_size=10)
        assert torch.equal(blocked_mask, mask)
        torch.testing.assert_close(blocked, pruned, atol=1e-9, rtol=0)


@pytest.mark.parametrize("block_size", [7, 16, 128])
def test_sparsegpt_exact_sparsity_and_beats_magnitude_and_wanda(block_size):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(32, 128, generator=g, dtype=torch.float64)
    X = correlated_inputs(512, 128, seed=8)
    H = hessian_of(X)
    sq_norms = X.pow(2).sum(dim=0)
    for sparsity in (0.3, 0.5, 0.7):
        pruned, mask = sparsegpt_prune_weight(W, H, sparsity=sparsity, block_size=block_size)
        assert int((~mask).sum()) == round(sparsity * W.numel())
        assert torch.all(pruned[~mask] == 0) and torch.all(pruned[mask] != 0)
        error = output_error(W, pruned, H)
        assert error < output_error(W, W * magnitude_mask(W, sparsity), H)
        # Tiny blocks (7 columns x 32 rows) force every block to the same sparsity, which can cost more than
        # Wanda's per-row selection gains; from 16 columns on SparseGPT wins (measured 0.62-0.90 of Wanda's error).
        if block_size >= 16:
            assert error < output_error(W, W * wanda_mask(W, sq_norms, sparsity), H)
    pruned, mask = sparsegpt_prune_weight(W, H, nm=(2, 4), block_size=block_size)
    assert nm_violations(pruned, 2, 4) == 0 and torch.all(mask.reshape(-1, 4).sum(-1) == 2)
    assert output_error(W, pruned, H) < output_error(W, W * wanda_mask(W, sq_norms, nm=(2, 4)), H)


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (None, "2:4")])
def test_sparsegpt_model_masks_and_reconstruction(tiny, sparsity, pattern):
    model, _ = tiny
    before = {name: linear.weight.detach().clone() for name, linear in block_linears(model).items()}
    hessians = layer_hessians(model, random_calibration())
    constraint, masks = sparsegpt_prune_model(model, random_calibration(), sparsity=sparsity, pattern=pattern)
    assert constraint["scheme"] == "sparsegpt" and constraint["pattern"] == pattern
    assert constraint["sparsity"] == 0.5 and constraint["achieved_sparsity"] == 0.5
    for name, linear in block_linears(model).items():
        mask = masks[name]
        assert mask.dtype == torch.bool and mask.shape == linear.weight.shape
        assert torch.all(linear.weight[~mask] == 0)
        assert not torch.equal(linear.weight[mask], before[name][mask])  # OBS updated the kept weights
        if pattern:
            assert nm_violations(linear.weight, 2, 4) == 0
    # Layer 0 saw the uncompressed inputs: there SparseGPT must beat magnitude pruning (with the same structure).
    for name in targets_by_layer(model)[0]:
        W, H = before[name].to(torch.float64), hessians[name]
        magnitude = nm_mask(W.abs(), 2, 4) if pattern else magnitude_mask(W, 0.5)
        error = output_error(W, block_linears(model)[name].weight.detach(), H)
        assert error < output_error(W, W * magnitude, H)
    assert constraints.check(model, constraint, masks)["ok"]


# ---------------------------------------------------------------- Wanda and N:M


def test_wanda_with_equal_input_norms_is_per_row_magnitude():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(9))
    mask = wanda_mask(W, torch.full((64,), 3.0), sparsity=0.3)
    assert torch.all((~mask).sum(dim=1) == round(0.3 * 64))
    row_order = torch.argsort(W.abs(), dim=1, stable=True)
    expected = torch.ones_like(mask)
    expected.scatter_(1, row_order[:, :round(0.3 * 64)], False)
    assert torch.equal(mask, expected)
    # Unequal norms: a loud input feature protects its weights.
    norms = torch.ones(64)
    norms[0] = 1e6
    assert torch.all(wanda_mask(W, norms, sparsity=0.9)[:, 0])


@pytest.mark.parametrize("sparsity,pattern", [(0.3, None), (None, "2:4"), (None, "1:4")])
def test_wanda_model_masks(tiny, sparsity, pattern):
    model, _ = tiny
    calibration = random_calibration()
    before = {name: linear.weight.detach().clone() for name, linear in block_linears(model).items()}
    first_layer = targets_by_layer(model)[0]
    norms = collect_input_sq_norms(first_layer, next(sequential_layers(model, calibration))[2])
    constraint, masks = wanda_prune_model(model, calibration, sparsity=sparsity, pattern=pattern)
    assert constraint["scheme"] == "wanda" and constraint["pattern"] == pattern
    for name, linear in block_linears(model).items():
        mask = masks[name]
        torch.testing.assert_close(linear.weight, before[name] * mask, atol=0, rtol=0)  # no reconstruction
        if pattern is None:
            assert torch.all((~mask).sum(dim=1) == round(sparsity * linear.in_features))
        else:
            n, m = parse_pattern(pattern)
            assert nm_violations(mask, n, m) == 0 and torch.all(mask.reshape(-1, m).sum(-1) == n)
    # Unstructured: round(s * in) per row, so the achieved sparsity is within half a weight per row of the target.
    assert abs(constraint["achieved_sparsity"] - constraint["sparsity"]) <= (0.5 / 64 if pattern is None else 1e-12)
    for name in first_layer:  # layer 0's mask comes from the uncompressed model's input norms
        target = constraint["sparsity"] if pattern is None else None
        expected = wanda_mask(before[name], norms[name], sparsity=target,
                              nm=parse_pattern(pattern) if pattern else None)
        assert torch.equal(masks[name], expected)


def test_nm_helpers():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 1 : 8 ") == (1, 8)
    for bad in ("4:2", "0:4", "2:2", "2/4", "", "a:b", None):
        with pytest.raises(ValueError, match="cfg.pattern must look like 'N:M'"):
            parse_pattern(bad, key="cfg.")
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 5.0]])
    assert nm_mask(score, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    assert nm_mask(torch.zeros(1, 4), 1, 4).tolist() == [[True, False, False, False]]  # ties: earlier column
    assert nm_violations(torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]]), 2, 4) == 1
    assert nm_violations(nm_mask(torch.randn(8, 32), 2, 4), 2, 4) == 0
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_violations(torch.ones(2, 6), 2, 4)


# ---------------------------------------------------------------- parameters


def test_bad_parameters_name_their_config_key(tiny):
    model, _ = tiny
    before = {name: linear.weight.detach().clone() for name, linear in block_linears(model).items()}
    cal = random_calibration(n=2)
    key = "degradations.x."
    cases = [
        (lambda: gptq_quantize_model(model, cal, 0, 32, key=key), r"degradations\.x\.bits"),
        (lambda: gptq_quantize_model(model, cal, 3, 48, key=key), r"degradations\.x\..*group_size=48"),
        (lambda: gptq_quantize_model(model, cal, 3, 32, damp=-1, key=key), r"degradations\.x\.damp"),
        (lambda: gptq_quantize_model(model, cal, 3, 32, block_size=0, key=key), r"degradations\.x\.block_size"),
        (lambda: gptq_quantize_model(model, cal.float(), 3, 32, key=key), r"degradations\.x\.calibration"),
        (lambda: wanda_prune_model(model, cal, key=key), r"degradations\.x\.sparsity.*degradations\.x\.pattern"),
        (lambda: wanda_prune_model(model, cal, 0.5, "2:4", key=key), r"exactly one of degradations\.x\.sparsity"),
        (lambda: wanda_prune_model(model, cal, 1.5, key=key), r"degradations\.x\.sparsity must be"),
        (lambda: wanda_prune_model(model, cal, pattern="4:2", key=key), r"degradations\.x\.pattern"),
        (lambda: wanda_prune_model(model, cal, pattern="2:3", key=key), r"degradations\.x\.pattern.*M=3"),
        (lambda: sparsegpt_prune_model(model, cal, 0.0, key=key), r"degradations\.x\.sparsity must be"),
        (lambda: sparsegpt_prune_model(model, cal, pattern="3:5", key=key), r"degradations\.x\.pattern.*M=5"),
        (lambda: sparsegpt_prune_model(model, cal, 0.5, damp=0, key=key), r"degradations\.x\.damp"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    # Parameters are checked before anything is modified.
    assert all(torch.equal(linear.weight, before[name]) for name, linear in block_linears(model).items())


# ---------------------------------------------------------------- damage on a trained model


@pytest.fixture(scope="module")
def fitted_tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model after a short fit to Python source, with calibration and held-out text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.data.corpora import corpus_files, read_texts, stdlib_root
    from realign.data.sequences import packed_chunks
    from realign.training import TrainConfig, train

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    texts = read_texts(corpus_files(stdlib_root())[:200], 8 * 1000 * 64)
    examples = packed_chunks(tokenizer, texts, 64, max_chunks=1000)
    # Long enough that the weights carry structure which compression measurably damages (held-out NLL ~4.3).
    train(model, examples[:960], lambda m, b: m(**b).loss,
          TrainConfig(steps=300, lr=1e-2, batch_size=8, warmup_steps=10), tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("fitted") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    calibration = torch.stack([e["input_ids"] for e in examples[:16]])
    return out, calibration, examples[960:]


def test_damage_grows_with_severity(fitted_tiny):
    """Held-out NLL and the divergence from the undamaged model grow with bits removed / sparsity.

    The divergence (KL from the undamaged model's next-token distributions) must grow strictly. The NLL is
    allowed to dip by NLL_SLACK between neighbouring levels: a near-lossless perturbation (8 -> 4 bit GPTQ moves
    the NLL by ~1e-3) of a briefly trained model can lower held-out NLL by chance as easily as raise it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.measure.divergence import mean_nll, output_divergence

    NLL_SLACK = 0.005  # measured on a 2-core CI machine: 3-bit GPTQ 0.0024 below 4-bit (4.30425 vs 4.30663)
    model_dir, calibration, heldout = fitted_tiny
    pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    undamaged = AutoModelForCausalLM.from_pretrained(model_dir)
    base = mean_nll(undamaged, heldout, pad_id)["nll"]

    def damage_after(compress):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        compress(model)
        return (mean_nll(model, heldout, pad_id)["nll"],
                output_divergence(undamaged, model, heldout, pad_id)["kl_teacher_artifact"])

    series = {
        "gptq": [damage_after(lambda m, b=b: gptq_quantize_model(m, calibration, b, 32)) for b in (8, 4, 3, 2)],
        "wanda": [damage_after(lambda m, s=s: wanda_prune_model(m, calibration, s)) for s in (0.3, 0.5, 0.7)],
        "sparsegpt": [damage_after(lambda m, s=s: sparsegpt_prune_model(m, calibration, s)) for s in (0.3, 0.5, 0.7)],
    }
    for method, points in series.items():
        nll, kl = zip(*points)
        assert all(b > a for a, b in zip(kl, kl[1:])), (method, kl)
        assert all(b >= a - NLL_SLACK for a, b in zip(nll, nll[1:])), (method, nll)
        assert nll[-1] > max(nll[:-1]) and nll[-1] > base + 0.01, (method, base, nll)
    assert abs(series["gptq"][0][0] - base) < 0.001  # 8 bits is near lossless
    # One-shot reconstruction pays off at the same sparsity: SparseGPT damages less than Wanda.
    assert all(s[1] < w[1] for s, w in zip(series["sparsegpt"], series["wanda"]))
