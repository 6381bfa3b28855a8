"""One launch of each headline benchmark shape, for Nsight Compute on a GPU session.

scripts/gpu_check.sh's ncu step profiles scripts/gpu_sweep.py --paths: every kernel path at
tiny sizes, which shows launch geometry and code-level stalls but not how a kernel behaves
at the sizes the benchmarks time. This script launches the benchmark shapes instead, once
each (ncu replays a kernel as often as its sections need), e.g.

    ncu --clock-control none --kernel-name regex:'rms_norm|rotary|decode|flash' \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --csv --page details --log-file ncu_shapes.csv python3 scripts/gpu_profile_shapes.py

    python3 scripts/gpu_profile_shapes.py [rope] [decode] [rms] [fwd] [bwd]   (default: all)

Shapes (bf16): RoPE B4 S4096 H32/8 D128 out of place then in place; decode B64 S4096 H32/8,
B64 S4096 H32/1 and B1 S65536 H32/8 at D128; rms_norm 32768 x 4096; flash forward 2 x 8192 x
16 x 128 full and causal; flash backward of the full one. Without a GPU it runs the same calls
at tiny sizes in fp32 on the CPU (a plumbing check).
"""
import sys

import torch

import fastattn


def main(which):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = dev == "cpu"
    dtype = torch.bfloat16 if not tiny else torch.float32

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype)

    if "rope" in which:
        B, S, H, Hk, D = (4, 4096, 32, 8, 128) if not tiny else (1, 64, 4, 2, 32)
        q, k = randn(B, S, H, D), randn(B, S, Hk, D)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D))
        freqs = torch.outer(torch.arange(S, dtype=torch.float32, device=dev), inv_freq)
        positions = torch.arange(S, device=dev).expand(B, S)
        for inplace in (False, True):
            fastattn.apply_rotary(q, k, freqs.cos(), freqs.sin(), positions=positions, inplace=inplace)
    if "decode" in which:
        shapes = [(64, 4096, 32, 8), (64, 4096, 32, 1), (1, 65536, 32, 8)] if not tiny else [(2, 64, 4, 2)]
        D = 128 if not tiny else 64
        for B, S, H, Hk in shapes:
            k_cache, v_cache, q = randn(B, S, Hk, D), randn(B, S, Hk, D), randn(B, H, D)
            fastattn.decode_attention(q, k_cache, v_cache, torch.full((B,), S, dtype=torch.int32, device=dev))
    if "rms" in which:
        x = randn(32768, 4096) if not tiny else randn(64, 256)
        fastattn.rms_norm(x, torch.ones(x.shape[-1], device=dev, dtype=dtype), eps=1e-6)
    if "fwd" in which or "bwd" in which:
        B, S, H, D = (2, 8192, 16, 128) if not tiny else (1, 64, 2, 32)
        q, k, v = (randn(B, S, H, D).requires_grad_("bwd" in which) for _ in range(3))
        for causal in (False, True):
            out = fastattn.flash_attention(q, k, v, causal=causal)
            if "bwd" in which and not causal:
                out.sum().backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    print("gpu_profile_shapes: done on", dev)


if __name__ == "__main__":
    main(sys.argv[1:] or ["rope", "decode", "rms", "fwd", "bwd"])
