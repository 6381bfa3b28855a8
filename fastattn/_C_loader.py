"""Loads the compiled extension, with a message that says how to build it when it is missing."""

BUILD_HINT = (
    "fastattn's compiled extension (fastattn._C) is not built. Build it from the repository "
    "root with:\n    pip install -e . --no-build-isolation\n"
    "(or run `make test` / `make demo`, which install torch if needed and build it)."
)


def load():
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    try:
        from fastattn import _C  # noqa: F401  (loading registers torch.ops.fastattn.*)
    except ImportError as e:  # pragma: no cover - exercised only without a build
        # A missing file reads "cannot import name '_C' from partially initialized module ...
        # (most likely due to a circular import)": no cause to add, and a misleading one.
        missing = getattr(e, "name", None) in ("fastattn._C", "fastattn") and "_C" in str(e) and \
            "circular import" in str(e)
        raise ImportError(f"{_shadow_hint() or BUILD_HINT}" + ("" if missing else f"\n(original error: {e})")) from e
    foreign = _foreign_extension_hint(getattr(_C, "__file__", None))
    if foreign:
        raise ImportError(foreign)
    return _C


def exit_if_command_line(error: ImportError) -> None:
    """The CLI promises one-line errors, but `python -m fastattn` / the `fastattn` script import
    the package before its main() can catch anything: there, print the import error as one
    line and exit 1 (FASTATTN_DEBUG=1 keeps the traceback)."""
    import os
    import sys

    argv0 = sys.argv[0] if sys.argv else ""
    # runpy imports the package while argv[0] is still "-m"; the console script is `fastattn`
    if (argv0 == "-m" or os.path.basename(argv0) == "fastattn") and os.environ.get("FASTATTN_DEBUG", "") in ("", "0"):
        message = " ".join(line.strip() for line in str(error).splitlines())
        sys.stderr.write(f"fastattn: error: {message}\n")
        raise SystemExit(1)


def _foreign_extension_hint(extension_file):
    """An unbuilt checkout imported while another checkout's editable install is active: the
    install's import finder supplies the missing fastattn._C from that other checkout, whose
    kernels may be of another commit than this Python code. Refused, saying so."""
    import os

    if not extension_file:
        return None
    here = os.path.dirname(os.path.realpath(__file__))
    there = os.path.dirname(os.path.realpath(extension_file))
    if here == there:
        return None
    return (
        f"fastattn was imported from {here}, but its compiled extension (fastattn._C) came from "
        f"{there}: this folder is not built, and another fastattn (an editable install of another "
        f"checkout) supplied its extension, whose kernels need not match this code. Build this "
        f"checkout in place with:\n    pip install -e . --no-build-isolation\n"
        f"or run from outside it to use the installed one."
    )


def _shadow_hint():
    """When this fastattn is a source checkout's unbuilt folder and a built fastattn is installed
    elsewhere (`pip install .`), Python imported the checkout because the current directory comes
    first on sys.path: say so, rather than send the user off to build again."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not (os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc"))):
        return None
    try:
        from importlib import metadata

        # Every fastattn distribution on the path: the build leaves a fastattn.egg-info in the
        # checkout's root, found first from there (it locates the checkout itself), so the
        # installed copy may be a later one (newcomer audit: the hint stayed silent after
        # `pip install .`).
        found = [os.path.abspath(str(dist.locate_file("fastattn"))) for dist in metadata.distributions(name="fastattn")]
    except Exception:  # not installed, or installed in a way we cannot locate
        return None
    installed = next((path for path in found if path != here and os.path.isdir(path)), None)
    if installed is None:
        return None
    return (
        f"fastattn was imported from the source checkout {here}, which has no compiled extension "
        f"(fastattn._C); the fastattn installed at {installed} is hidden by it because Python "
        f"looks in the current directory first. Run from outside the checkout to use the "
        f"installed package, or build the checkout in place with:\n"
        f"    pip install -e . --no-build-isolation"
    )
