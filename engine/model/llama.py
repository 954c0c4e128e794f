"""The Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

Family differences are data, not subclasses: qkv/o/mlp biases, per-layer sliding windows, tied embeddings and
rope scaling all come from ``ModelArgs``. q/k/v and gate/up are fused at load so each takes one matmul (and one
multi-slice LoRA call); ``fused_slices`` records where each original module lands in the fused output. A
quantized base changes only which module ``make_linear`` builds for a projection (same call, same output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.context import Context
from loraplex.engine.model.args import ModelArgs
from loraplex.engine.model.attention import paged_attention, write_kv
from loraplex.engine.model.layers import Embedding, LMHead, RMSNorm
from loraplex.engine.model.loader import ModelWeights
from loraplex.engine.model.quant_linear import make_linear
from loraplex.engine.model.rope import RotaryTable


def fused_slices(args: ModelArgs) -> dict[str, tuple[tuple[str, int], ...]]:
    """Fused attribute -> ((original module, output offset), ...)."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    return {
        "qkv_proj": (("q_proj", 0), ("k_proj", q), ("v_proj", q + kv)),
        "o_proj": (("o_proj", 0),),
        "gate_up_proj": (("gate_proj", 0), ("up_proj", args.intermediate_size)),
        "down_proj": (("down_proj", 0),),
    }


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, weights: ModelWeights, rope: RotaryTable) -> None:
        super().__init__()
        p = f"model.layers.{layer}.self_attn."
        w, names = weights.dense, ("q_proj", "k_proj", "v_proj")
        bias = torch.cat([w[p + f"{n}.bias"] for n in names]) if args.qkv_bias else None
        qkv = [weights.projection(p + f"{n}.weight") for n in names]
        self.qkv_proj: nn.Module = make_linear(qkv, bias, weights.dtype)
        o_bias = w.get(p + "o_proj.bias") if args.o_bias else None
        self.o_proj: nn.Module = make_linear([weights.projection(p + "o_proj.weight")], o_bias, weights.dtype)
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.window = args.sliding_windows[layer]
        self.scale = args.head_dim**-0.5
        self.rope = rope

    def forward(self, x: torch.Tensor, ctx: Context, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x, ctx)  # [T, (n_heads + 2 n_kv) d]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # q and k heads rotate together: one rotary pass over [T, n_heads + n_kv, d]
        qk = self.rope.apply(qkv[:, : q_size + kv_size].view(t, -1, self.head_dim), ctx.positions, ctx.memo)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        v = qkv[:, q_size + kv_size :].view(t, self.n_kv, self.head_dim)
        write_kv(kv[0], kv[1], k, v, ctx)
        out = paged_attention(q, kv[0], kv[1], ctx, self.scale, self.window)
        result: torch.Tensor = self.o_proj(out.reshape(t, q_size), ctx)
        return result


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, weights: ModelWeights) -> None:
        super().__init__()
        p = f"model.layers.{layer}.mlp."
        w = weights.dense
        gu_bias = down_bias = None
        if args.mlp_bias:
            gu_bias = torch.cat([w[p + "gate_proj.bias"], w[p + "up_proj.bias"]])
            down_bias = w[p + "down_proj.bias"]
        gate_up = [weights.projection(p + "gate_proj.weight"), weights.projection(p + "up_proj.weight")]
        self.gate_up_proj: nn.Module = make_linear(gate_up, gu_bias, weights.dtype)
        self.down_proj: nn.Module = make_linear([weights.projection(p + "down_proj.weight")], down_bias, weights.dtype)
        self.inter = args.intermediate_size

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, ctx)
        act = F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
        result: torch.Tensor = self.down_proj(act, ctx)
        return result


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, weights: ModelWeights, rope: RotaryTable) -> None:
        super().__init__()
        p, w = f"model.layers.{layer}.", weights.dense
        self.input_layernorm = RMSNorm(w[p + "input_layernorm.weight"], args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w[p + "post_attention_layernorm.weight"], args.rms_norm_eps)
        self.self_attn = Attention(args, layer, weights, rope)
        self.mlp = MLP(args, layer, weights)

    def forward(self, x: torch.Tensor, ctx: Context, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, kv)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x), ctx)
        return out


class CausalLM(nn.Module):
    """hidden = forward(ctx, kv_caches); logits = compute_logits(hidden, ctx) for the rows to sample."""

    def __init__(self, args: ModelArgs, weights: ModelWeights, rope: RotaryTable) -> None:
        super().__init__()
        self.args = args
        w = weights.dense
        self.embed_tokens: nn.Module = Embedding(w["model.embed_tokens.weight"])
        self.layers = nn.ModuleList([DecoderLayer(args, i, weights, rope) for i in range(args.num_layers)])
        self.norm = RMSNorm(w["model.norm.weight"], args.rms_norm_eps)
        head = w["model.embed_tokens.weight"] if args.tie_word_embeddings else w["lm_head.weight"]
        self.lm_head: nn.Module = LMHead(head, tied=args.tie_word_embeddings)

    def forward(self, ctx: Context, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = self.embed_tokens(ctx.input_ids, ctx)  # [T, hidden]
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, ctx, kv)
        result: torch.Tensor = self.norm(x)
        return result

    def compute_logits(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        """float32 [N, vocab] for the tokens in ``ctx.logits_indices``."""
        selected = hidden[ctx.logits_indices]
        logits: torch.Tensor = self.lm_head(selected, ctx)
        return logits.float()
