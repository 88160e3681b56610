"""Does realign's own GPTQ match the maintained GPTQModel library? A benchmark run on demand (not a test).

Both quantize the same fp32 model with the same calibration ids and settings. Per method (fp32, RTN, realign
GPTQ, GPTQModel GPTQ) we report the held-out loss (mean token cross-entropy), the mean over the quantized
Linears of the relative output reconstruction error ||(W - Ŵ) X||² / ||W X||² on the calibration inputs X of
the fp32 model, and wall time; and, per module, how far realign's Ŵ is from GPTQModel's.

GPTQModel needs its own venv (it pins numpy 2.2.6; its latest release needs a newer torch), so it runs in a
subprocess: benchmarks/_gptqmodel_worker.py. Settings matched on both sides: bits, group_size, sym, damp
(fraction of the mean Hessian diagonal added to it), no act order (GPTQModel: desc_act=False and
act_group_aware=False; the latter defaults to True), no static groups, no MSE grid search, the same block size
(GPTQModel's is forced from its fixed 128), each decoder layer calibrated on the previous *quantized* layer's
outputs (both do this). One difference cannot be switched off in realign, so GPTQModel runs twice:
  gptqmodel_matched   true_sequential=False: all Linears of a layer get their Hessians from one pass with the
                      layer unquantized, as realign does;
  gptqmodel_trueseq   true_sequential=True (GPTQModel's default): q/k/v, then o, then gate/up, then down, each
                      calibrated on the outputs of the sub-modules quantized before it.
GPTQModel rows use the weights its algorithm produced (fp32 scales); its saved checkpoint stores fp16 scales,
which the worker also dequantizes (GPTQModel's own converter) and which is evaluated separately.

Calibration text is Python's own documentation (pydoc_data.topics), never evaluation data; the held-out loss
uses the GPL-3 text shipped with the OS (4 x 256 tokens).

    nice -n 19 .venv/bin/python benchmarks/gptq_vs_gptqmodel.py --model-dir results/models/smollm2-135m/none/none \
        --bits 4 --group-size 64 --out benchmarks/results/gptq_vs_gptqmodel.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign.degrade.quantize import quantize_model
from realign.degrade.targets import block_linears

HELD_OUT_TEXT = Path("/usr/share/common-licenses/GPL-3")
WORKER = Path(__file__).with_name("_gptqmodel_worker.py")
VARIANTS = {"gptqmodel_matched": False, "gptqmodel_trueseq": True}  # name -> GPTQModel true_sequential


def calibration_ids(tokenizer, samples: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration ids [samples, seq_len], the next 4 x 256 tokens of the same text: in-domain held-out)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = pack(tokenizer, text, samples * seq_len + 4 * 256, "pydoc_data.topics")
    return ids[: samples * seq_len].reshape(samples, seq_len), ids[samples * seq_len:].reshape(4, 256)


def held_out_ids(tokenizer) -> torch.Tensor:
    return pack(tokenizer, HELD_OUT_TEXT.read_text(), 4 * 256, str(HELD_OUT_TEXT)).reshape(4, 256)


def pack(tokenizer, text: str, tokens: int, source: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"{source} has {len(ids)} tokens, fewer than the {tokens} needed")
    return torch.tensor(ids[:tokens], dtype=torch.long)


@torch.no_grad()
def loss(model, ids: torch.Tensor) -> float:
    return float(model(input_ids=ids, labels=ids).loss)


@torch.no_grad()
def input_gram(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X (float64) of every quantized Linear's input over the calibration tokens, on the fp32 model.

    Linears fed the same tensor (q/k/v, gate/up) share one matrix."""
    grams, handles, seen = {}, [], {}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen:
                flat = x.reshape(-1, x.shape[-1]).float()
                seen[key] = (flat.T @ flat).double()
            grams[name] = seen[key] if name not in grams else grams[name] + seen[key]
        return record

    for name, linear in block_linears(model).items():
        handles.append(linear.register_forward_pre_hook(hook(name)))
    try:
        for row in ids:
            seen.clear()
            model(input_ids=row[None])
    finally:
        for handle in handles:
            handle.remove()
    return grams


def output_error(delta: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """||delta X||² / ||weight X||², from the input Gram matrix X^T X (products in fp32, sums in fp64)."""
    gram = gram.float()
    return float(((delta.float() @ gram) * delta).double().sum() / ((weight.float() @ gram) * weight).double().sum())


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: linear.weight.detach().clone() for name, linear in block_linears(model).items()}


def with_weights(base, weights: dict[str, torch.Tensor]):
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, linear in block_linears(model).items():
            linear.weight.copy_(weights[f"{name}.weight"])
    return model


def evaluate(method: str, model, reference: dict, grams: dict, texts: dict, calib: torch.Tensor, seconds) -> dict:
    """Losses on `texts`, and the relative output error of each quantized Linear on two sets of calibration inputs:
    the fp32 model's (`grams`), and the ones this model itself feeds the Linear (what GPTQ fits, roughly)."""
    quantized = weights_of(model)
    own = input_gram(model, calib)
    errors = {m: output_error(quantized[m] - reference[m], reference[m], grams[m]) for m in reference}
    own_errors = {m: output_error(quantized[m] - reference[m], reference[m], own[m]) for m in reference}
    return {"method": method, **{f"{name}_loss": loss(model, ids) for name, ids in texts.items()},
            "mean_rel_output_error": sum(errors.values()) / len(errors),
            "mean_rel_output_error_own_inputs": sum(own_errors.values()) / len(own_errors), "wall_s": seconds,
            "per_module_rel_output_error": errors, "per_module_rel_output_error_own_inputs": own_errors,
            "weights": quantized}


def run_gptqmodel(args, calib: torch.Tensor, work: Path, true_sequential: bool) -> dict:
    """Run the worker (or reuse a finished run with the same spec and ids); returns its worker.json."""
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / "calib.safetensors"
    spec = {"model_dir": str(Path(args.model_dir).resolve()), "calib": str(calib_file), "bits": args.bits,
            "group_size": args.group_size, "sym": args.sym, "damp": args.damp, "true_sequential": true_sequential,
            "block_size": args.block_size, "out_dir": str(work / "gptqmodel")}
    spec_file, done = work / "spec.json", work / "gptqmodel" / "worker.json"
    if (args.reuse and done.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == spec
            and calib_file.is_file() and torch.equal(load_file(str(calib_file))["ids"], calib)):
        print(f"  reusing {done}", flush=True)
        return {**json.loads(done.read_text()), "subprocess_wall_s": None, "reused": True}
    save_file({"ids": calib.contiguous()}, str(calib_file))
    spec_file.write_text(json.dumps(spec, indent=2))
    # GPTQModel's CPU pool wants 2 workers; its default on a 2-core box is 1, and quantize then refuses to start.
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    start = time.perf_counter()
    with open(work / "worker.log", "w") as log:
        result = subprocess.run([args.gptqmodel_python, str(WORKER), str(spec_file)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"GPTQModel worker failed ({result.returncode}); see {work / 'worker.log'}")
    return {**json.loads(done.read_text()), "subprocess_wall_s": time.perf_counter() - start, "reused": False}


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], reference: dict, grams: dict) -> dict:
    """Per module: how far realign's Ŵ is from GPTQModel's (in weights and in outputs)."""
    rows = {}
    for m in reference:
        diff = ours[m] - theirs[m]
        rows[m] = {
            "weight_diff_over_gptqmodel_error": float(diff.norm() / (theirs[m] - reference[m]).norm()),
            "weight_diff_over_weight": float(diff.norm() / reference[m].norm()),
            "rel_output_diff": output_error(diff, reference[m], grams[m]),
            "fraction_weights_differing": float((~torch.isclose(ours[m], theirs[m], rtol=1e-4, atol=1e-7))
                                                .float().mean()),
        }
    summary = {key: {"mean": sum(r[key] for r in rows.values()) / len(rows), "max": max(r[key] for r in rows.values())}
               for key in next(iter(rows.values()))}
    return {"summary": summary, "per_module": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="fp32 HF model directory (with tokenizer)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sym", action="store_true", help="symmetric grids (default: asymmetric, as realign's RTN)")
    parser.add_argument("--damp", type=float, default=0.01, help="dampening, fraction of the mean Hessian diagonal")
    parser.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block size (both sides)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS),
                        help="GPTQModel runs (matched: true_sequential=False; trueseq: its default True)")
    parser.add_argument("--gptqmodel-python", default="/tmp/venv_gptq/bin/python")
    parser.add_argument("--work-dir", default="/tmp/gptq_vs_gptqmodel", help="scratch for GPTQModel runs")
    parser.add_argument("--reuse", action="store_true", help="reuse finished GPTQModel runs with the same spec")
    parser.add_argument("--out", required=True, help="JSON report path")
    args = parser.parse_args()
    from realign.degrade.gptq import gptq_quantize_model

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    calib, in_domain = calibration_ids(tokenizer, args.samples, args.seq_len)
    texts = {"held_out": held_out_ids(tokenizer), "in_domain": in_domain}
    load_before = os.getloadavg()
    tag = (f"b{args.bits}g{args.group_size}{'s' if args.sym else 'a'}d{args.damp}k{args.block_size}"
           f"n{args.samples}x{args.seq_len}")

    workers = {}
    for variant in args.variants:  # first, so no in-process work competes with it for the cores
        print(f"{variant} (GPTQModel subprocess) ...", flush=True)
        workers[variant] = run_gptqmodel(args, calib, Path(args.work_dir) / tag / variant, VARIANTS[variant])

    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    reference = weights_of(base)
    print("calibration input statistics ...", flush=True)
    grams = input_gram(base, calib)
    results = [evaluate("fp32", base, reference, grams, texts, calib, None)]

    print("RTN ...", flush=True)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    quantize_model(model, args.bits, args.group_size)
    results.append(evaluate("rtn", model, reference, grams, texts, calib, time.perf_counter() - start))

    print("realign GPTQ ...", flush=True)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    constraint, _ = gptq_quantize_model(model, calib, args.bits, args.group_size, sym=args.sym, act_order=False,
                                        damp=args.damp, block_size=args.block_size)
    results.append(evaluate("realign_gptq", model, reference, grams, texts, calib, time.perf_counter() - start))
    del model

    print("GPTQModel results ...", flush=True)
    for variant, worker in workers.items():
        out = Path(args.work_dir) / tag / variant / "gptqmodel"
        model = with_weights(base, load_file(str(out / "produced.safetensors")))
        results.append(evaluate(variant, model, reference, grams, texts, calib, worker["quantize_s"]))
        model = with_weights(base, load_file(str(out / "weights.safetensors")))
        worker["saved_checkpoint_fp16_scales"] = {f"{name}_loss": loss(model, ids) for name, ids in texts.items()}
        del model

    by_name = {r["method"]: r for r in results}
    for r in results:
        for name in texts:
            r[f"{name}_loss_increase"] = r[f"{name}_loss"] - by_name["fp32"][f"{name}_loss"]
    ours = by_name["realign_gptq"]
    comparisons = {}
    for variant in workers:
        theirs = by_name[variant]
        comparisons[variant] = {
            **{f"{key}_realign_over_gptqmodel": ours[key] / theirs[key]
               for key in ("held_out_loss_increase", "in_domain_loss_increase", "mean_rel_output_error",
                           "mean_rel_output_error_own_inputs")},
            **compare(ours["weights"], theirs["weights"], reference, grams)}

    print(f"\n{args.bits}-bit, group {args.group_size}, {'sym' if args.sym else 'asym'}, damp {args.damp}, "
          f"block {args.block_size}, calibration {args.samples} x {args.seq_len}; losses on 4 x 256 tokens: "
          f"GPL-3 (held out) and pydoc (in domain, disjoint from calibration)")
    print(f"{'method':<20}{'GPL-3 loss':>11}{'(+)':>8}{'pydoc loss':>11}{'(+)':>8}{'out err fp32 X':>16}"
          f"{'out err own X':>15}{'wall s':>8}")
    for r in results:
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        print(f"{r['method']:<20}{r['held_out_loss']:>11.4f}{r['held_out_loss_increase']:>8.4f}"
              f"{r['in_domain_loss']:>11.4f}{r['in_domain_loss_increase']:>8.4f}{r['mean_rel_output_error']:>16.5f}"
              f"{r['mean_rel_output_error_own_inputs']:>15.5f}{wall:>8}")
    for variant, c in comparisons.items():
        s = c["summary"]
        print(f"realign / {variant}: GPL-3 loss increase x{c['held_out_loss_increase_realign_over_gptqmodel']:.3f}, "
              f"pydoc x{c['in_domain_loss_increase_realign_over_gptqmodel']:.3f}, output error "
              f"x{c['mean_rel_output_error_realign_over_gptqmodel']:.3f} (own inputs "
              f"x{c['mean_rel_output_error_own_inputs_realign_over_gptqmodel']:.3f}); per module |Ŵr - Ŵg| / "
              f"|W - Ŵg| mean {s['weight_diff_over_gptqmodel_error']['mean']:.3f} "
              f"max {s['weight_diff_over_gptqmodel_error']['max']:.3f}, "
              f"weights differing {s['fraction_weights_differing']['mean']:.1%}")

    for r in results:
        del r["weights"]
    report = {
        "settings": {"model_dir": str(Path(args.model_dir).resolve()), "bits": args.bits,
                     "group_size": args.group_size, "sym": args.sym, "damp": args.damp, "act_order": False,
                     "block_size": args.block_size, "samples": args.samples, "seq_len": args.seq_len,
                     "calibration_text": "pydoc_data.topics (sorted keys, joined by blank lines), no special tokens",
                     "held_out_text": f"{HELD_OUT_TEXT}, first 4 x 256 tokens",
                     "in_domain_text": "pydoc_data.topics, the 4 x 256 tokens right after the calibration tokens",
                     "output_error": "mean over the quantized Linears of ||(W - Ŵ) X||² / ||W X||², X = the "
                                     "Linear's inputs on the calibration ids in the fp32 model "
                                     "(mean_rel_output_error) or in the quantized model itself (..._own_inputs)"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "gptqmodel_side": next(iter(workers.values()))["versions"] if workers else None},
        "gptqmodel_workers": {v: {k: x for k, x in w.items() if k != "versions"} for v, w in workers.items()},
        "realign_constraint": {k: v for k, v in constraint.items() if k != "modules"},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "results": results, "realign_vs_gptqmodel": comparisons,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
