"""A/B timing of the two CUDA decode kernels on the shapes where the launcher's choice is
unmeasured or in question, for a GPU session: each side runs in its own process, with the
tensor-core decode_mma_kernel on (default) or off (FASTATTN_DECODE_MMA=0 sends every shape to
the CUDA-core decode_kernel, splits sized for it). Prints one line per shape: median time,
GB/s of K + V, and the ratio.

    python3 scripts/gpu_ab_decode.py            # on a GPU machine
    python3 scripts/gpu_ab_decode.py --tiny     # CPU plumbing check (both sides run the CPU kernel)

Shapes (bf16, D 128): multi-head B16 x 4k 32/32 (group 1, moved to the tensor cores without a
measurement), groups 2 and 4 at B64 x 4k, batch 1 x 64k GQA 32/8 and batch 64 x 4k MQA.
"""
import json
import os
import subprocess
import sys

SHAPES = [(16, 4096, 32, 32), (64, 4096, 32, 16), (64, 4096, 32, 8), (1, 65536, 32, 8), (64, 4096, 32, 1)]
TINY_SHAPES = [(2, 64, 4, 4), (2, 64, 4, 2)]

_CHILD = r"""
import json, sys, torch, fastattn
from fastattn.benchmarks.timing import time_calls
tiny = sys.argv[1] == "1"
dev = "cpu" if tiny else "cuda"
dtype = torch.float32 if tiny else torch.bfloat16
D = 32 if tiny else 128
res = {}
for B, S, H, Hk in json.loads(sys.argv[2]):
    kc = torch.randn(B, S, Hk, D, device=dev, dtype=dtype)
    vc = torch.randn(B, S, Hk, D, device=dev, dtype=dtype)
    q = torch.randn(B, H, D, device=dev, dtype=dtype)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    t = sorted(time_calls(lambda: fastattn.decode_attention(q, kc, vc, lens), dev, rounds=3 if tiny else 20))
    res[f"{B}x{S}x{H}/{Hk}"] = (t[len(t) // 2], kc.nbytes + vc.nbytes)
print(json.dumps(res))
"""


def run_side(mma_on: bool, tiny: bool) -> dict:
    env = dict(os.environ, FASTATTN_DECODE_MMA="1" if mma_on else "0")
    shapes = TINY_SHAPES if tiny else SHAPES
    r = subprocess.run([sys.executable, "-c", _CHILD, "1" if tiny else "0", json.dumps(shapes)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"gpu_ab_decode: the {'mma' if mma_on else 'no-mma'} side failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    tiny = "--tiny" in sys.argv[1:]
    on, off = run_side(True, tiny), run_side(False, tiny)
    print(f"{'shape B x S x H/Hk':24s} {'tensor cores':>22s} {'CUDA cores':>22s}  ratio (off / on time)")
    for key in on:
        (t_on, nbytes), (t_off, _) = on[key], off[key]
        print(f"{key:24s} {t_on * 1e3:9.3f} ms {nbytes / t_on / 1e9:7.0f} GB/s "
              f"{t_off * 1e3:9.3f} ms {nbytes / t_off / 1e9:7.0f} GB/s  {t_off / t_on:5.2f}x")


if __name__ == "__main__":
    main()
