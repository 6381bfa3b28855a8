"""Build fastattn._C (and, on x86-64 Linux, the CPU kernel tier libraries).

CPU kernels and bindings always; CUDA kernels too when torch has CUDA and nvcc is found.
Build against the torch you will run with (pip's build isolation would fetch another one):
    pip install --no-build-isolation .        or        pip install --no-build-isolation -e .
    python setup.py build_ext --inplace       (what scripts/setup.sh falls back to)

Environment:
  FASTATTN_CUDA_ARCHS  ';'-separated arch list, e.g. "8.0;9.0a" (default: the visible GPU's
                       arch, else "8.0;9.0a"). "9.0a" enables the sm_90a-specific features.
  FASTATTN_FORCE_CPU=1 build the CPU kernels only, even with a CUDA toolchain.
  FASTATTN_CPU_MARCH   how the CPU kernels are compiled:
                         portable (default) -- a wheel that runs on any x86-64 machine: _C
                           holds baseline kernels (-march=x86-64, no AVX), and two tier
                           libraries hold the same kernels built for x86-64-v3 (AVX2/FMA/F16C:
                           fastattn/_cpu_avx2*.so) and x86-64-v4 (AVX-512 F/BW/CD/DQ/VL:
                           fastattn/_cpu_avx512*.so). At run time _C loads the best tier the
                           CPU supports (csrc/cpu/dispatch.cpp); FASTATTN_CPU_ISA=baseline|avx2|
                           avx512 overrides that choice (capped at what the CPU supports), and
                           fastattn.cpu_isa() says which tier is in use. On hosts other than
                           x86-64 Linux only the baseline is built, with the compiler's default
                           target.
                         native -- developer option: _C's kernels with -march=native, no tier
                           libraries (cpu_isa() == "native"). The result may not run on
                           another machine.
                         anything else -- used as -march= for _C, no tier libraries
                           (cpu_isa() == "custom").
  MAX_JOBS             parallel compile jobs (honoured by torch's ninja build).
  FASTATTN_SAN_FLAGS   developer option: extra compile (and, for -f[no-]sanitize*, link) flags
                       for every CPU library, e.g. "-fsanitize=address,undefined -fno-wrapv
                       -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g" (-fno-wrapv
                       overrides Python's -fwrapv, which would hide signed overflow). Under
                       ASan the CPU scratch buffers are exact-size allocations (cpu_scratch.h).
                       Run with LD_PRELOAD="$(gcc -print-file-name=libasan.so)
                       $(gcc -print-file-name=libstdc++.so.6)" ASAN_OPTIONS=detect_leaks=0.

Incremental builds: every way of building (build_ext --inplace, pip install [-e] .) compiles
into one persistent folder per configuration, build/fastattn-<python>-<torch>-<config hash>/,
with one ninja build per extension, so a rebuild recompiles only what changed and a rebuild
with no change takes seconds. The config hash covers the python and torch versions, the
compiler, the flags, CUDA and its archs: switching FASTATTN_CPU_MARCH, FASTATTN_FORCE_CPU,
FASTATTN_CUDA_ARCHS or torch never reuses another configuration's objects, and switching back
finds the old objects again. Each compiled unit prints one line, e.g.
    [3/7] csrc/cpu/flash_fwd.cpp (avx2)
"""
import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    # pip's default build isolation lands here (pyproject.toml does not list torch, on purpose:
    # it would fetch a multi-GB wheel that is not the torch fastattn will run with).
    sys.exit(
        "fastattn: torch is not importable here; fastattn compiles against the torch you run, so "
        "build without pip's isolated environment: pip install --no-build-isolation . "
        "(install torch first if you have none, e.g. pip install torch==2.13.0)"
    )

from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_archs():
    env = os.environ.get("FASTATTN_CUDA_ARCHS")
    if env:
        return [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}.{minor}a" if major >= 9 else f"{major}.{minor}"]
    return ["8.0", "9.0a"]


def _gencode(arch):
    # "9.0a" -> arch=compute_90a,code=sm_90a; "8.0" also embeds its PTX (code=compute_80), which
    # the driver compiles for GPUs of a newer major with no code of their own here (sm_100 /
    # sm_120 from the default no-GPU build; sm_86 / sm_89 run the sm_80 code as it is): they run
    # instead of failing with "no kernel image is available".
    num = arch.replace(".", "")
    if num == "80":
        return f"-gencode=arch=compute_{num},code=[sm_{num},compute_{num}]"
    return f"-gencode=arch=compute_{num},code=sm_{num}"


with_cuda = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("FASTATTN_FORCE_CPU", "0") != "1"
)

# ---- CPU instruction-set tiers ------------------------------------------------------------
# (name, -march flags, tier id of csrc/include/fastattn/cpu_dispatch.h). A later avx512bf16 /
# amx tier (issue 17) is one more row here plus its row in dispatch.cpp.
CPU_TIERS = [
    ("avx2", ["-march=x86-64-v3"], 1),
    ("avx512", ["-march=x86-64-v4"], 2),
]
is_x86_linux = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
march = os.environ.get("FASTATTN_CPU_MARCH", "portable").strip() or "portable"
if march == "portable":
    # -march=x86-64 explicitly: some distributions' compilers default to x86-64-v2 or higher.
    c_march = ["-march=x86-64", "-mtune=generic"] if is_x86_linux else []
    cpu_mode, tiers, c_label = 0, (CPU_TIERS if is_x86_linux else []), "baseline"
elif march == "native":
    c_march, cpu_mode, tiers, c_label = ["-march=native"], 1, [], "native"
else:
    c_march, cpu_mode, tiers, c_label = [f"-march={march}"], 2, [], march

# -fopenmp: ATen's at::parallel_for is an inline OpenMP region in torch's headers; without
# it the region compiles to a serial loop and every CPU kernel runs on one thread. The
# libgomp.so.1 linked here is the one libtorch_cpu has already loaded (same soname), so
# torch.set_num_threads governs our kernels too.
# -Wno-psabi: decode.cpp's GCC vector types are wider than a baseline/AVX2 register; GCC
# notes the (irrelevant: internal functions only) ABI difference once per build otherwise.
# link_flags: the SHARED libstdc++, named explicitly. On the H200 image (Ubuntu Python 3.12,
# torch 2.11, CUDA build) _C came out with libstdc++ linked in statically (no libstdc++.so.6 in
# its NEEDED list, 734 locale/ostream symbols defined in it: what an image without the
# libstdc++.so dev symlink but with libstdc++.a gives). Under the -Wl,-Bsymbolic-functions of
# Ubuntu's LDCXXSHARED its functions bound to that private copy while the facet ids (unique
# data) bound to torch's libstdc++.so.6, and the first C++ error message that streamed an
# integer segfaulted. The full path of libstdc++.so.6 (from the compiler driver), placed before
# the driver's own libraries, resolves every libstdc++ symbol from the shared library, so no
# archive member is pulled in; -lstdc++ where the driver does not know the file.
# tests/test_build.py checks the NEEDED entry.
def _shared_libstdcxx() -> str:
    cxx = (os.environ.get("CXX") or "c++").split()
    try:
        path = subprocess.run(cxx + ["-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        path = ""
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else "-lstdc++"


link_flags = ["-fopenmp", _shared_libstdcxx()] if sys.platform.startswith("linux") else ["-fopenmp"]
common_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-psabi"]
_san_flags = os.environ.get("FASTATTN_SAN_FLAGS", "").split()
common_flags += _san_flags
link_flags += [f for f in _san_flags if f.startswith(("-fsanitize", "-fno-sanitize"))]
cxx_flags = common_flags + c_march + [f"-DFASTATTN_CPU_MODE={cpu_mode}"]
include_dirs = [os.path.join(ROOT, "csrc", "include")]
cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
# Only _C dispatches; the tier libraries hold kernels and their table.
tier_sources = [s for s in cpu_sources if os.path.basename(s) != "dispatch.cpp"]
bindings = _rel(glob.glob(os.path.join(ROOT, "csrc", "bindings", "*.cpp")))
if not with_cuda:
    bindings = [b for b in bindings if not b.endswith("register_cuda.cpp")]
sources = cpu_sources + bindings
# setuptools skips an extension whose output is newer than its sources and `depends`: list
# every header so a header-only change reaches ninja (which then recompiles only the units
# that include it, from the compiler's dependency files).
headers = _rel(
    [p for pat in ("*.h", "*.cuh") for p in glob.glob(os.path.join(ROOT, "csrc", "**", pat), recursive=True)]
) + ["setup.py"]

exts = []
if with_cuda:
    archs = _cuda_archs()
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    defines = ["-DFASTATTN_WITH_CUDA", f'-DFASTATTN_CUDA_ARCHS="{";".join(archs)}"']
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-DFASTATTN_WITH_CUDA",
    ] + [_gencode(a) for a in archs]
    exts.append(CUDAExtension(
        "fastattn._C",
        sources,
        include_dirs=include_dirs,
        depends=headers,
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    ))
else:
    archs = []
    exts.append(CppExtension(
        "fastattn._C",
        sources,
        include_dirs=include_dirs,
        depends=headers,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    ))

# One library per tier: the same kernel sources with the tier's -march, every symbol hidden
# but the table (see csrc/include/fastattn/cpu_dispatch.h for why they are separate .so files).
ext_labels = {"fastattn._C": c_label}
TIER_EXPORTS = os.path.join(ROOT, "csrc", "cpu", "tier_exports.map")
for name, flags, tier_id in tiers:
    exts.append(CppExtension(
        f"fastattn._cpu_{name}",
        tier_sources,
        include_dirs=include_dirs,
        depends=headers + [os.path.relpath(TIER_EXPORTS, ROOT)],
        extra_compile_args={"cxx": common_flags + flags + [
            "-fvisibility=hidden", "-fvisibility-inlines-hidden",
            f"-DFASTATTN_CPU_TIER_ID={tier_id}", "-DFASTATTN_CPU_TIER_LIBRARY"]},
        extra_link_args=link_flags + [f"-Wl,--version-script={TIER_EXPORTS}"],
    ))
    ext_labels[f"fastattn._cpu_{name}"] = name

# ---- persistent, per-configuration build folder -------------------------------------------
_config = {
    "python": sys.version,
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda if with_cuda else None,
    "cuda_home": CUDA_HOME if with_cuda else None,
    "cuda_archs": archs,
    "cxx": os.environ.get("CXX", ""),
    "cc": os.environ.get("CC", ""),
    "cflags": os.environ.get("CFLAGS", "") + "|" + os.environ.get("CXXFLAGS", ""),
    "exts": [(e.name, e.extra_compile_args) for e in exts],
}
_config_hash = hashlib.sha256(json.dumps(_config, sort_keys=True, default=str).encode()).hexdigest()[:10]
_torch_tag = torch.__version__.split("+")[0] + ("-cu" + torch.version.cuda.replace(".", "") if with_cuda else "-cpu")
BUILD_DIR = os.path.join(
    ROOT, "build", f"fastattn-py{sys.version_info[0]}{sys.version_info[1]}-torch{_torch_tag}-{_config_hash}"
)
# Which configuration produced each built library (path -> config hash): an output built by
# another configuration is rebuilt even when it is newer than every source.
_OUTPUTS_FILE = os.path.join(ROOT, "build", "fastattn-outputs.json")


def _load_outputs():
    try:
        with open(_OUTPUTS_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _say(msg):
    print(f"fastattn: {msg}", flush=True)


# ---- one progress line per compiled unit --------------------------------------------------
# torch runs `ninja -v`, which prints every full compiler command line. This runs ninja
# without -v and turns each finished unit into "[3/7] csrc/cpu/flash_fwd.cpp (avx2)";
# everything else ninja prints (compiler diagnostics, the failing command) passes through.
_dir_labels = {}
_dir_names = {}
_STATUS = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")


def _run_ninja_build(build_directory, verbose, error_prefix):
    label = _dir_labels.get(os.path.abspath(build_directory), "")
    command = ["ninja"]
    jobs = cpp_extension._get_num_workers(False)
    if jobs is not None:
        command += ["-j", str(jobs)]
    env = dict(os.environ, NINJA_STATUS="[%f/%t] ")
    sys.stdout.flush()
    proc = subprocess.Popen(command, cwd=build_directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True, errors="replace")
    for line in proc.stdout:
        m = _STATUS.match(line)
        if m:
            src = re.search(r"\s-c\s+(\S+\.(?:cpp|cxx|cc|c|cu))\s", m.group(3) + " ")
            what = os.path.relpath(src.group(1).strip("'\""), ROOT) if src else m.group(3).split()[0]
            tag = "cuda" if what.endswith(".cu") else label
            print(f"[{m.group(1)}/{m.group(2)}] {what} ({tag})", flush=True)
        elif line.startswith("ninja: no work to do"):
            continue
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(error_prefix)
    # Also ends, for scripts/setup.sh, the part of the output that is the compiler's.
    _say(f"{_dir_names.get(os.path.abspath(build_directory), build_directory)}: objects ready")


cpp_extension._run_ninja_build = _run_ninja_build


class FastattnBuildExt(BuildExtension.with_options(use_ninja=True)):
    def build_extensions(self):
        cuda_note = f"CUDA kernels for {';'.join(archs)}" if with_cuda else "CPU kernels only"
        tier_note = (
            "portable: baseline in _C + tiers " + ", ".join(t[0] for t in tiers)
            if cpu_mode == 0 else f"-march={march}, no tiers"
        )
        _say(f"building against torch {torch.__version__} ({cuda_note}); CPU kernels {tier_note}")
        _say(f"build folder {os.path.relpath(BUILD_DIR, ROOT)} (MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")
        self._outputs = _load_outputs()
        super().build_extensions()
        os.makedirs(os.path.dirname(_OUTPUTS_FILE), exist_ok=True)
        outputs = {p: h for p, h in self._outputs.items() if os.path.exists(p)}  # drop temp dirs' entries
        with open(_OUTPUTS_FILE, "w") as f:
            json.dump(outputs, f, indent=1, sort_keys=True)

    def build_extension(self, ext):
        # Each extension gets its own folder (and ninja file): the tiers compile the same
        # sources into same-named objects.
        self.build_temp = os.path.join(BUILD_DIR, ext.name)
        os.makedirs(self.build_temp, exist_ok=True)
        _dir_labels[os.path.abspath(self.build_temp)] = ext_labels.get(ext.name, "")
        _dir_names[os.path.abspath(self.build_temp)] = ext.name
        ext_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        try:
            from setuptools._distutils._modified import newer_group
        except ImportError:  # older setuptools
            from distutils.dep_util import newer_group

        # An output built by another configuration is relinked from this one's objects even
        # when it is newer than every source (setuptools and the linker only compare times).
        other_config = self._outputs.get(ext_path) != _config_hash
        force, compiler_force = self.force, self.compiler.force
        if other_config:
            self.force = self.compiler.force = True
        try:
            if not self.force and os.path.exists(ext_path) and not newer_group(
                list(ext.sources) + list(ext.depends), ext_path, "newer"
            ):
                _say(f"{ext.name}: up to date")
            else:
                _say(f"{ext.name}: compiling ({ext_labels.get(ext.name, '')})")
            super().build_extension(ext)
        finally:
            self.force, self.compiler.force = force, compiler_force
        self._outputs[ext_path] = _config_hash




def _torch_requirement() -> str:
    """The torch releases this build runs with: the compiled extension links against
    libtorch's C++ ABI, which changes between minor releases (2.13 -> 2.14) but not between
    patch releases. So a wheel says what it was built against, and pip keeps a matching torch
    instead of letting an unrelated one in."""
    public = torch.__version__.split("+")[0]  # "2.13.0" (or "2.11.0a0" for a pre-release)
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", public).groups())
    return f"torch>={public},<{major}.{minor + 1}"


setup(
    name="fastattn",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=exts,
    cmdclass={"build_ext": FastattnBuildExt},
    install_requires=["numpy", _torch_requirement()],
)
