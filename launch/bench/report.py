#!/usr/bin/env python3
"""Turns the results of launch/bench/side-by-side.sh (a runs/ folder) into the markdown table of
BENCHMARKS.md: tokens/s (median over the steps after the warm-up), MFU against the bf16 matmul
rate measured in the same command (and against 989 TFLOP/s), and peak GPU memory as the driver
saw it (total − free), for the three stacks with one FLOP count. moeq: nvidia-smi every 100 ms over
the whole run (load and quantization included) minus the idle baseline; seed stack and Unsloth:
sampled every 50 ms by the script during training only (Unsloth: per micro-batch size, after
emptying the allocator's cache) (its bf16 random init before quantization is an
artifact of the benchmark: a checkpoint load quantizes tensor by tensor).

    python3 launch/bench/report.py RUNS_DIR
"""

import glob
import json
import os
import re
import statistics
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seed_stack import FULL_SHAPE, flops_per_token  # noqa: E402  (one FLOP count for both)

WARMUP = 3
PEAK_TFLOPS = 989.0


def peak_mib(path, idle):
    try:
        vals = [int(v) for v in open(path).read().split() if v.strip().isdigit()]
    except OSError:
        return None
    return (max(vals) - idle) if vals else None


def mib_to_gb(mib):
    return None if mib is None else mib * 1.048576 / 1e3


def moeq_row(path):
    recs = [json.loads(line) for line in open(path) if line.strip()]
    steps = [r for r in recs if r.get("step", 0) > WARMUP and "tokens_per_s" in r]
    if not steps:
        return None
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "tokens_per_step": statistics.median(r.get("tokens", 0) for r in steps) or None,
        "own_peak_gb": max((r.get("peak_gpu_mem_gb") or 0) for r in recs),
        "losses": [round(r["loss"], 3) for r in recs],
        "steps": len(recs),
    }


def load_line(log):
    """moeq's summary of loading the frozen base ("frozen base: ... in N s"), if it got there."""
    try:
        lines = [ln for ln in open(log) if "frozen base:" in ln]
    except OSError:
        return None
    return lines[-1].split("INFO", 1)[-1].strip() if lines else None


def main():
    runs = sys.argv[1]
    matmul = json.load(open(os.path.join(runs, "matmul.json")))["matmul_tflops"]
    idle = int(open(os.path.join(runs, "idle.mem")).read().split()[0])
    gpu = open(os.path.join(runs, "gpu.txt")).read().strip()
    date = open(os.path.join(runs, "date.txt")).read().strip()
    seq = 2048
    for layers, prefix in ((12, "moeq"), (48, "moeq48")):
        table(runs, matmul, idle, gpu, date, layers, seq, prefix)


def table(runs, matmul, idle, gpu, date, layers, seq, prefix):
    fpt = flops_per_token(SimpleNamespace(**FULL_SHAPE, num_hidden_layers=layers), seq)
    rows = []
    loads = []
    seeds = sorted(glob.glob(os.path.join(runs, "seed-*mbs*.json"))) if layers == 12 else []
    for path in seeds:
        r = json.load(open(path))
        name = os.path.basename(path)[: -len(".json")]
        rows.append(dict(
            run=f"seed stack, LoRA q/k/v/o (experts: {r.get('experts_implementation')})"
                + ("" if r.get("gradient_checkpointing", True) else ", no checkpointing"),
            mbs=r["mbs"], tokens_per_step=r["tokens_per_step"], oom=r.get("oom"),
            tokens_per_s=r.get("tokens_per_s"),
            peak_gb=r.get("peak_gpu_mem_gb_driver"),
            own=f"reserved {r['peak_reserved_gb']:.2f} GB" if r.get("peak_reserved_gb") else "",
            losses=[round(v, 3) for v in r.get("losses", [])],
        ))
    for path in sorted(glob.glob(os.path.join(runs, "unsloth-*-lora-mbs*.json"))) if layers == 12 else []:
        r = json.load(open(path))
        targets = "q/k/v/o" if r.get("targets") == "attn" else "q/k/v/o + experts"
        rows.append(dict(
            run=f"Unsloth {r['versions']['unsloth']}, LoRA {targets}",
            mbs=r["mbs"], tokens_per_step=r["tokens_per_step"], oom=r.get("oom"),
            tokens_per_s=r.get("tokens_per_s"), peak_gb=r.get("peak_gpu_mem_gb_driver"),
            own="driver peak during its steps", losses=[round(v, 3) for v in r.get("losses", [])],
        ))
    for path in sorted(glob.glob(os.path.join(runs, f"{prefix}-*-mbs*.jsonl"))):
        name = os.path.basename(path)[: -len(".jsonl")]
        m = re.match(prefix + r"-(.*)-mbs(\d+)", name)
        line = load_line(os.path.join(runs, name + ".log"))
        if line:
            loads.append(f"{name}: {line}")
        r = moeq_row(path)
        targets = "q/k/v/o" if m.group(1).startswith("attn-lora") else "q/k/v/o + experts"
        if m.group(1).endswith("-keep"):
            targets += ", no recompute"
        rows.append(dict(
            run=f"moeq, LoRA {targets}", mbs=int(m.group(2)),
            tokens_per_step=r and r["tokens_per_step"], oom=r is None,
            tokens_per_s=r and r["tokens_per_s"],
            peak_gb=mib_to_gb(peak_mib(os.path.join(runs, name + ".mem"), idle)),
            own=f"sampled per step {r['own_peak_gb']:.2f} GB" if r else "",
            losses=r["losses"] if r else [],
        ))
    if not rows:
        return
    print(f"{gpu}, {date}; bf16 matmul 8192³ measured {matmul:.0f} TFLOP/s; "
          f"{layers} layers, sequence {seq}, {fpt / 1e9:.2f} GFLOP/token\n")
    print("| run | micro-batch | tokens/step | tokens/s | MFU (measured peak) | MFU (989) "
          "| peak GPU memory (driver, GB) | own peak figure | losses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["mbs"], r["run"])):
        if r["oom"] or not r["tokens_per_s"]:
            print(f"| {r['run']} | {r['mbs']} | - | failed / out of memory | - | - | "
                  f"{r['peak_gb'] or 0:.2f} | {r['own']} | - |")
            continue
        tps = r["tokens_per_s"]
        mem = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
        print(f"| {r['run']} | {r['mbs']} | {r['tokens_per_step']:.0f} | {tps:,.0f} | "
              f"{tps * fpt / (matmul * 1e12):.2%} | {tps * fpt / (PEAK_TFLOPS * 1e12):.2%} | "
              f"{mem} | {r['own']} | {r['losses'][0]} → {r['losses'][-1]} |")
    print()
    for line in loads:
        print(f"- {line}")
    print()


if __name__ == "__main__":
    main()
