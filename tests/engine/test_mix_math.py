"""Adapter mixes against PEFT ``add_weighted_adapter``, per (layer, module), on a tiny Llama and Qwen2.

What is compared: the mixed adapter's delta ΔW = s·B·A of every module (A and B themselves are not unique for
the SVD methods: U and V columns may flip sign together).

How the DARE comparison is made fair: PEFT draws its Bernoulli masks from torch's global generator, after its
own adapter initialisation has consumed an unknown amount of it; the engine draws from one generator per module
seeded by the mix digest. The test runs PEFT unchanged except that ``torch.bernoulli`` takes its numbers from
the engine's generator for the module PEFT is processing (found from the ``target`` PEFT passes to its SVD
helper). Every other step — pruning, rescaling, election, merge, SVD — is PEFT's own code.

Tolerances: CAT and LINEAR do the same float32 operations as PEFT: 1e-5 absolute. The SVD methods also
truncate an SVD: PEFT takes ``full_matrices=True``, the engine the reduced SVD (same singular triplets, another
LAPACK path), so the rank-R reconstructions differ by float32 rounding of the SVD, which scales with the
matrix: 1e-5 relative to the module's largest |ΔW| entry (≈ 100 float32 ulps; measured ≤ 4e-7 relative — the
embedding deltas, entries up to ~50 because PEFT initialises embedding LoRA with N(0, 1), show 1.4e-5 absolute,
while every projection module agrees to ≤ 1e-7 absolute, most bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.mix import (
    Mix,
    MixMember,
    MixMethod,
    cat_segments,
    mix_digest,
    mix_modules,
    module_generator,
)
from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.registry.errors import InvalidArgument
from loraplex.registry.spec import ModelSpec
from tests.engine.helpers import peft_model
from tests.fixtures.hf import ALL_LINEAR, AdapterSpec, build_adapter
from tests.fixtures.peft_variants import peft_delta, peft_layers

MEMBERS = {
    "m8a": AdapterSpec(r=8, lora_alpha=16, target_modules=tuple(ALL_LINEAR), seed=21),
    "m8b": AdapterSpec(
        r=8, lora_alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "gate_proj"), alpha_pattern={"o_proj": 32.0}
    ),
    "m4rs": AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj", "k_proj", "down_proj"), use_rslora=True, seed=23),
    "m16p": AdapterSpec(
        r=16,
        lora_alpha=16,
        target_modules=("q_proj", "v_proj", "up_proj", "embed_tokens", "lm_head"),
        rank_pattern={"v_proj": 2},
        seed=24,
    ),
}
PEFT_TYPE = {
    MixMethod.CAT: "cat",
    MixMethod.LINEAR: "linear",
    MixMethod.TIES: "ties_svd",
    MixMethod.DARE_LINEAR: "dare_linear_svd",
    MixMethod.DARE_TIES: "dare_ties_svd",
}
CASES = [
    (MixMethod.CAT, ["m8a", "m4rs", "m16p"], [0.7, -0.4, 1.3], None),
    (MixMethod.LINEAR, ["m8a", "m8b"], [0.6, -1.1], None),
    (MixMethod.TIES, ["m8a", "m4rs", "m16p"], [0.7, 0.5, 1.2], 0.5),
    (MixMethod.DARE_LINEAR, ["m8a", "m8b", "m16p"], [0.7, -0.4, 1.3], 0.6),
    (MixMethod.DARE_TIES, ["m8a", "m4rs", "m16p"], [1.0, 0.5, 0.8], 0.4),
    (MixMethod.TIES, ["m16p"], [0.8], 0.5),  # one member: PEFT combines linearly whatever the method
]

Members = tuple[dict[str, Path], dict[str, HostAdapter], Path]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def members(
    request: pytest.FixtureRequest, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Members:
    model_dir = tiny_models[request.param]
    root = tmp_path_factory.mktemp(f"mix-{request.param}")
    spec = ModelSpec.from_config(json.loads((model_dir / "config.json").read_text()))
    dirs = {name: build_adapter(model_dir, root / name, s) for name, s in MEMBERS.items()}
    hosts = {name: HostAdapter.from_peft_dir(d, spec, 64) for name, d in dirs.items()}
    return dirs, hosts, model_dir


def _mix(
    hosts: dict[str, HostAdapter], names: list[str], weights: list[float], method: MixMethod, density: float | None
) -> Mix:
    return Mix(
        members=tuple(MixMember(f"sha256:{name}", "tiny", hosts[name].modules) for name in names),
        weights=tuple(weights),
        method=method,
        density=density,
    )


def _peft_mixed(
    monkeypatch: pytest.MonkeyPatch, dirs: dict[str, Path], model_dir: Path, mix: Mix, names: list[str]
) -> dict[ModuleKey, Any]:
    """Run PEFT's add_weighted_adapter; DARE's Bernoulli draws come from the engine's per-module generators."""
    from peft.tuners.lora.model import LoraModel

    oracle = peft_model(model_dir, {name: dirs[name] for name in names})
    layers = peft_layers(oracle)
    key_of = {id(layer): key for key, layer in layers.items()}
    current: dict[str, torch.Generator] = {}
    svd_helper, bernoulli = LoraModel._svd_generalized_task_arithmetic_weighted_adapter, torch.bernoulli

    def tracked(
        self: Any, combination: str, adapters: Any, weights: Any, rank: int, target: Any, *a: Any, **k: Any
    ) -> Any:
        current["gen"] = module_generator(mix.digest, key_of[id(target)])
        return svd_helper(self, combination, adapters, weights, rank, target, *a, **k)

    def seeded_bernoulli(p: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert not args and not kwargs
        return bernoulli(p, generator=current["gen"])

    with monkeypatch.context() as patch:
        patch.setattr(LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", tracked)
        patch.setattr(torch, "bernoulli", seeded_bernoulli)
        oracle.add_weighted_adapter(
            list(names), list(mix.weights), "mix", combination_type=PEFT_TYPE[mix.method], density=mix.density
        )
    return {key: layer for key, layer in layers.items() if "mix" in layer.scaling}


def _delta(lora: ModuleLoRA) -> torch.Tensor:
    return (lora.b.float() @ lora.a.float()) * lora.scale


@pytest.mark.parametrize(("method", "names", "weights", "density"), CASES, ids=lambda v: getattr(v, "name", None))
def test_mix_equals_peft_add_weighted_adapter(
    members: Members,
    monkeypatch: pytest.MonkeyPatch,
    method: MixMethod,
    names: list[str],
    weights: list[float],
    density: float | None,
) -> None:
    dirs, hosts, model_dir = members
    mix = _mix(hosts, names, weights, method, density)
    ours = mix_modules(mix)
    peft_layers_mixed = _peft_mixed(monkeypatch, dirs, model_dir, mix, names)
    assert set(ours) == set(peft_layers_mixed)
    for key, lora in ours.items():
        layer = peft_layers_mixed[key]
        assert float(layer.scaling["mix"]) == lora.scale == 1.0
        want = peft_delta(layer, "mix")
        assert want.abs().max() > 1e-3, key  # a real delta, not an all-pruned module
        svd = method in (MixMethod.TIES, MixMethod.DARE_LINEAR, MixMethod.DARE_TIES) and len(names) > 1
        atol = 1e-5 * max(1.0, float(want.abs().max())) if svd else 1e-5
        torch.testing.assert_close(_delta(lora), want, atol=atol, rtol=0, msg=f"{method.name} {key}")
        if svd:
            assert lora.rank == min(mix.target_rank, *want.shape) == 16
        if method is MixMethod.CAT:
            assert lora.rank == sum(hosts[n].modules[key].rank for n in names if key in hosts[n].modules)


def test_rslora_first_member_gets_scale_one(members: Members, monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT 0.21 copies the first member's ``use_rslora`` into the mix (scale √rank, an overscaled delta; fixed
    upstream in huggingface/peft#3449). The engine keeps the intended scale 1: its ΔW equals PEFT's B·A."""
    dirs, hosts, model_dir = members
    for method, density in ((MixMethod.CAT, None), (MixMethod.TIES, 0.7)):
        mix = _mix(hosts, ["m4rs", "m8a"], [0.9, 0.4], method, density)
        ours = mix_modules(mix)
        layers = _peft_mixed(monkeypatch, dirs, model_dir, mix, ["m4rs", "m8a"])
        for key, lora in ours.items():
            want = peft_delta(layers[key], "mix", scaling=1.0)
            atol = 1e-5 * max(1.0, float(want.abs().max()))
            torch.testing.assert_close(_delta(lora), want, atol=atol, rtol=0, msg=f"{method.name} {key}")


def test_cat_segments_are_the_members_rows_with_scaled_weights(members: Members) -> None:
    _, hosts, _ = members
    mix = _mix(hosts, ["m8a", "m4rs", "m16p"], [0.7, -0.4, 1.3], MixMethod.CAT, None)
    segments, materialised = cat_segments(mix), mix_modules(mix)
    assert set(segments) == set(materialised)
    for key, parts in segments.items():
        want = _delta(materialised[key])
        atol = 1e-6 * max(1.0, float(want.abs().max()))  # float32 summation order differs; embeddings reach ~50
        torch.testing.assert_close(sum(_delta(p) for p in parts), want, atol=atol, rtol=0)
        owners = [n for n in ("m8a", "m4rs", "m16p") if key in hosts[n].modules]
        for part, name in zip(parts, owners, strict=True):
            assert part.a is hosts[name].modules[key].a and part.b is hosts[name].modules[key].b  # no copies
    with pytest.raises(InvalidArgument, match="without materialising"):
        cat_segments(_mix(hosts, ["m8a", "m8b"], [1.0, 1.0], MixMethod.LINEAR, None))


def test_dare_is_reproducible_and_seeded_by_the_digest(members: Members) -> None:
    _, hosts, _ = members
    one = mix_modules(_mix(hosts, ["m8a", "m8b"], [0.5, 0.5], MixMethod.DARE_LINEAR, 0.5))
    again = mix_modules(_mix(hosts, ["m8a", "m8b"], [0.5, 0.5], MixMethod.DARE_LINEAR, 0.5))
    other = mix_modules(_mix(hosts, ["m8a", "m8b"], [0.5, 0.5000001], MixMethod.DARE_LINEAR, 0.5))
    key = (0, "q_proj")
    assert torch.equal(_delta(one[key]), _delta(again[key]))
    assert not torch.allclose(_delta(one[key]), _delta(other[key]), atol=1e-3)


def test_digest_is_canonical_and_sensitive() -> None:
    base = mix_digest(["sha256:a", "sha256:b"], [0.7, 0.3], MixMethod.TIES, 0.5)
    assert base.startswith("sha256:") and len(base) == 7 + 64
    f32 = float(torch.tensor(0.7, dtype=torch.float32))
    assert mix_digest(["sha256:a", "sha256:b"], [f32, 0.3], MixMethod.TIES, 0.5) == base  # proto float == JSON
    for changed in (
        mix_digest(["sha256:b", "sha256:a"], [0.7, 0.3], MixMethod.TIES, 0.5),
        mix_digest(["sha256:a", "sha256:b"], [0.7, 0.31], MixMethod.TIES, 0.5),
        mix_digest(["sha256:a", "sha256:b"], [0.7, 0.3], MixMethod.DARE_TIES, 0.5),
        mix_digest(["sha256:a", "sha256:b"], [0.7, 0.3], MixMethod.TIES, 0.6),
    ):
        assert changed != base


def test_bad_mixes_are_invalid_arguments(members: Members) -> None:
    _, hosts, _ = members
    m8a = MixMember("sha256:a", "tiny", hosts["m8a"].modules)

    def mix(
        members: list[MixMember], weights: list[float], method: MixMethod = MixMethod.CAT, density: float | None = None
    ) -> Mix:
        return Mix(tuple(members), tuple(weights), method, density)

    bad: list[tuple[str, Any]] = [
        ("1 to 8 adapters, got 0", lambda: mix([], [])),
        ("1 to 8 adapters, got 9", lambda: mix([m8a] * 9, [1.0] * 9)),
        ("needs 2 weights, got 1", lambda: mix([m8a, m8a], [1.0])),
        ("finite number", lambda: mix([m8a], [float("nan")])),
        ("finite number", lambda: mix([m8a], [float("inf")])),
        ("does not fit a 32-bit float", lambda: mix([m8a], [1e39])),
        ("needs a density", lambda: mix([m8a, m8a], [1.0, 1.0], MixMethod.TIES)),
        ("in \\(0, 1\\]", lambda: mix([m8a, m8a], [1.0, 1.0], MixMethod.DARE_TIES, 0.0)),
        ("in \\(0, 1\\]", lambda: mix([m8a, m8a], [1.0, 1.0], MixMethod.DARE_LINEAR, 1.5)),
        ("takes no density", lambda: mix([m8a, m8a], [1.0, 1.0], MixMethod.CAT, 0.5)),
        ("different base models", lambda: mix([m8a, MixMember("sha256:x", "other", hosts["m8b"].modules)], [1, 1])),
        ("DoRA", lambda: mix([m8a, MixMember("sha256:d", "tiny", hosts["m8b"].modules, dora=True)], [1, 1])),
        ("adapts no module", lambda: mix([MixMember("sha256:e", "tiny", {})], [1.0])),
        (
            "LINEAR needs members of one rank",
            lambda: mix([m8a, MixMember("sha256:r", "tiny", hosts["m4rs"].modules)], [1, 1], MixMethod.LINEAR),
        ),
        ("not a known MixMethod", lambda: MixMethod.from_proto(9)),
    ]
    for message, make in bad:
        with pytest.raises(InvalidArgument, match=message):
            make()
    assert MixMethod.from_proto(0) is MixMethod.CAT and MixMethod.from_proto(3) is MixMethod.TIES
