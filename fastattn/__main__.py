"""fastattn command line: ``python -m fastattn {info,demo,bench}``."""
from __future__ import annotations

import argparse
import sys


def cmd_info(args=None) -> None:
    import platform

    import torch

    import fastattn

    print(f"fastattn {fastattn.__version__}  ({fastattn.__file__.rsplit('/', 2)[0]})")
    print(f"torch    {torch.__version__}  (CUDA runtime {torch.version.cuda or 'none'})")
    print(f"python   {platform.python_version()}  on {platform.machine()}, {torch.get_num_threads()} CPU threads")
    backends = ["cpu"] + (["cuda (archs: " + fastattn._C.CUDA_ARCHS + ")"] if fastattn.cuda_built() else [])
    print(f"kernels  {', '.join(backends)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device   cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB")
    else:
        print(f"device   cpu ({platform.processor() or platform.machine()}); no CUDA device visible")


def _best_device() -> str:
    import torch

    import fastattn

    return "cuda" if torch.cuda.is_available() and fastattn.cuda_built() else "cpu"


def _time(fn, device: str, iters: int = 10) -> float:
    import time

    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def demo_rms_norm(device: str) -> None:
    """RMSNorm parity and speed against torch on `device`."""
    import torch
    import torch.nn.functional as F

    import fastattn

    rows, n = (32768, 4096) if device == "cuda" else (4096, 4096)
    print(f"\nRMSNorm ({rows} x {n}) on {device}: parity against the fp32 reference and speed against torch")
    print(f"{'dtype':<10} {'max err':>10} {'torch err':>10} {'fastattn GB/s':>14} {'F.rms_norm GB/s':>16} {'speedup':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, n, device=device, dtype=dtype)
        w = torch.rand(n, device=device, dtype=dtype) + 0.5
        truth = fastattn.reference.rms_norm(x.float(), w.float(), 1e-6)
        ours = fastattn.rms_norm(x, w, 1e-6)
        theirs = F.rms_norm(x, (n,), w, 1e-6)
        t_ours = _time(lambda: fastattn.rms_norm(x, w, 1e-6), device)
        t_torch = _time(lambda: F.rms_norm(x, (n,), w, 1e-6), device)
        gb = 2 * x.numel() * x.element_size() / 1e9
        print(f"{str(dtype).replace('torch.', ''):<10} {(ours.float() - truth).abs().max().item():>10.2e} "
              f"{(theirs.float() - truth).abs().max().item():>10.2e} {gb / t_ours:>14.2f} {gb / t_torch:>16.2f} "
              f"{t_torch / t_ours:>7.2f}x")


def cmd_demo(args) -> None:
    cmd_info()
    demo_rms_norm(args.device or _best_device())


def cmd_bench(args) -> None:
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(root, "benchmarks")
    cmd = [sys.executable, os.path.join(bench_dir, "run.py")]
    if args.out:
        cmd += ["--out", args.out]
    if args.plot:
        cmd += ["--plot", args.plot]
    if args.filter:
        cmd += ["-k", args.filter]
    sys.exit(subprocess.call(cmd, cwd=root))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, compiled backends, device").set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="the main job: kernels vs torch on the best device")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="run the benchmark suite, print a table")
    p.add_argument("--out", help="results JSON path (default benchmarks/results/<device>-<date>.json)")
    p.add_argument("--plot", help="also draw a PNG plot here")
    p.add_argument("-k", dest="filter", help="pytest -k expression selecting benchmarks")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
