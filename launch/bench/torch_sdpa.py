"""PyTorch's attention backends at the shape `moeq gpu-bench --attention B` measures (Qwen3-30B-A3B:
32 query heads on 4 kv heads of 128, 2,048 positions, causal, bf16): forward and backward times
and TFLOP/s per backend, counted as gpu-bench counts them (4·B·S²·H·D / 2 forward, 2.5× that
backward). GPU machine: python3 launch/bench/torch_sdpa.py [B ...]
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

S, H, KV, D = 2048, 32, 4, 128


def timed(f, iters=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main():
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    print("| rows | backend | forward ms | TFLOP/s | backward ms | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for b in [int(x) for x in sys.argv[1:]] or [4]:
        flops = 4 * b * S * S * H * D / 2
        q = torch.randn(b, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, KV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, KV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for name, backend in [("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
            try:
                with sdpa_kernel(backend):
                    # flash takes GQA as repeated kv heads; cuDNN natively
                    gqa = backend == SDPBackend.CUDNN_ATTENTION
                    kk = k if gqa else k.repeat_interleave(H // KV, 1).detach().requires_grad_()
                    vv = v if gqa else v.repeat_interleave(H // KV, 1).detach().requires_grad_()

                    def fwd():
                        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

                    g = torch.randn(b, H, S, D, device="cuda", dtype=torch.bfloat16)
                    tf = timed(fwd)
                    tb = timed(lambda: fwd().backward(g)) - tf
                    print(f"| {b} | {name} | {tf * 1e3:.3f} | {flops / tf / 1e12:.0f} | {tb * 1e3:.3f} | {2.5 * flops / tb / 1e12:.0f} |")
            except RuntimeError as e:
                print(f"| {b} | {name} | failed: {str(e)[:120]} | | | |")


if __name__ == "__main__":
    main()
