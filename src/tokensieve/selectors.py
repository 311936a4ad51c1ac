"""ALVTS selectors: per decoder layer, low-rank copies of W_Q and W_K that score visual tokens.

Spec: ALGORITHMS.md section 2 (arXiv 2606.14277). A selector of rank R replaces a projection
W (D_out x D_in) by A B with A (D_out x R), B (R x D_in), initialised from the truncated SVD
W = U S V^T as A = U_R sqrt(S_R), B = sqrt(S_R) V_R^T; the projection's bias is kept.
The selector sees what its layer would see: the layer's input layernorm, the per-head q/k norms
where the model has them (Qwen3), and the layer's rotary position embedding.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .attention import queries_keys
from .ops.alvts import alvts_scores


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a selector projects and multiplies in for activations of `dtype`: the half precision
    the layer itself computes attention in, else float32 (softmax and sums are always float32)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


@dataclass
class LowRank:
    """W ~ a @ b: a (D_out, R), b (R, D_in), float32."""

    a: torch.Tensor
    b: torch.Tensor

    @staticmethod
    def from_svd(weight: torch.Tensor, rank: int) -> "LowRank":
        """Truncated SVD of weight (D_out, D_in) at rank min(rank, D_out, D_in)."""
        rank = min(rank, *weight.shape)
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        root = s[:rank].sqrt()
        return LowRank(a=u[:, :rank] * root, b=root[:, None] * vh[:rank])

    def project(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x (..., D_in) -> (..., D_out), computed in `dtype`."""
        return (x.to(dtype) @ self.b.T.to(dtype)) @ self.a.T.to(dtype)


@dataclass
class LayerSelector:
    """Low-rank query and key projections of one decoder layer."""

    query: LowRank
    key: LowRank

    def parameters(self) -> list[torch.Tensor]:
        return [self.query.a, self.query.b, self.key.a, self.key.b]


def layer_scores(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    item: torch.Tensor,
    valid: torch.Tensor,
    selector: LayerSelector | None = None,
    max_items: int | None = None,
) -> torch.Tensor:
    """ALVTS scores of the visual rows of one layer's input; selector None is the full-rank oracle.

    Args:
        layer: the decoder layer (input_layernorm, self_attn.q_proj/k_proj).
        hidden: (B, S, D) the layer's input.
        rotary: (cos, sin), each (B or 1, S, d): the layer's position embeddings.
        item: (B, S) visual item per row, -1 for text.
        valid: (B, S) bool, False at padding.
        max_items: the most visual items in one batch row when the caller knows it (None: read
            from `item`, one device-to-host copy).
    Returns:
        (B, S) float32 scores, 0 on text rows.

    Precision: queries, keys and logits in the layer's own half precision when `hidden` is float16
    or bfloat16 (what the layer itself computes attention from; on a GPU this is the difference
    between tensor-core and float32 matmuls), otherwise float32; the softmax and every sum after it
    are float32.
    """
    low_rank = None if selector is None else (selector.query, selector.key)
    q, k = queries_keys(layer, hidden, rotary, low_rank=low_rank, dtype=score_dtype(hidden.dtype))
    return alvts_scores(q, k, item, valid, max_items)


def weight_fingerprint(layers: torch.nn.ModuleList) -> str:
    """A short hash of every layer's q/k projection weights (identifies the model selectors fit)."""
    digest = hashlib.sha256()
    for layer in layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            w = linear.weight.detach().float().cpu()
            digest.update(str(tuple(w.shape)).encode())
            digest.update(w[:: max(1, w.shape[0] // 16), :: max(1, w.shape[1] // 16)].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model_type: str, layers: torch.nn.ModuleList) -> dict:
    attn = layers[0].self_attn
    return {
        "model_type": model_type,
        "num_layers": len(layers),
        "hidden_size": attn.q_proj.in_features,
        "query_width": attn.q_proj.out_features,
        "key_width": attn.k_proj.out_features,
        "fingerprint": weight_fingerprint(layers),
    }


class SelectorMismatchError(ValueError):
    """Selectors fitted on one model were given to another."""


@dataclass
class Selectors:
    """One LayerSelector per decoder layer (None where a layer has none), with what they were fit on.

    Attributes:
        layers: list over decoder layers.
        identity: model_type, num_layers, widths and weight fingerprint of the model.
        fidelity: per layer, before/after-fit top-k overlap and score MSE (from calibration).
    """

    layers: list[LayerSelector | None]
    identity: dict
    fidelity: list[dict] | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> "Selectors":
        """A copy whose factors live on `device` in `dtype` (once per compress, not per layer call)."""
        moved = [None if s is None else LayerSelector(*(LowRank(p.a.to(device, dtype), p.b.to(device, dtype))
                                                        for p in (s.query, s.key)))
                 for s in self.layers]
        return Selectors(moved, self.identity, self.fidelity)

    def check_model(self, identity: dict) -> None:
        """SelectorMismatchError naming every field that differs."""
        diffs = [f"{k}: selectors {self.identity.get(k)!r}, model {v!r}" for k, v in identity.items()
                 if self.identity.get(k) != v]
        if diffs:
            raise SelectorMismatchError(
                "these ALVTS selectors were calibrated on a different model (" + "; ".join(diffs) + "); "
                "run tokensieve.calibrate_alvts (or `tokensieve calibrate`) on this model"
            )

    def save(self, path: str | Path) -> None:
        tensors = {}
        for i, s in enumerate(self.layers):
            if s is not None:
                for name, t in zip(("q_a", "q_b", "k_a", "k_b"), s.parameters()):
                    tensors[f"layer{i}.{name}"] = t.detach().float().contiguous().cpu()
        metadata = {"identity": json.dumps(self.identity), "fidelity": json.dumps(self.fidelity)}
        save_file(tensors, str(path), metadata=metadata)

    @staticmethod
    def load(path: str | Path) -> "Selectors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "identity" not in metadata:
            raise ValueError(f"{path} is not a tokensieve selectors file (no model identity in its metadata)")
        tensors = load_file(str(path))
        identity = json.loads(metadata["identity"])
        layers: list[LayerSelector | None] = []
        for i in range(identity["num_layers"]):
            if f"layer{i}.q_a" in tensors:
                t = [tensors[f"layer{i}.{n}"] for n in ("q_a", "q_b", "k_a", "k_b")]
                layers.append(LayerSelector(LowRank(t[0], t[1]), LowRank(t[2], t[3])))
            else:
                layers.append(None)
        return Selectors(layers, identity, json.loads(metadata.get("fidelity", "null")))


def svd_selectors(model_type: str, layers: torch.nn.ModuleList, rank: int, start_layer: int = 0) -> Selectors:
    """Selectors initialised by truncated SVD of every layer's W_Q and W_K from start_layer on.

    Each projection's rank is clipped to its own full rank (K is narrower under grouped-query attention).
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    selected: list[LayerSelector | None] = [None] * len(layers)
    for i in range(start_layer, len(layers)):
        attn = layers[i].self_attn
        selected[i] = LayerSelector(LowRank.from_svd(attn.q_proj.weight, rank), LowRank.from_svd(attn.k_proj.weight, rank))
    return Selectors(selected, model_identity(model_type, layers))
