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

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist(installed))
    hint = loader._shadow_hint()
    assert hint is not None and str(checkout / "fastattn") in hint and str(installed / "fastattn") in hint
    assert "outside the checkout" in hint
    # the installed package is this checkout itself (an editable install), or none: the build hint
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist(checkout))
    assert loader._shadow_hint() is None

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert loader._shadow_hint() is None
