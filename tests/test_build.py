"""The built extension libraries themselves: how they are linked.

Every fastattn library must load libstdc++ as the shared libstdc++.so.6 that torch uses. A
private static copy (seen on an H200 image: Ubuntu Python 3.12, torch 2.11, CUDA build) is
used for some symbols and not others under Ubuntu's -Wl,-Bsymbolic-functions, and the first
C++ error message that streams an integer then segfaults instead of raising ValueError."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastattn

LIBS = sorted(glob.glob(os.path.join(os.path.dirname(fastattn.__file__), "_*.so")))


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and readelf (binutils)")
@pytest.mark.parametrize("lib", LIBS, ids=os.path.basename)
def test_links_shared_libstdcxx(lib):
    dynamic = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(n.startswith("libstdc++.so") for n in needed), f"{lib}: NEEDED {needed}, no shared libstdc++"
    symbols = subprocess.run(["readelf", "-sW", "--dyn-syms", lib], capture_output=True, text=True).stdout
    # a static libstdc++ brings its locale machinery along (codecvt, num_put, ...) as definitions
    defined = [line for line in symbols.splitlines() if "codecvt" in line and " UND " not in line]
    assert not defined, f"{lib}: defines libstdc++'s codecvt itself (a static libstdc++?): {defined[:2]}"


def test_cpp_error_with_integer_message_raises():
    # The message streams integers (x.size(-1)) and an IntArrayRef: the path that crashed.
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        torch.ops.fastattn.rms_norm_fwd(torch.randn(4, 8), torch.randn(7), 1e-6)


def test_found_libraries():
    assert any(os.path.basename(p).startswith("_C.") for p in LIBS), LIBS


def test_unbuilt_checkout_shadowing_an_install_says_so(tmp_path, monkeypatch):
    # `pip install .` then a command run from the checkout's root imports the checkout's unbuilt
    # fastattn/ (the current directory comes first on sys.path): the error says that, instead of
    # asking for another build.
    import importlib.metadata
    import importlib.util

    checkout, installed = tmp_path / "checkout", tmp_path / "site-packages"
    (checkout / "csrc").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    (checkout / "fastattn").mkdir()
    (installed / "fastattn").mkdir(parents=True)
    loader_src = os.path.join(os.path.dirname(fastattn.__file__), "_C_loader.py")
    shutil.copy(loader_src, checkout / "fastattn" / "_C_loader.py")
    spec = importlib.util.spec_from_file_location("checkout_loader", checkout / "fastattn" / "_C_loader.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)

    class Dist:
        def __init__(self, root):
            self.root = root

        def locate_file(self, name):
            return self.root / name

    monkeypatch.setattr(importlib.metadata, "distributions", lambda name: [Dist(installed)])
    hint = loader._shadow_hint()
    assert hint is not None and str(checkout / "fastattn") in hint and str(installed / "fastattn") in hint
    assert "outside the checkout" in hint
    # the build's fastattn.egg-info in the checkout's root is found first from there (newcomer
    # audit: the hint stayed silent then): the installed copy after it is still named
    monkeypatch.setattr(importlib.metadata, "distributions", lambda name: [Dist(checkout), Dist(installed)])
    hint = loader._shadow_hint()
    assert hint is not None and str(installed / "fastattn") in hint
    # the installed package is this checkout itself (an editable install), or none: the build hint
    monkeypatch.setattr(importlib.metadata, "distributions", lambda name: [Dist(checkout)])
    assert loader._shadow_hint() is None
    monkeypatch.setattr(importlib.metadata, "distributions", lambda name: [])
    assert loader._shadow_hint() is None


def test_extension_from_another_checkout_is_refused(tmp_path):
    # An unbuilt second checkout, imported while the first checkout's editable install is
    # active, got its fastattn._C from the first one (the install's finder supplies what the
    # folder lacks): Python code of one commit on kernels of another, silently. Now refused.
    from fastattn import _C, _C_loader

    assert _C_loader._foreign_extension_hint(_C.__file__) is None  # this build: its own folder
    other = tmp_path / "other_checkout" / "fastattn" / "_C.so"
    hint = _C_loader._foreign_extension_hint(str(other))
    assert hint is not None and str(other.parent) in hint and "pip install -e ." in hint
    assert _C_loader._foreign_extension_hint(None) is None


@pytest.mark.source_tree
def test_setup_progress_filter_streams_lines():
    # scripts/setup.sh shows the build's progress lines as they come: its filter was an awk
    # script, and mawk (Debian's awk) reads a pipe in blocks, so every line of a minutes-long
    # build came out at its end. Each line must come out before the next one is written.
    import select

    from conftest import ROOT

    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        src = f.read()
    start = src.index("progress() {")
    func = src[start:src.index("\n}\n", start) + 3]
    proc = subprocess.Popen(["bash", "-c", func + "progress"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)
    try:
        def line_within(seconds):
            ready, _, _ = select.select([proc.stdout], [], [], seconds)
            assert ready, "the progress filter held its line back"
            return proc.stdout.readline()

        proc.stdin.write("pip chatter, hidden\n  fastattn: compiling (baseline)\n")
        proc.stdin.flush()
        assert line_within(20) == "  fastattn: compiling (baseline)\n"
        proc.stdin.write("[1/3] c++ -c a.cpp\n")
        proc.stdin.flush()
        assert line_within(20) == "  [1/3] c++ -c a.cpp\n"
        proc.stdin.write("a.cpp:1: error: shown inside a region\n  fastattn: done\nhidden again\n")
        proc.stdin.close()
        assert proc.stdout.read() == "a.cpp:1: error: shown inside a region\n  fastattn: done\n"
    finally:
        proc.kill()
        proc.wait()
