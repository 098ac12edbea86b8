#!/usr/bin/env python3
"""Seed-stack baseline: QLoRA training speed of transformers + bitsandbytes + PEFT on a
Qwen3-30B-A3B-shaped MoE (random weights, `--layers` decoder layers).

What it measures
  * the device's dense bf16 matmul rate (8192^3 torch.matmul, median of 20 CUDA-event timings),
    used as the MFU denominator next to the 989 TFLOP/s H100 datasheet figure;
  * training steps (forward + backward + AdamW) on random tokens, as axolotl's QLoRA path would run
    them: attention projections as bnb `Linear4bit` (NF4, double quant), the fused expert tensors
    `gate_up_proj` / `down_proj` NF4 through `bitsandbytes.nn.parametrize.replace_parameter_4bit`,
    LoRA r=16 on q/k/v/o (optionally also PEFT `target_parameters` on the experts, whose real count
    of adapter parameters is reported), non-reentrant gradient checkpointing, fused AdamW;
  * tokens/s (median over the steps after `--warmup`), MFU, peak memory (allocator and driver view),
    per-step losses (about ln(vocab) = 11.9 at the start).

The result is written as JSON to `--out` and printed as the last stdout line. A CUDA out-of-memory
error is reported as `"oom": true` with exit status 0, so a micro-batch sweep can go on.

On the GPU machine (repository root; bitsandbytes carried in .device/py):
    PYTHONPATH=.device/py python3 launch/bench/seed_stack.py --mbs 1 --out $OUT/seed-mbs1.json
    PYTHONPATH=.device/py python3 launch/bench/seed_stack.py --matmul-only
CPU dry run at tiny sizes:
    python3 launch/bench/seed_stack.py --device cpu --tiny --seq 64 --mbs 2 --steps 3 --warmup 1
"""

import argparse
import gc
import json
import math
import statistics
import sys
import threading
import time

import torch

H100_BF16_DENSE_TFLOPS = 989.0

FULL_SHAPE = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
)
TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12, help="decoder layers (the real model has 48)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--mbs", type=int, default=1, help="micro-batch size: sequences per step")
    p.add_argument("--steps", type=int, default=8, help="training steps in total, warm-up included")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the steady-state median")
    p.add_argument("--expert-lora", action="store_true",
                   help="also pass PEFT target_parameters for the expert tensors and count what it adds")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="keep all activations (no gradient checkpointing)")
    p.add_argument("--out", help="path of the JSON result file")
    p.add_argument("--matmul-only", action="store_true", help="only measure the bf16 matmul rate")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run with --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU dry run")
    args = p.parse_args()
    if not args.matmul_only and args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device):
    """Median dense bf16 matmul rate in TFLOP/s (n=8192 on CUDA, 256 on CPU)."""
    n = 8192 if device.type == "cuda" else 256
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(5):
        torch.matmul(a, b)
    sync(device)
    times = []
    for _ in range(20):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def build_config(args):
    from transformers import Qwen3MoeConfig

    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    return Qwen3MoeConfig(
        **shape,
        num_hidden_layers=args.layers,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},  # transformers 5.x form of rope_theta
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,  # no router aux loss
        use_cache=False,
    )


def quantize_like_axolotl(model, device):
    """NF4 + double quant: attention projections as bnb Linear4bit, fused experts parametrized."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ATTN_PROJS:
            old = getattr(attn, name)
            new = bnb.nn.Linear4bit(
                old.in_features, old.out_features, bias=False,  # Qwen3 attention has no bias
                compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                quant_storage=torch.uint8, device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                old.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True,
                quant_storage=torch.uint8, module=new,
            ).to(device)  # Params4bit quantizes on its first move to a device
            setattr(attn, name, new)
        experts = layer.mlp.experts
        for name in EXPERT_PARAMS:
            replace_parameter_4bit(experts, name, compress_statistics=True, quant_type="nf4")
    # What transformers' bnb 4-bit loader sets; PEFT only wraps Linear4bit in its bnb LoRA layer with it.
    model.is_loaded_in_4bit = True
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flops_per_token(cfg, seq):
    """6 * active parameters (embedding excluded, norms left out) + the attention score and value
    matmuls (QK^T and PV, 2*S*nh*hd FLOPs each per token, no causal halving) in 3 passes."""
    # gpt-oss names the experts' count and width num_local_experts / intermediate_size.
    e = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    i = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    h, k = cfg.hidden_size, cfg.num_experts_per_tok
    nh, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = h * nh * hd + 2 * h * kv * hd + nh * hd * h + h * e + k * 3 * h * i
    n_active = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size
    attention = 3 * 2 * 2 * seq * nh * hd * cfg.num_hidden_layers
    return 6 * n_active + attention


def gb(n_bytes):
    return n_bytes / 1e9


def driver_used_gb(device):
    free, total = torch.cuda.mem_get_info(device)
    return gb(total - free)


def build(args, device, result):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    result["oom_phase"] = "build"
    cfg = build_config(args)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # Left as transformers picked them: grouped_mm experts when the class supports it, sdpa attention.
    result["experts_implementation"] = getattr(model.config, "_experts_implementation", None) or "default"
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None) or "default"
    quantize_like_axolotl(model, device)
    sync(device)
    result["load_s"] = time.perf_counter() - t0

    # peft.prepare_model_for_kbit_training is not called: it casts every bf16 parameter (embedding,
    # lm_head, norms, router) to fp32. Its other effects are reproduced here: freeze the base model
    # and enable gradient checkpointing. Its enable_input_require_grads() is only needed with
    # reentrant checkpointing; with use_reentrant=False it skips that too, and so does this script.
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    result["gradient_checkpointing"] = not args.no_checkpointing
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(ATTN_PROJS), bias="none",
        task_type="CAUSAL_LM",
        target_parameters=[f"mlp.experts.{n}" for n in EXPERT_PARAMS] if args.expert_lora else None,
    )
    model = get_peft_model(model, lora)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for _, p in trainable)
    result["expert_lora_params"] = sum(p.numel() for n, p in trainable if "experts" in n)
    result["trainable_dtypes"] = sorted({str(p.dtype) for _, p in trainable})
    if device.type == "cuda":
        result["model_alloc_gb"] = gb(torch.cuda.memory_allocated(device))
    model.train()
    return model, cfg


def run_steps(model, opt, gen, cfg, args, device, result):
    tokens = args.mbs * args.seq
    for step in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.mbs, args.seq), device=device, generator=gen)
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        result["step_s"].append(dt)
        result["tokens_per_s_all"].append(tokens / dt)
        result["losses"].append(loss.item())
        print(f"step {step}: {dt:.3f}s {tokens / dt:.0f} tok/s loss {result['losses'][-1]:.4f}",
              file=sys.stderr)


class DriverPeak:
    """Largest device memory in use (driver view: total - free) sampled every 50 ms from a
    background thread while training runs, so peaks inside a step count, not only the state
    between steps. The bf16 build before quantization is left out: a real checkpoint load
    quantizes tensor by tensor and never holds the whole bf16 model."""

    def __init__(self, device):
        self.device, self.peak, self.stop = device, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, driver_used_gb(self.device))
            self.stop.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, driver_used_gb(self.device))


def train(model, cfg, args, device, result):
    result["oom_phase"] = "train"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(1234)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        with DriverPeak(device) as sampler:
            try:
                run_steps(model, opt, gen, cfg, args, device, result)
            finally:
                result["peak_gpu_mem_gb_driver"] = sampler.peak
    else:
        run_steps(model, opt, gen, cfg, args, device, result)
    result["oom_phase"] = None

    tps = statistics.median(result["tokens_per_s_all"][args.warmup:])
    result["tokens_per_s"] = tps
    result["flops_per_token"] = flops_per_token(cfg, args.seq)
    achieved = tps * result["flops_per_token"]
    result["mfu_measured"] = achieved / (result["matmul_tflops"] * 1e12)
    result["mfu_989"] = achieved / (H100_BF16_DENSE_TFLOPS * 1e12)
    result["loss_ln_vocab"] = math.log(cfg.vocab_size)
    if device.type == "cuda":
        result["peak_alloc_gb"] = gb(torch.cuda.max_memory_allocated(device))
        result["peak_reserved_gb"] = gb(torch.cuda.max_memory_reserved(device))


def emit(result, out):
    line = json.dumps(result)
    if out:
        with open(out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    print(line, flush=True)


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    import bitsandbytes
    import peft
    import transformers

    result = {
        "stack": "seed",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "matmul_tflops": matmul_tflops(device),
    }
    if args.matmul_only:
        emit(result, args.out)
        return

    result.update(
        layers=args.layers, seq=args.seq, mbs=args.mbs, tokens_per_step=args.mbs * args.seq,
        steps=args.steps, warmup=args.warmup, tiny=args.tiny, expert_lora=args.expert_lora,
        experts_implementation=None, attn_implementation=None, trainable_params=None,
        expert_lora_params=None, tokens_per_s=None, tokens_per_s_all=[], step_s=[], losses=[],
        mfu_measured=None, mfu_989=None, peak_alloc_gb=None, peak_reserved_gb=None,
        peak_gpu_mem_gb_driver=None, model_alloc_gb=None, load_s=None, oom=False, oom_phase=None,
    )
    try:
        model, cfg = build(args, device, result)
        train(model, cfg, args, device, result)
    except torch.cuda.OutOfMemoryError as e:
        result["oom"] = True
        result["oom_message"] = str(e).splitlines()[0]
        print(f"out of memory during {result['oom_phase']}: {result['oom_message']}", file=sys.stderr)
    emit(result, args.out)


if __name__ == "__main__":
    main()
