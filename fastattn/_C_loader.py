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
        raise ImportError(f"{BUILD_HINT}\n(original error: {e})") from e
    return _C
