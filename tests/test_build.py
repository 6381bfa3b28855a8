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
