"""What a results file records about the run, so its numbers can be trusted and compared:
the commit (and whether the tree was dirty), the CPU (model, relevant ISA flags, threads,
last-level cache), the GPU, torch/CUDA/fastattn versions and the date.

Everything here works without pytest and without a source checkout (fields that cannot be
known are None), so `python -m fastattn bench` from an installed wheel records what it can.
"""
from __future__ import annotations

import datetime
import glob
import os
import platform
import re
import subprocess

# ISA flags (as /proc/cpuinfo spells them) that decide which CPU kernel paths run.
RELEVANT_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                      "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "sve", "neon",
                      "asimd")


def gemm_roof_tflops(gemm, dtype_name: str):
    """The compute roof an attention row of this dtype is read against ("% GEMM"), from a run's
    measured torch.mm rates (``gemm``: {"float32": {"tflops": ...}, "bfloat16": ...}): the
    faster of its own dtype's rate and float32's (fp32's alone for a dtype the run did not
    measure), or None. The faster one, because a kernel may widen 16-bit inputs to fp32 (as
    fastattn's CPU kernels do without AVX512-BF16), and on such a CPU torch.mm in bf16 runs
    hundreds of times below its fp32 rate: against that rate a bf16 row read as ~50000%."""
    rates = [r.get("tflops") for r in ((gemm or {}).get(dtype_name), (gemm or {}).get("float32"))
             if isinstance(r, dict)]
    rates = [t for t in rates if isinstance(t, (int, float)) and t > 0]
    return max(rates) if rates else None


def package_root() -> str:
    """The folder holding the imported fastattn package (a checkout root or site-packages)."""
    import fastattn

    return os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))


def source_checkout():
    """The root of the source checkout fastattn is imported from (editable install or
    PYTHONPATH), or None for an installed wheel."""
    root = package_root()
    if os.path.isdir(os.path.join(root, "benchmarks", "results")) and os.path.isfile(
            os.path.join(root, "pyproject.toml")):
        return root
    return None


def _git(args, cwd):
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_state(root=None):
    """(commit, dirty) of the checkout fastattn is imported from; (None, None) outside git
    (an installed wheel, or a source tree without .git). Untracked files count as dirty, except
    results files under benchmarks/results/ (the tooling writes those itself)."""
    root = root or source_checkout()
    if root is None:
        return None, None
    top = _git(["rev-parse", "--show-toplevel"], root)
    if top is None or os.path.realpath(top.strip()) != os.path.realpath(root):
        return None, None
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain"], root)
    if commit is None or status is None:
        return None, None
    changed = [ln for ln in status.splitlines() if ln.strip() and "benchmarks/results/" not in ln]
    return commit.strip(), bool(changed)


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" not in line:
                    if info:  # the first processor is enough
                        break
                    continue
                key, value = (s.strip() for s in line.split(":", 1))
                info.setdefault(key, value)
    except OSError:
        pass
    return info


def cpu_model():
    info = _cpuinfo()
    name = info.get("model name") or info.get("Model") or info.get("cpu model")
    if not name:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"^Model name:\s*(.+)$", out, re.M)
            name = m.group(1).strip() if m else None
        except (OSError, subprocess.SubprocessError):
            name = None
    return name or platform.processor() or platform.machine() or None


def all_cpu_flags():
    """Every ISA flag of this CPU as /proc/cpuinfo spells it (a frozenset), or None where they
    cannot be read."""
    info = _cpuinfo()
    flags = info.get("flags") or info.get("Features")
    return None if flags is None else frozenset(flags.split())


def cpu_flags():
    """The relevant ISA flags this CPU has (sorted), or None where they cannot be read."""
    have = all_cpu_flags()
    if have is None:
        return None
    return sorted(f for f in RELEVANT_CPU_FLAGS if f in have)


def _size_bytes(text: str):
    m = re.match(r"^\s*([\d.]+)\s*([KMG]?)i?B?\s*$", text, re.I)
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()])


def cpu_llc_bytes():
    """Size of the last-level cache seen by CPU 0 (the highest cache level in sysfs; on
    chips with several L3 slices, the slice CPU 0 shares), else from lscpu, else None."""
    best = None
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = _size_bytes(f.read())
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size is None:
            continue
        if best is None or level > best[0]:
            best = (level, size)
    if best is not None:
        return best[1]
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for key in ("L3 cache", "L2 cache"):
        m = re.search(rf"^{key}:\s*(\d+)", out, re.M)
        if m:
            return int(m.group(1))
    return None


def gpu_info():
    """(name, L2 bytes) of the current CUDA device, or (None, None)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None, None
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        return p.name, getattr(p, "L2_cache_size", None)
    except Exception:  # a broken driver must not stop a CPU benchmark
        return None, None


def collect(device: str) -> dict:
    """The metadata block of a results file ("fastattn" key), minus what the run adds
    (copy bandwidth)."""
    import torch

    import fastattn

    commit, dirty = git_state()
    gpu_name, gpu_l2 = gpu_info()
    llc = cpu_llc_bytes()
    isa = getattr(fastattn, "cpu_isa", None)  # the CPU kernels' instruction set, where reported
    try:
        isa = isa() if callable(isa) else isa
    except Exception:  # e.g. an extension built before cpu_isa existed: unknown, not fatal
        isa = None
    return {
        "device": device,
        "device_name": gpu_name if device == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_isa": isa,
        "cpu_threads": torch.get_num_threads(),
        "cpu_llc_bytes": llc,
        "gpu_model": gpu_name,
        "gpu_l2_bytes": gpu_l2,
        # the cache a working set must exceed for "% of copy" to mean DRAM/HBM bandwidth
        "llc_bytes": gpu_l2 if device == "cuda" else llc,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastattn": fastattn.__version__,
        "cuda_kernels_built": fastattn.cuda_built(),
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
