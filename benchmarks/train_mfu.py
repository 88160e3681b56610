"""Training throughput of one KD step on SmolLM2-135M and its model FLOPs utilisation (MFU). Run on demand.

The step is what `kd` recovery does per optimizer step: a student forward and backward on a batch of 4 x 160
tokens, a top-k distillation loss against teacher logits that come precomputed (top-64 values and indices per
position, as a teacher-logit cache would give them; the teacher never runs here), gradient clipping and an
AdamW step. The model is built from a LlamaConfig with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3
KV heads, MLP 1536, vocabulary 49152, tied embeddings) and random weights: throughput does not depend on them.

FLOPs per token (the usual matmul count, Kaplan et al. 2020 / PaLM appendix B; a multiply-add is 2 FLOPs, the
backward pass costs twice the forward):
  6 x N_layers       N_layers = the parameters of the 30 decoder layers (q, k, v, o, gate, up, down; norms are
                     counted but negligible): 106.2 M, so 637 MFLOP;
  6 x d x V          the LM head (576 x 49152, tied to the embedding, whose lookup costs nothing): 170 MFLOP;
  12 x L x d x T     attention scores and their weighted sum (QK^T and AV, 2 x 2 x T x d forward per layer, x3 for
                     backward), with T = 160 and no discount for the causal mask (PaLM's convention): 33 MFLOP.
Total about 840 MFLOP per token; element-wise work (norms, SiLU, softmaxes, the loss, AdamW) is not counted,
as usual, although on a CPU it is not free. MFU = tokens/s x FLOPs per token / peak, where the peak is the
GEMM throughput in the variant's precision (fp32, or bf16 for fused-bf16) measured in the same run (a 2048-cube product and the model's own [640 x 576] x
[576 x 1536] product, measured before every variant and at the end; the best of all is the peak, so a
machine shared with other work cannot inflate the MFU by lowering the peak).

Four variants of the same step, measured side by side; the three fp32 ones give the same losses to ~1e-6:
  naive      log_softmax over the full vocabulary on a float32 copy of the logits, then gather the top-k;
             AdamW with its default (foreach) implementation;
  logsumexp  log q at the top-k = logits[top-k] - logsumexp(logits): no second [B, T, V] tensor and its
             backward;
  fused      logsumexp + AdamW(fused=True): one kernel over all parameters instead of a dozen foreach passes;
  fused-bf16 fused under bf16 autocast (fp32 weights and optimizer, bf16 products), training.dtype bfloat16. Its MFU
             is against the bf16 GEMM peak, measured alongside the fp32 one; on a CPU without bf16 units
             (avx512_bf16, AMX) bf16 is emulated and this variant is several times slower.

    .venv/bin/python benchmarks/train_mfu.py --steps 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from _timing import best_rates, gemm_rates
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def flops_per_token(model: LlamaForCausalLM, seq_len: int) -> dict[str, float]:
    config = model.config
    layers = sum(p.numel() for p in model.model.layers.parameters())
    head = config.hidden_size * config.vocab_size
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return {"layers": 6 * layers, "lm_head": 6 * head, "attention": attention,
            "total": 6 * layers + 6 * head + attention, "params_layers": layers,
            "params_total": sum(p.numel() for p in model.parameters())}


def topk_kd_loss(logits: torch.Tensor, top_values: torch.Tensor, top_index: torch.Tensor,
                 full_log_softmax: bool) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || q_student) on the teacher's top-k, p renormalised over it."""
    teacher_logp = F.log_softmax(top_values.float(), dim=-1)
    if full_log_softmax:
        student_logp = F.log_softmax(logits.float(), dim=-1).gather(-1, top_index)
    else:
        student_logp = logits.gather(-1, top_index).float() - torch.logsumexp(logits.float(), -1, keepdim=True)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


GEMM_SHAPES = {"square_2048": (2048, 2048, 2048), "model_640x576x1536": (640, 576, 1536)}


VARIANTS = {"naive": dict(full_log_softmax=True, fused_adamw=False, bf16=False),
            "logsumexp": dict(full_log_softmax=False, fused_adamw=False, bf16=False),
            "fused": dict(full_log_softmax=False, fused_adamw=True, bf16=False),
            "fused-bf16": dict(full_log_softmax=False, fused_adamw=True, bf16=True)}


def run_variant(full_log_softmax: bool, fused_adamw: bool, bf16: bool, batch: int, seq: int, k: int, steps: int,
                warmup: int) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    model.config.use_cache = False
    model.train()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    top_values, top_index = torch.randn(batch, seq, model.config.vocab_size, generator=g).topk(k, dim=-1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw or None)
    times, phases, losses = [], [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # bf16: what realign.device.autocast does for training.dtype bfloat16 (fp32 weights, bf16 products)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=input_ids).logits
            loss = topk_kd_loss(logits, top_values, top_index, full_log_softmax)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        end = time.perf_counter()
        losses.append(loss.item())
        if step >= warmup:
            times.append(end - start)
            phases.append({"forward_and_loss": forward - start, "backward": backward - forward,
                           "clip_and_adamw": end - backward})
    best = min(range(len(times)), key=times.__getitem__)
    return {"step_s": times[best], "phases_s": phases[best], "all_steps_s": times, "losses": losses,
            "flops": flops_per_token(model, seq)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=160)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (best is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peaks = [gemm_rates(GEMM_SHAPES)]
    tokens = args.batch * args.seq
    figures = {"threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq, "topk": args.topk,
               "variants": {}}
    print(f"KD step on SmolLM2-135M shape, batch {args.batch} x {args.seq} tokens, top-{args.topk} teacher logits, "
          f"{figures['threads']} threads")
    for name, variant in VARIANTS.items():
        if name != "naive":
            peaks.append(gemm_rates(GEMM_SHAPES))
        figures["variants"][name] = run_variant(**variant, batch=args.batch, seq=args.seq, k=args.topk,
                                                steps=args.steps, warmup=args.warmup)
    peaks.append(gemm_rates(GEMM_SHAPES))
    best = best_rates(peaks)
    peak, peak_bf16 = best["fp32"], best["bf16"]
    peak_gflops = {precision: max(rates.values()) for precision, rates in best.items()}
    figures.update(gemm_gflops_fp32=peak, gemm_gflops_bf16=peak_bf16, gemm_measurements=peaks,
                   peak_gflops=peak_gflops["fp32"], peak_gflops_bf16=peak_gflops["bf16"])
    for precision, rates in best.items():
        print(f"  {precision} GEMM, best of {len(peaks)} measurements: {rates['square_2048']:.0f} GFLOP/s "
              f"(2048 cube), {rates['model_640x576x1536']:.0f} GFLOP/s (640x576x1536)")
    for name, result in figures["variants"].items():
        flops = result["flops"]
        result["tokens_per_s"] = tokens_per_s = tokens / result["step_s"]
        # MFU against the peak of the precision the variant's products run in
        result["mfu"] = mfu = tokens_per_s * flops["total"] / (
            peak_gflops["bf16" if VARIANTS[name]["bf16"] else "fp32"] * 1e9)
        print(f"  {name:9s}: {result['step_s']:.2f} s/step (best of {args.steps}: "
              f"{', '.join(f'{t:.2f}' for t in result['all_steps_s'])}), {tokens_per_s:.0f} tokens/s, "
              f"{flops['total'] / 1e6:.0f} MFLOP/token, MFU {100 * mfu:.1f} %; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in result["phases_s"].items()))
    losses = [figures["variants"][v]["losses"] for v in VARIANTS if not VARIANTS[v]["bf16"]]
    figures["max_loss_diff"] = max(abs(a - b) for other in losses[1:] for a, b in zip(losses[0], other))
    print(f"  fp32 losses of every step agree across variants within {figures['max_loss_diff']:.1e} "
          f"(step 1: {', '.join(f'{l[0]:.6f}' for l in losses)})")
    bf16 = figures["variants"]["fused-bf16"]["losses"]
    figures["bf16_loss_diff"] = max(abs(a - b) for a, b in zip(figures["variants"]["fused"]["losses"], bf16))
    print(f"  bf16 autocast's losses differ from fp32's by at most {figures['bf16_loss_diff']:.1e} "
          f"(the check that matters is the recovered models' gains: docs/2026-12-08-bf16.md)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
