"""Per-request adapter mixes, equal to PEFT 0.21's ``LoraModel.add_weighted_adapter``.

Method (proto ``MixMethod``) → PEFT ``combination_type``, per (layer, module), over the members that adapt the
module (in request order), with wᵢ the member weights and sᵢ their per-module scales; the result's scale is 1:

- CAT → ``cat``: A = [w₁s₁A₁; w₂s₂A₂; …] (rows), B = [B₁ B₂ …] (columns); rank Σrᵢ; ΔW = Σ wᵢsᵢBᵢAᵢ exactly.
  ``cat_segments`` gives the same sum WITHOUT copying: each member's own A/B with scale wᵢsᵢ.
- LINEAR → ``linear``: A = Σ sgn(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (members of equal rank; NOT Σ wᵢsᵢBᵢAᵢ —
  the cross terms BᵢAⱼ are PEFT's "rough approximation").
- TIES → ``ties_svd``, DARE_LINEAR → ``dare_linear_svd``, DARE_TIES → ``dare_ties_svd``: on the dense deltas
  Δᵢ = sᵢBᵢAᵢ: prune each Δᵢ (TIES: keep the ⌊d·numel⌋ largest |values|; DARE: keep each value with
  probability d, divide by d); TIES-style election: g = sgn(Σᵢ Δᵢ) (unweighted, ≥ 0 → +1), keep the entries
  whose sign is g, Δ = Σᵢ wᵢΔᵢ[kept] / max(1, #kept); DARE_LINEAR: Δ = Σ wᵢΔᵢ. Then the rank-R SVD:
  Δ ≈ U_R·S_R·V_Rᵀ, B = U_R·S_R, A = V_Rᵀ, with R = the largest member rank (PEFT's ``svd_rank=None``).
- One member: PEFT uses ``linear`` whatever the method (so the result is w·s·B·A exactly).

Deliberate differences from PEFT, all documented where they are made:
- The result's scale is 1.0 even when the first member uses rsLoRA. PEFT 0.21 copies ``use_rslora`` into the
  mixed config (scale √rank, a √rank-times overscaled delta; fixed upstream by huggingface/peft#3449).
- DARE's masks come from one ``torch.Generator`` per module seeded from (mix digest, module): reproducible on
  any device and in any module order. PEFT draws from torch's global generator.
- Everything is computed in float32 and returned in float32 (the pool casts to the serving dtype).
- Weights and density are rounded to float32 (the proto's type) so gRPC and JSON callers share cache entries.
- LINEAR checks ranks per module (what the sums need); PEFT compares each config's r / rank_pattern maximum.

Cost for the integration: CAT/LINEAR are cheap (copies of the members' rows); the SVD methods materialise one
dense [h_out, h_in] delta per member and module and run a full SVD of it — O(h³) per module: measured 14 s for
1024² and 87 s for 2048² on a shared 2-core CPU, so a 7B model's 224 modules are hours on CPU. Run them where
the tensors can live on the GPU, off the step thread, once per distinct ``Mix.digest``, and cache the result.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.registry.errors import InvalidArgument

MAX_MIX_MEMBERS = 8
_DIGEST_VERSION = 1


class MixMethod(enum.IntEnum):
    """The proto's ``MixMethod`` numbers (``MIX_METHOD_UNSPECIFIED`` = 0 means CAT; see ``from_proto``)."""

    CAT = 1
    LINEAR = 2
    TIES = 3
    DARE_LINEAR = 4
    DARE_TIES = 5

    @classmethod
    def from_proto(cls, value: int) -> MixMethod:
        if value == 0:
            return cls.CAT
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgument(f"mix method {value} is not a known MixMethod") from None

    @property
    def needs_density(self) -> bool:
        return self in (MixMethod.TIES, MixMethod.DARE_LINEAR, MixMethod.DARE_TIES)


def _f32(value: float, what: str) -> float:
    """``value`` rounded to float32; ``InvalidArgument`` when it is not a finite float32."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number, got {value!r}")
    try:
        rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        raise InvalidArgument(f"{what} {value!r} does not fit a 32-bit float") from None
    return rounded


def mix_digest(
    member_digests: Sequence[str], weights: Sequence[float], method: MixMethod, density: float | None
) -> str:
    """``sha256:<hex>`` naming a mix's result: cache key for the materialised adapter and seed of DARE's masks.

    Member order is kept (it decides DARE's draws and float summation order); weights and density are hashed as
    the exact float32 values used.
    """
    payload = {
        "v": _DIGEST_VERSION,
        "members": list(member_digests),
        "weights": [_f32(w, "weight").hex() for w in weights],
        "method": method.name,
        "density": None if density is None else _f32(density, "density").hex(),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class MixMember:
    """One member as the engine holds it: its version digest, its base model and its parsed modules."""

    digest: str
    base_model: str
    modules: Mapping[ModuleKey, ModuleLoRA]
    dora: bool = False

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())


@dataclass(frozen=True)
class Mix:
    """A validated mix request; construction raises ``InvalidArgument`` for anything PEFT could not combine."""

    members: tuple[MixMember, ...]
    weights: tuple[float, ...]
    method: MixMethod = MixMethod.CAT
    density: float | None = None

    def __post_init__(self) -> None:
        n = len(self.members)
        if not 1 <= n <= MAX_MIX_MEMBERS:
            raise InvalidArgument(f"a mix needs 1 to {MAX_MIX_MEMBERS} adapters, got {n}")
        if len(self.weights) != n:
            raise InvalidArgument(f"a mix of {n} adapters needs {n} weights, got {len(self.weights)}")
        weights = tuple(_f32(w, f"weight of mix member {i}") for i, w in enumerate(self.weights))
        object.__setattr__(self, "weights", weights)
        if self.method.needs_density:
            if self.density is None:
                raise InvalidArgument(f"mix method {self.method.name} needs a density in (0, 1]")
            density = _f32(self.density, "density")
            if not 0.0 < density <= 1.0:
                raise InvalidArgument(f"density must be in (0, 1], got {self.density!r}")
            object.__setattr__(self, "density", density)
        elif self.density is not None:
            raise InvalidArgument(f"mix method {self.method.name} takes no density")
        bases = {m.base_model for m in self.members}
        if len(bases) > 1:
            raise InvalidArgument(f"mix members are adapters of different base models: {', '.join(sorted(bases))}")
        for i, member in enumerate(self.members):
            if member.dora:
                raise InvalidArgument(f"mix member {i} ({member.digest}) is a DoRA adapter; DoRA cannot be mixed")
            if not member.modules:
                raise InvalidArgument(f"mix member {i} ({member.digest}) adapts no module")
        for key, loras in _by_module(self).items():
            shapes = {(int(lo.a.shape[1]), int(lo.b.shape[0])) for lo, _ in loras}
            if len(shapes) > 1:
                raise InvalidArgument(f"mix members disagree on the shape of {_name(key)}: {sorted(shapes)}")
            ranks = {lo.rank for lo, _ in loras}
            if self.effective_method is MixMethod.LINEAR and len(ranks) > 1:
                raise InvalidArgument(
                    f"mix method LINEAR needs members of one rank, but {_name(key)} has ranks {sorted(ranks)}"
                )

    @property
    def effective_method(self) -> MixMethod:
        """PEFT combines a single adapter linearly whatever the requested method."""
        return MixMethod.LINEAR if len(self.members) == 1 else self.method

    @property
    def digest(self) -> str:
        return mix_digest([m.digest for m in self.members], self.weights, self.method, self.density)

    @property
    def target_rank(self) -> int:
        """Rank of the SVD methods' result: the largest member rank (PEFT's ``svd_rank=None``)."""
        return max(m.rank for m in self.members)


def _name(key: ModuleKey) -> str:
    layer, module = key
    return module if layer is None else f"layers.{layer}.{module}"


def _by_module(mix: Mix) -> dict[ModuleKey, list[tuple[ModuleLoRA, float]]]:
    """Per module, the (lora, weight) of every member that adapts it, in member order."""
    out: dict[ModuleKey, list[tuple[ModuleLoRA, float]]] = {}
    for member, weight in zip(mix.members, mix.weights, strict=True):
        for key, lora in member.modules.items():
            out.setdefault(key, []).append((lora, weight))
    return out


def module_generator(digest: str, key: ModuleKey) -> torch.Generator:
    """The CPU generator DARE draws one module's masks from: seeded by sha256(mix digest, layer, module)."""
    seed_bytes = hashlib.sha256(f"{digest}|{key[0]}|{key[1]}".encode()).digest()[:8]
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(seed_bytes, "big") >> 1)


def cat_segments(mix: Mix) -> dict[ModuleKey, tuple[ModuleLoRA, ...]]:
    """CAT without materialising: per module, each member's own A/B tensors (no copy) with scale wᵢ·sᵢ.

    Σ over the tuple of scale·B·A is the CAT mix's ΔW, so a token can run it as several segments (one per
    member) or the pool can hold the members' rows once and address them as one virtual adapter of rank Σrᵢ
    with a per-row scale.
    """
    if mix.method is not MixMethod.CAT:
        raise InvalidArgument(f"mix method {mix.method.name} cannot run without materialising")
    return {
        key: tuple(ModuleLoRA(lo.a, lo.b, w * lo.scale) for lo, w in loras) for key, loras in _by_module(mix).items()
    }


def mix_modules(mix: Mix) -> dict[ModuleKey, ModuleLoRA]:
    """The mixed adapter, materialised as PEFT stores it (float32, scale 1.0, per-module ranks as in the doc)."""
    method = mix.effective_method
    digest = mix.digest
    out: dict[ModuleKey, ModuleLoRA] = {}
    for key, loras in _by_module(mix).items():
        if method is MixMethod.CAT:
            a = torch.cat([lo.a.float() * w * lo.scale for lo, w in loras], dim=0)
            b = torch.cat([lo.b.float() for lo, _ in loras], dim=1)
            out[key] = ModuleLoRA(a, b, 1.0)
        elif method is MixMethod.LINEAR:
            out[key] = _linear(loras)
        else:
            out[key] = _svd_mix(key, loras, method, mix.density, mix.target_rank, digest)
    return out


def _linear(loras: list[tuple[ModuleLoRA, float]]) -> ModuleLoRA:
    """PEFT ``linear``: √|wᵢsᵢ| on both factors, the sign on A only (so negative weights subtract)."""
    roots = [math.sqrt(abs(w * lo.scale)) for lo, w in loras]
    signs = [1.0 if w * lo.scale >= 0 else -1.0 for lo, w in loras]
    a_stack = torch.stack([lo.a.float() for lo, _ in loras])  # [n, r, h_in]
    b_stack = torch.stack([lo.b.float() for lo, _ in loras])  # [n, h_out, r]
    wa = torch.tensor([r * s for r, s in zip(roots, signs, strict=True)], device=a_stack.device)
    wb = torch.tensor(roots, device=b_stack.device)
    a = (a_stack * wa.view(-1, 1, 1)).sum(dim=0)
    b = (b_stack * wb.view(-1, 1, 1)).sum(dim=0)
    return ModuleLoRA(a, b, 1.0)


def _peft_layout(key: ModuleKey) -> bool:
    """PEFT's ``get_delta_weight`` returns embeddings as [vocab, hidden], the transpose of B·A: prune there."""
    return key == (None, "embed_tokens")


def _svd_mix(
    key: ModuleKey,
    loras: list[tuple[ModuleLoRA, float]],
    method: MixMethod,
    density_or_none: float | None,
    rank: int,
    digest: str,
) -> ModuleLoRA:
    """PEFT ``_svd_generalized_task_arithmetic_weighted_adapter`` for one module (see the module docstring)."""
    density = 1.0 if density_or_none is None else density_or_none
    deltas = [(lo.b.float() @ lo.a.float()) * lo.scale for lo, _ in loras]  # PEFT get_delta_weight, [h_out, h_in]
    if _peft_layout(key):
        deltas = [d.t() for d in deltas]
    weights = torch.tensor([w for _, w in loras]).to(deltas[0].device)
    if method is MixMethod.TIES:
        pruned = [_keep_largest(d, density) for d in deltas]
    else:
        gen = module_generator(digest, key)
        pruned = [_keep_random(d, density, gen) for d in deltas]
    stacked = torch.stack(pruned)  # [n, ...]
    weighted = stacked * weights.view(-1, 1, 1)
    if method is MixMethod.DARE_LINEAR:
        delta = weighted.sum(dim=0)
    else:  # TIES election + disjoint mean
        majority = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
        kept = stacked.sign() == majority
        delta = (weighted * kept).sum(dim=0) / torch.clamp(kept.sum(dim=0), min=1.0)
    if _peft_layout(key):
        delta = delta.t()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, int(s.shape[0]))
    return ModuleLoRA(a=vh[:r].contiguous(), b=(u[:, :r] * s[:r]).contiguous(), scale=1.0)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: zero all but the ⌊density·numel⌋ entries of largest magnitude (PEFT ``magnitude_based_pruning``)."""
    if density >= 1.0:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.view(t.shape)


def _keep_random(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE drop-and-rescale: keep each entry with probability ``density`` and divide by it.

    The Bernoulli draw runs on the CPU generator (same shape and dtype as PEFT's ``full_like``) so the mask is the
    same whichever device the deltas live on.
    """
    if density >= 1.0:
        return t
    p = torch.full(tuple(t.shape), density, dtype=t.dtype)
    mask = torch.bernoulli(p, generator=gen).to(t.device)
    return t * mask / density
