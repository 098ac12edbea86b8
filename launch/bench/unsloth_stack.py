#!/usr/bin/env python3
"""Unsloth on the side-by-side benchmark's shape: QLoRA training speed and peak memory of
Unsloth's FastLanguageModel on a Qwen3-30B-A3B-shaped MoE (random weights, the checkpoint written
by `--write-model`), with the seed stack's FLOP count and matmul yardstick (seed_stack.py).

  --write-model DIR   builds the model of DIR/config.json (from `moeq synth --config-only`, which
                      also writes the tokenizer) with transformers on the GPU, random bf16 weights,
                      and saves it into DIR; run once per machine.
  otherwise           loads DIR with `FastLanguageModel.from_pretrained(load_in_4bit=True)`
                      (NF4, double quant), adds LoRA r16 α32 with use_gradient_checkpointing=
                      "unsloth" on q/k/v/o (`--targets attn`) or q/k/v/o + the experts' gate/up/down
                      (`--targets expert`), and trains on random tokens with fused AdamW for each
                      micro-batch size of `--mbs` in turn (one load per process: Unsloth's import
                      takes ~35 s). Each size's peak is the driver's (total − free, sampled every
                      50 ms during its steps), after the allocator's cache was emptied; one JSON
                      file per size: OUTDIR/unsloth-{targets}-lora-mbs{N}.json.

On the GPU machine (repository root, PYTHONPATH holding the unpacked .device/unsloth.tar.xz):
    HF_HUB_OFFLINE=1 python3 launch/bench/unsloth_stack.py --model /tmp/u --write-model
    HF_HUB_OFFLINE=1 python3 launch/bench/unsloth_stack.py --model /tmp/u --targets attn --mbs 1 4 8 --outdir $OUT
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + tokenizer)")
    p.add_argument("--write-model", action="store_true", help="write random weights into --model")
    p.add_argument("--targets", choices=["attn", "expert"], default="attn")
    p.add_argument("--mbs", type=int, nargs="+", default=[1])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--outdir", default=".")
    return p.parse_args()


def write_model(path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main():
    args = parse_args()
    if args.write_model:
        write_model(args.model)
        return
    import unsloth  # before transformers, as Unsloth requires
    from unsloth import FastLanguageModel

    import torch
    import transformers
    from seed_stack import DriverPeak, emit, flops_per_token, matmul_tflops

    device = torch.device("cuda", torch.cuda.current_device())
    t0 = time.perf_counter()
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True,
        local_files_only=True,
    )
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    targets = attn + (["gate_proj", "up_proj", "down_proj"] if args.targets == "expert" else [])
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, bias="none",
        use_gradient_checkpointing="unsloth", random_state=0,
    )
    load_s = time.perf_counter() - t0
    cfg = model.config
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "experts" in n)
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    gen = torch.Generator(device=device).manual_seed(1234)
    rate = matmul_tflops(device)
    model.train()
    for mbs in args.mbs:
        result = {
            "stack": "unsloth",
            "versions": {"unsloth": unsloth.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "gpu": torch.cuda.get_device_name(device), "matmul_tflops": rate,
            "layers": cfg.num_hidden_layers, "seq": args.seq, "mbs": mbs,
            "tokens_per_step": mbs * args.seq, "targets": args.targets,
            "trainable_params": trainable, "expert_lora_params": expert_params,
            "load_s": load_s, "tokens_per_s_all": [], "step_s": [], "losses": [], "oom": False,
        }
        torch.cuda.empty_cache()
        tokens = mbs * args.seq
        try:
            with DriverPeak(device) as sampler:
                try:
                    for step in range(args.steps):
                        ids = torch.randint(0, cfg.vocab_size, (mbs, args.seq), device=device, generator=gen)
                        torch.cuda.synchronize(device)
                        t = time.perf_counter()
                        loss = model(input_ids=ids, labels=ids).loss
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        torch.cuda.synchronize(device)
                        dt = time.perf_counter() - t
                        result["step_s"].append(dt)
                        result["tokens_per_s_all"].append(tokens / dt)
                        result["losses"].append(loss.item())
                        print(f"mbs {mbs} step {step}: {dt:.3f}s {tokens / dt:.0f} tok/s loss "
                              f"{result['losses'][-1]:.4f}", file=sys.stderr)
                finally:
                    result["peak_gpu_mem_gb_driver"] = sampler.peak
        except torch.cuda.OutOfMemoryError as e:
            result["oom"] = True
            result["oom_message"] = str(e).splitlines()[0]
        if not result["oom"]:
            tps = statistics.median(result["tokens_per_s_all"][args.warmup:])
            result["tokens_per_s"] = tps
            result["flops_per_token"] = flops_per_token(cfg, args.seq)
            result["mfu_measured"] = tps * result["flops_per_token"] / (rate * 1e12)
        emit(result, os.path.join(args.outdir, f"unsloth-{args.targets}-lora-mbs{mbs}.json"))
        opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
