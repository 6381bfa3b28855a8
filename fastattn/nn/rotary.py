"""fastattn.nn.RotaryEmbedding: cached cos/sin tables and the fused rotary kernel."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import functional as F
from .._validate import is_integer

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _parse_scaling(scaling: Optional[dict]) -> Optional[dict]:
    """Normalise a Hugging Face style ``rope_scaling`` dict; None means no scaling."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be a dict like a Hugging Face rope_scaling, or None; got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        raise ValueError("scaling must name its kind with 'rope_type' (or 'type'): 'default', 'linear', 'llama3' "
                         "or 'yarn'")
    if kind == "default":
        return None
    if kind == "linear":
        if "factor" not in scaling:
            raise ValueError("scaling of rope_type 'linear' needs 'factor'")
        factor = float(scaling["factor"])
        if not factor > 0:
            raise ValueError(f"scaling 'factor' must be > 0, got {factor}")
        return {"rope_type": "linear", "factor": factor}
    if kind == "llama3":
        missing = [key for key in _LLAMA3_KEYS if key not in scaling]
        if missing:
            raise ValueError(f"scaling of rope_type 'llama3' needs {', '.join(repr(m) for m in missing)}")
        out = {"rope_type": "llama3"}
        out.update({key: float(scaling[key]) for key in _LLAMA3_KEYS[:3]})
        out["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        if not out["factor"] > 0:
            raise ValueError(f"scaling 'factor' must be > 0, got {out['factor']}")
        if not out["high_freq_factor"] > out["low_freq_factor"] > 0:
            raise ValueError(
                "scaling needs high_freq_factor > low_freq_factor > 0, got "
                f"{out['high_freq_factor']} and {out['low_freq_factor']}"
            )
        return out
    if kind == "yarn":
        return _parse_yarn(scaling)
    raise ValueError(f"unsupported scaling rope_type {kind!r}; expected 'default', 'linear', 'llama3' or 'yarn'")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN's attention temperature (eq. 21 of the paper): 0.1 * mscale * ln(scale) + 1 above 1.
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_yarn(scaling: dict) -> dict:
    """YaRN as transformers reads a ``rope_parameters`` dict: ``factor`` and
    ``original_max_position_embeddings`` required; ``beta_fast`` (32) and ``beta_slow`` (1)
    bound the ramp between extrapolated and interpolated frequencies (None or 0: the default);
    ``truncate`` (True) rounds the ramp's ends outward; ``attention_factor`` multiplies cos and
    sin, default from ``mscale`` / ``mscale_all_dim`` when both are set, else
    0.1 * ln(factor) + 1."""
    def number(key, default=None, positive=True):
        value = scaling.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"scaling of rope_type 'yarn' needs {key!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
                (positive and not value > 0):
            raise ValueError(f"scaling {key!r} must be a {'positive ' if positive else ''}finite number, got {value!r}")
        return float(value)

    out = {"rope_type": "yarn", "factor": number("factor")}
    orig = scaling.get("original_max_position_embeddings")
    if isinstance(orig, float) and orig.is_integer():  # (a length written as 2048.0)
        orig = int(orig)
    if not is_integer(orig) or orig < 1:
        raise ValueError(f"scaling of rope_type 'yarn' needs 'original_max_position_embeddings', a positive int, "
                         f"got {orig!r}")
    out["original_max_position_embeddings"] = int(orig)
    # transformers: `beta_fast or 32`, so 0 and None both mean the default (a negative count
    # of rotations has no correction dim: refused here rather than at the first table)
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        value = number(key, default, positive=False) or default
        if value < 0:
            raise ValueError(f"scaling {key!r} must be >= 0 (a number of rotations), got {value!r}")
        out[key] = value
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"scaling 'truncate' must be a bool, got {truncate!r}")
    out["truncate"] = truncate
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(out["factor"], number("mscale", positive=False)) / _yarn_mscale(
                out["factor"], number("mscale_all_dim", positive=False))
        else:
            attention_factor = _yarn_mscale(out["factor"])
        out["attention_factor"] = float(attention_factor)
    else:
        out["attention_factor"] = number("attention_factor")
    return out


def rotary_attention_factor(scaling: Optional[dict]) -> float:
    """What the cos / sin tables are multiplied by: YaRN's attention factor, else 1."""
    scaling = _parse_scaling(scaling)
    return scaling["attention_factor"] if scaling is not None and scaling["rope_type"] == "yarn" else 1.0


def _base_from(base, scaling) -> float:
    """RoPE theta: ``base`` if given, else the scaling dict's ``rope_theta`` (transformers 5's
    ``rope_parameters`` carry it), else 10000; the two must agree when both are given."""
    theta = scaling.get("rope_theta") if isinstance(scaling, dict) else None
    if theta is not None:
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not float(theta) > 0:
            raise ValueError(f"scaling's 'rope_theta' must be a number > 0, got {theta!r}")
        if base is not None and _base_from(base, None) != float(theta):
            raise ValueError(f"base = {base!r} disagrees with the scaling dict's rope_theta = {theta!r}; "
                             f"pass one of them (or the same value)")
    if base is None:
        base = 10000.0 if theta is None else theta
    try:  # a Python / NumPy number or a one-element tensor
        value = float(base)
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if isinstance(base, bool) or not value > 0:
        raise ValueError(f"base must be > 0, got {base!r}")
    return value


def rotary_inv_freq(dim: int, base: float = 10000.0, scaling: Optional[dict] = None, device=None) -> Tensor:
    """Inverse frequencies (dim/2,) fp32: ``base ** (-2i / dim)``, then scaled.

    ``linear`` divides every frequency by ``factor`` (position interpolation). ``llama3``
    (LLaMA 3.1) divides the low frequencies (wavelength above original_max_position_embeddings
    / low_freq_factor) by ``factor``, keeps the high ones (wavelength below .../
    high_freq_factor), and blends linearly in 1/wavelength between the two bands.
    """
    scaling = _parse_scaling(scaling)
    # Always computed on the CPU, then moved: the CUDA pow can differ from the CPU's by an ulp,
    # and Hugging Face computes its inv_freq on the CPU at init; one ulp of inv_freq is a few
    # ulps of cos/sin at position 100 (seen on an H200 against LlamaRotaryEmbedding).
    inv_freq = _scaled_inv_freq(dim, base, scaling)
    return inv_freq if device is None else inv_freq.to(device)


def _scaled_inv_freq(dim: int, base: float, scaling: Optional[dict]) -> Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    if scaling["rope_type"] == "yarn":
        return _yarn_inv_freq(dim, base, scaling)
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    # Blend weight, 0 at the low-frequency edge of the band, 1 at the high-frequency edge.
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    in_band = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(in_band, blended, out)


def _yarn_inv_freq(dim: int, base: float, scaling: dict) -> Tensor:
    # YaRN: frequency i is extrapolated (kept) where the pretraining length saw more than
    # beta_fast rotations of it, interpolated (divided by factor) below beta_slow rotations,
    # and blended linearly in i between. The fp32 operations and their order are transformers'
    # (_compute_yarn_parameters), so the tables match its rotary embedding bit for bit.
    factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_of(rotations):  # the (fractional) dim index that turns `rotations` times over orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(scaling["beta_fast"]), dim_of(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolated (high frequencies), 0: interpolated
    return interpolated * (1 - keep) + extrapolated * keep


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding with cached fp32 tables, applied by the fused kernel.

    Args:
        dim: rotary width R (even). It may be smaller than the head dim D of the q/k it is
            applied to: dims R..D pass through (partial rotary).
        max_position_embeddings: positions the tables are built for up front.
        base: RoPE theta; default the scaling dict's ``rope_theta`` if it has one, else
            10000. A base that disagrees with the dict's ``rope_theta`` raises ValueError.
        interleaved: False for NeoX/LLaMA halves, True for GPT-J pairs.
        scaling: None, or a dict with the keys of a Hugging Face config's ``rope_scaling`` /
            ``rope_parameters`` (transformers 5: it carries ``rope_theta`` too):
            ``{"rope_type": "default"}``, ``{"rope_type": "linear", "factor": f}`` or
            ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` or ``{"rope_type": "yarn", "factor",
            "original_max_position_embeddings"}`` with optional ``beta_fast``, ``beta_slow``,
            ``truncate``, ``attention_factor``, ``mscale``, ``mscale_all_dim`` (cos and sin
            then carry the attention factor, as transformers' tables) (``"type"`` is accepted for
            ``"rope_type"``). ``partial_rotary_factor`` is not read: ``dim`` is the rotary
            width itself (``int(head_dim * partial_rotary_factor)``); other keys are ignored.
        device: where the tables are built.

    Buffers (not in the state_dict): ``inv_freq`` (R/2,), ``cos`` and ``sin``
    (cached positions, R/2), all fp32, whatever dtype the module is cast to.

    ``forward(q, k, positions=None, *, max_position=None, inplace=False, check_positions=True)``
    returns ``fastattn.apply_rotary(q, k, cos, sin, positions=..., interleaved=..., inplace=...,
    check_positions=...)`` (False: the caller guarantees the positions, and CUDA skips the
    check's host sync).
    The tables grow (doubling) when a larger position is needed: with ``positions=None``
    that is S; with CPU positions their max is read; CUDA positions are not read (that
    would sync), nor are CPU positions inside torch.compile (a data-dependent branch), so
    pass ``max_position`` (an exclusive upper bound of the positions) when decoding past
    the cached length on CUDA or under torch.compile, or the kernel call rejects the
    positions. Tables grown inside a compiled graph come from the compiled cos / sin, which
    may differ from eager's by an ulp (rows already cached included); build them eagerly
    up front (``max_position_embeddings``) where bits matter.

    Growth is bounded by ``max_positions`` (class attribute, 2**24 = 16M positions, beyond
    any released model's context; set it on an instance or subclass to change it): the
    tables never hold more rows, which caps them at 2**24 * R * 4 bytes (8 GiB for R = 128,
    both tables). A larger position (or max_position, or S, or max_position_embeddings)
    raises ValueError naming it and the limit instead of attempting the allocation. CPU
    positions below 0 raise ValueError; positions must be an int32/int64 tensor.
    """

    #: The most positions the cos/sin tables are ever built for.
    max_positions: int = 2**24

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 2048,
        base: Optional[float] = None,
        interleaved: bool = False,
        scaling: Optional[dict] = None,
        device=None,
    ) -> None:
        super().__init__()
        if not is_integer(dim) or dim <= 0 or dim % 2 != 0:
            raise ValueError(f"dim (the rotary width) must be a positive even integer, got {dim!r}")
        if not is_integer(max_position_embeddings) or max_position_embeddings <= 0:
            raise ValueError(f"max_position_embeddings must be a positive integer, got {max_position_embeddings!r}")
        dim, max_position_embeddings = int(dim), int(max_position_embeddings)
        base = _base_from(base, scaling)
        if max_position_embeddings > self.max_positions:
            raise ValueError(
                f"max_position_embeddings = {max_position_embeddings} exceeds the table limit: RotaryEmbedding "
                f"builds its cos/sin tables for at most {self.max_positions} positions (max_positions)"
            )
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self.scaling = _parse_scaling(scaling)
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_position_embeddings, device)

    @property
    def cached_positions(self) -> int:
        return self.cos.shape[0]

    def reset_parameters(self) -> None:
        """Rebuild the tables from the configuration, on their device, for as many positions as
        are cached (what ``torch.nn`` modules offer after ``to_empty()``; this module also does it
        by itself when it leaves the meta device, see ``_apply``)."""
        self._build(max(self.cached_positions, self.max_position_embeddings), self.cos.device)

    def _apply(self, fn, recurse=True):
        # A module built on the meta device leaves it only through to_empty() (a meta tensor has no
        # data to copy), which hands the non-persistent tables uninitialised memory: garbage
        # cos/sin that _ensure would never replace. Rebuild them from the configuration instead.
        # Also rebuilt: a cos and a sin of different builds (two threads grew the tables at once).
        was_meta = self.cos.is_meta
        out = super()._apply(fn, recurse)
        self._tables = (self.cos, self.sin)
        # And tables a dtype cast (.to(torch.bfloat16), .half()) rounded: the buffers stay fp32,
        # as documented (apply_rotary takes fp32 tables only).
        if ((was_meta and not self.cos.is_meta) or self.cos.shape != self.sin.shape
                or self.cos.dtype != torch.float32 or self.sin.dtype != torch.float32
                or self.inv_freq.dtype != torch.float32):
            self.reset_parameters()
        return out

    def _build(self, num_positions: int, device) -> Tuple[Tensor, Tensor]:
        # Always from the configuration in fp32 (never from a buffer that .to(dtype) may
        # have rounded). Rebuilding gives bit-identical rows for positions already cached.
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():  # (not traceable)
            # Tables built (or grown) during generation under torch.inference_mode would be
            # inference tensors, which a later training step could only use by copying them on
            # every call (autograd cannot save one): build ordinary tensors.
            with torch.inference_mode(False):
                return self._build(num_positions, device)
        inv_freq = rotary_inv_freq(self.dim, self.base, self.scaling, device=device)
        t = torch.arange(num_positions, device=device, dtype=torch.int64).to(torch.float32)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().contiguous(), freqs.sin().contiguous()
        attention_factor = rotary_attention_factor(self.scaling)
        if attention_factor != 1.0:  # YaRN: cos and sin carry the attention temperature
            cos, sin = cos * attention_factor, sin * attention_factor
        self.inv_freq = inv_freq
        self.cos, self.sin = cos, sin
        # What forward reads, set in ONE assignment: threads sharing the module (a server's model)
        # must never see a new cos with the old sin while another thread grows the tables.
        self._tables = (cos, sin)
        return cos, sin

    def _ensure(self, needed: int, what) -> Tuple[Tensor, Tensor]:
        # what() names where `needed` came from, for the error: built only when raising, since
        # formatting a symbolic sequence length would make torch.compile specialise on it.
        limit = self.max_positions
        if needed > limit:
            raise ValueError(
                f"{what()} but RotaryEmbedding builds its cos/sin tables for at most {limit} positions "
                f"(max_positions; a table that long already takes {limit * self.dim * 4 / 2**30:.3g} GiB)"
            )
        # The buffers (what torch.func.functional_call / stack_module_state substitute); while
        # another thread is between assigning a new cos and its sin they disagree, and the pair
        # set in one assignment (_tables) is taken instead.
        cos, sin = self.cos, self.sin
        if cos.shape != sin.shape or cos.dtype != sin.dtype:
            cos, sin = self._tables
        stale = cos.dtype != torch.float32  # the module was cast with .to(dtype)
        if needed > cos.shape[0] or stale:
            size = max(cos.shape[0], 1)
            while size < needed:
                size *= 2
            # This call's own tables: another thread may replace self._tables meanwhile.
            cos, sin = self._build(min(size, limit), cos.device)
        return cos, sin

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        positions: Optional[Tensor] = None,
        *,
        max_position: Optional[int] = None,
        inplace: bool = False,
        check_positions: bool = True,
    ):
        """q (B, S, H, D), k (B, S, Hk, D) -> (q_rot, k_rot), the same shapes and dtypes,
        rotated at ``positions`` ((B, S) or (S,) integers; default 0..S-1). ``max_position``:
        an exclusive bound of the positions, for the tables' growth where the positions are
        not read (CUDA, torch.compile); ``inplace``: rotate q and k in place and return them;
        ``check_positions=False``: the caller guarantees the positions (see the class)."""
        if positions is None:
            needed = q.shape[1] if isinstance(q, Tensor) and q.dim() >= 2 else 0
            what = lambda: f"positions (default arange(S), S = {needed}) need {needed} table rows"  # noqa: E731
        elif max_position is not None:
            if isinstance(max_position, bool) or not isinstance(max_position, (numbers.Integral, torch.SymInt)):
                raise TypeError(
                    f"max_position must be an int (an exclusive bound of the positions) or None, got "
                    f"{type(max_position).__name__}: {max_position!r}"
                )
            needed = int(max_position)
            if needed < 0:
                raise ValueError(f"max_position must be >= 0, got {needed}")
            what = lambda: f"max_position = {needed} asks for {needed} table rows"  # noqa: E731
        elif (
            isinstance(positions, Tensor)
            and positions.device.type == "cpu"
            and positions.numel() > 0
            and positions.dtype in (torch.int32, torch.int64)
            and not torch.compiler.is_compiling()
        ):
            lo, hi = (int(v) for v in torch.aminmax(positions))
            if lo < 0:
                raise ValueError(f"positions must be >= 0, got a minimum of {lo}")
            needed = hi + 1
            what = lambda: f"positions: the largest position asked for is {hi}"  # noqa: E731
        else:  # checked by apply_rotary (dtype, shape; CUDA values by the kernel)
            needed, what = 0, str
        cos, sin = self._ensure(needed, what)
        if needed > 0 or max_position is not None:
            # Exactly the rows this call needs: the op saves the tables for backward, and their
            # shape must not depend on how far earlier calls grew them (non-reentrant
            # torch.utils.checkpoint compares a recomputation's saved shapes with the forward's).
            cos, sin = cos[:needed], sin[:needed]
        return F.apply_rotary(
            q, k, cos, sin, positions=positions, interleaved=self.interleaved, inplace=inplace,
            check_positions=check_positions,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
            f"interleaved={self.interleaved}, scaling={self.scaling}"
        )
