"""ALVTS selectors: per decoder layer, low-rank copies of W_Q and W_K that score visual tokens.

See docs/methods.md, "ALVTS selectors and calibration" (arXiv 2606.14277). A selector of rank R replaces a projection
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
    v2v_rows: str = "all",
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
        v2v_rows: what the V2V mean divides by ("all" or "attending"; see `alvts_scores`).
    Returns:
        (B, S) float32 scores, 0 on text rows.

    Precision: queries, keys and logits in the layer's own half precision when `hidden` is float16
    or bfloat16 (what the layer itself computes attention from; on a GPU this is the difference
    between tensor-core and float32 matmuls), otherwise float32; the softmax and every sum after it
    are float32.
    """
    low_rank = None if selector is None else (selector.query, selector.key)
    q, k = queries_keys(layer, hidden, rotary, low_rank=low_rank, dtype=score_dtype(hidden.dtype))
    return alvts_scores(q, k, item, valid, max_items, v2v_rows)


# A model's identity must not depend on the dtype or device it is loaded in. Casting moves each weight
# by up to half a bfloat16 step (2^-8 of it, the coarsest common dtype), and float16 after float32 can
# round a value to the other side of any bin a hash of rounded values would use, so the weights are
# compared numerically instead: a few signed sums of a sample of each q/k projection, equal up to
# SIGNATURE_TOLERANCE of the sample's norm (a cast moves them by about 0.2% of it, another model by
# about all of it).
SIGNATURE_SUMS = 8
SIGNATURE_TOLERANCE = 1 / 64
FINGERPRINT_KEYS = ("fingerprint", "weight_signature")


def check_weights_loaded(layers: torch.nn.ModuleList) -> None:
    """ValueError when the q/k projection weights selectors are built from and checked against are on
    the meta device (a model built under torch.device("meta") or init_empty_weights, never loaded)."""
    empty = [i for i, layer in enumerate(layers) if any(linear.weight.is_meta for linear in projections(layer))]
    if empty:
        raise ValueError(
            f"the model's weights are not loaded: the q/k projections of decoder layers {compact(empty)} are on the "
            "meta device (a model built under torch.device('meta') or init_empty_weights); load the model's "
            "weights first (e.g. with from_pretrained), then build or check ALVTS selectors on it"
        )


def projections(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    return layer.self_attn.q_proj, layer.self_attn.k_proj


def weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """About 16 x 16 entries of a weight on a regular grid, float32 on the host (sampled where the
    weight lives: only the sample is copied)."""
    w = weight.detach()
    return w[:: max(1, w.shape[0] // 16), :: max(1, w.shape[1] // 16)].float().cpu()


def weight_fingerprint(layers: torch.nn.ModuleList) -> str:
    """A short hash of every layer's q/k projection weights in their loaded dtype.

    Depends on the dtype: selectors files identify their model by `weight_signature` (dtype-free);
    this hash is still stored so files stay readable by older versions, and checked only for files
    that have no signature.
    """
    digest = hashlib.sha256()
    for layer in layers:
        for linear in projections(layer):
            digest.update(str(tuple(linear.weight.shape)).encode())
            digest.update(weight_sample(linear.weight).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def signed_sums(sample: torch.Tensor) -> list[float]:
    """[norm, SIGNATURE_SUMS sums of the sample's entries under fixed pseudo-random signs] (float64)."""
    x = sample.flatten().double()
    i = torch.arange(1, x.numel() + 1, dtype=torch.int64)
    j = torch.arange(SIGNATURE_SUMS, dtype=torch.int64)[:, None]
    bits = ((i * (2 * j + 1) * 0x9E3779B1) & 0xFFFFFFFF) >> 31  # a Weyl sequence's top bit per (sum, entry)
    sums = ((1 - 2 * bits).double() * x).sum(dim=1)
    return [float(f"{v:.7g}") for v in [x.norm().item(), *sums.tolist()]]


def weight_signature(layers: torch.nn.ModuleList) -> list[list[list[float]]]:
    """Per layer, the signed sums of its q and k projection weights (see `signed_sums`)."""
    return [[signed_sums(weight_sample(linear.weight)) for linear in projections(layer)] for layer in layers]


def signature_matches(a: list[float], b: list[float]) -> bool:
    """Whether two projections' signed sums agree up to SIGNATURE_TOLERANCE of their norm."""
    tolerance = SIGNATURE_TOLERANCE * max(abs(a[0]), abs(b[0]))
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b))


def differing_layers(stored: list, model: list) -> list[int]:
    """Layers whose q or k signed sums differ (every layer when the layer counts differ)."""
    if len(stored) != len(model):
        return list(range(max(len(stored), len(model))))
    return [i for i, (s, m) in enumerate(zip(stored, model))
            if len(s) != len(m) or not all(signature_matches(x, y) for x, y in zip(s, m))]


def fingerprint_differences(stored: dict, model: dict) -> list[str]:
    """What differs between the weights selectors were fit on (`stored` identity) and a model's.

    A stored `weight_signature` is compared with tolerance, so a change of dtype or device keeps the
    identity; files saved before it have only the dtype-dependent `fingerprint`, compared exactly.
    """
    if "weight_signature" in stored and "weight_signature" in model:
        layers = differing_layers(stored["weight_signature"], model["weight_signature"])
        if not layers:
            return []
        return [f"weight fingerprint: the q/k weights of decoder layers {compact(layers)} differ by more than a "
                "change of dtype explains"]
    if stored.get("fingerprint") == model.get("fingerprint"):
        return []
    return [f"fingerprint: selectors {stored.get('fingerprint')!r}, model {model.get('fingerprint')!r} (a file "
            "saved before dtype-independent fingerprints matches its model only in the dtype it was calibrated in: "
            "load the model in that dtype, or calibrate again for a file that matches in any dtype)"]


def compact(indices: list[int]) -> str:
    """[1, 2, 3] -> "1..3"; other lists as they are."""
    if len(indices) > 2 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return str(indices)


def model_identity(model_type: str, layers: torch.nn.ModuleList) -> dict:
    check_weights_loaded(layers)
    attn = layers[0].self_attn
    return {
        "model_type": model_type,
        "num_layers": len(layers),
        "hidden_size": attn.q_proj.in_features,
        "query_width": attn.q_proj.out_features,
        "key_width": attn.k_proj.out_features,
        "fingerprint": weight_fingerprint(layers),
        "weight_signature": weight_signature(layers),
    }


class SelectorMismatchError(ValueError):
    """Selectors fitted on one model were given to another."""


@dataclass(eq=False)
class Selectors:
    """One LayerSelector per decoder layer (None where a layer has none), with what they were fit on.

    Compared and hashed by identity (they hold tensors), so a method holding them, e.g.
    `ALVTS(selectors=...)`, compares, hashes and prints as a dataclass should.

    Attributes:
        layers: list over decoder layers.
        identity: model_type, num_layers, widths and weight fingerprints of the model (`model_identity`).
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

    def __repr__(self) -> str:
        fitted = [i for i, s in enumerate(self.layers) if s is not None]
        return (
            f"Selectors(layers={compact(fitted)} of {len(self.layers)}, rank={self.rank}, "
            f"model_type={self.identity.get('model_type')!r}, fingerprint={self.identity.get('fingerprint')!r})"
        )

    @property
    def rank(self) -> int | None:
        """The largest query-selector rank (key selectors may be narrower under grouped-query attention)."""
        ranks = [s.query.a.shape[1] for s in self.layers if s is not None]
        return max(ranks, default=None)

    def check_model(self, identity: dict) -> None:
        """SelectorMismatchError naming every field that differs (the weights up to a change of dtype)."""
        diffs = [f"{k}: selectors {self.identity.get(k)!r}, model {v!r}" for k, v in identity.items()
                 if k not in FINGERPRINT_KEYS and self.identity.get(k) != v]
        diffs += fingerprint_differences(self.identity, identity)
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
    Layers that share their projections (the speed benchmark's tied layers) share one decomposition.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    check_weights_loaded(layers)
    selected: list[LayerSelector | None] = [None] * len(layers)
    decomposed: dict[tuple[int, int], LayerSelector] = {}
    for i in range(start_layer, len(layers)):
        attn = layers[i].self_attn
        weights = (id(attn.q_proj.weight), id(attn.k_proj.weight))
        if weights not in decomposed:
            decomposed[weights] = LayerSelector(LowRank.from_svd(attn.q_proj.weight, rank),
                                                LowRank.from_svd(attn.k_proj.weight, rank))
        selected[i] = decomposed[weights]
    return Selectors(selected, model_identity(model_type, layers))
