"""Domain entities → protobuf messages (the registry's). Pure functions, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from loraplex.registry.entities import Adapter, AdapterVersion, BaseModel, VersionState
from loraplex.registry.v1 import registry_service_pb2 as pb

_STATES = {
    VersionState.PENDING: pb.VERSION_STATE_PENDING,
    VersionState.READY: pb.VERSION_STATE_READY,
    VersionState.FAILED: pb.VERSION_STATE_FAILED,
}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def base_model_to_pb(m: BaseModel) -> pb.BaseModel:
    s = m.spec
    return pb.BaseModel(
        name=m.name,
        architecture=s.architecture,
        model_type=s.model_type,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        head_dim=s.head_dim,
        intermediate_size=s.intermediate_size,
        vocab_size=s.vocab_size,
        tie_word_embeddings=s.tie_word_embeddings,
        config_json=m.config_json,
        create_time=timestamp(m.create_time),
    )


def adapter_to_pb(a: Adapter) -> pb.Adapter:
    msg = pb.Adapter(
        name=a.name,
        base_model=a.base_model,
        description=a.description,
        labels=dict(a.labels),
        aliases=dict(a.aliases),
        etag=a.etag,
        create_time=timestamp(a.create_time),
        update_time=timestamp(a.update_time),
    )
    if a.latest_version is not None:
        msg.latest_version = a.latest_version
    return msg


def version_to_pb(v: AdapterVersion) -> pb.AdapterVersion:
    return pb.AdapterVersion(
        adapter=v.adapter,
        version=v.version,
        digest=v.digest,
        weights_sha256=v.weights_sha256,
        size_bytes=v.size_bytes,
        state=_STATES.get(v.state, pb.VERSION_STATE_UNSPECIFIED),
        state_message=v.state_message,
        rank=v.rank,
        module_ranks=dict(v.module_ranks),
        lora_alpha=float(v.lora_alpha),
        use_rslora=v.use_rslora,
        rank_pattern={k: int(x) for k, x in v.rank_pattern.items()},
        alpha_pattern={k: float(x) for k, x in v.alpha_pattern.items()},
        target_modules=list(v.target_modules),
        dtype=v.dtype,
        base_model=v.base_model,
        adapter_config_json=v.adapter_config_json,
        aliases=list(v.aliases),
        create_time=timestamp(v.create_time),
    )
