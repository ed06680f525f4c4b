"""Feature capture from Hugging Face causal LMs, and the attention-level KD losses built on it.

Pure torch (no Ray). Everything is obtained with forward hooks registered only on the layers asked
for, so the model keeps its own attention kernel (sdpa / flash): nothing here needs
``attn_implementation="eager"`` or ``output_attentions=True``.

* :func:`decoder_layers` finds the decoder-layer ``ModuleList`` of a causal LM.
* :class:`Capture` records, per requested layer, the layer output ``[B,T,H]``, the post-rotary
  ``q [B,nh,T,hd]`` / ``k, v [B,nkv,T,hd]`` (as :class:`QKV`), and the kwargs the layer was called with.
* :func:`run_layers` re-runs decoder layers ``start..end`` plus the final norm on another hidden state
  (block-wise KD: feed one model's hidden state through the rest of a model).
* :func:`attention_kl` is attention-map distillation, KL(teacher attention || student attention)
  per query row (TinyBERT, Jiao et al., 2020, arXiv:1909.10351; MiniLM, Wang et al., NeurIPS 2020,
  arXiv:2002.10957).
* :func:`relation_loss` is MiniLMv2 multi-head self-attention relation distillation (Wang et al.,
  Findings of ACL 2021, arXiv:2012.15828): q-q, k-k and v-v scaled-dot-product relations over
  ``R`` relation heads, which works across different head counts and widths.

Masking conventions shared by the losses: keys are causal (key ``j`` visible from query ``i`` iff
``j <= i``; additionally ``i - j < sliding_window`` when the layer has one), keys whose ``mask`` entry
is False are hidden (the query's own position always stays visible, so no row is empty), and query
rows whose ``mask`` entry is False do not count. Losses are means over the valid ``(batch, row)``
pairs (token-weighted across the batch) and over heads. All scores are computed in fp32 from
log-softmax, over chunks of ``q_chunk`` query rows; with autograd on, each chunk is recomputed in
backward (``torch.utils.checkpoint``), so only ``[B, heads, q_chunk, T]`` tensors ever exist at once.
The teacher side is always detached.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = [
    "QKV",
    "Capture",
    "LayerKwargs",
    "attention_kl",
    "attention_probs",
    "decoder_layers",
    "default_relation_heads",
    "final_norm",
    "relation_loss",
    "run_layers",
]

# (owner attribute, layers attribute, final-norm attribute) per HF family.
_LAYOUTS = (
    ("model", "layers", "norm"),  # Llama, Qwen2/3, Mistral, Gemma, Phi3, Olmo, Granite ...
    ("transformer", "h", "ln_f"),  # GPT-2, GPT-J, Bloom-style
    ("gpt_neox", "layers", "final_layer_norm"),  # GPT-NeoX / Pythia
)
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _base(model: nn.Module) -> tuple[nn.Module, str, str]:
    for owner, layers, norm in _LAYOUTS:
        base = getattr(model, owner, None)
        if base is not None and isinstance(getattr(base, layers, None), nn.ModuleList):
            return base, layers, norm
    for _, layers, norm in _LAYOUTS:  # `model` is already the base model
        if isinstance(getattr(model, layers, None), nn.ModuleList):
            return model, layers, norm
    tried = "model.layers, transformer.h, gpt_neox.layers"
    raise ValueError(f"cannot find decoder layers in {type(model).__name__} (tried {tried})")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of an HF causal LM (``*ForCausalLM`` or its base model)."""
    base, layers, _ = _base(model)
    return getattr(base, layers)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (``model.model.norm`` for Llama-style models)."""
    base, _, norm = _base(model)
    mod = getattr(base, norm, None)
    if mod is None:
        raise ValueError(f"cannot find the final norm `{norm}` of {type(model).__name__}")
    return mod


@dataclass
class QKV:
    """Post-rotary attention inputs of one layer, as the attention kernel sees them.

    q: [B, num_heads, T, head_dim]; k, v: [B, num_kv_heads, T, head_dim] (v is None unless captured).
    Query head ``h`` attends with kv head ``h // (num_heads // num_kv_heads)`` (GQA, as HF ``repeat_kv``).
    ``scaling`` multiplies q k^T (``head_dim**-0.5`` for most models). ``sliding_window`` and
    ``softcap`` (tanh logit soft-capping, Gemma-2) are None when the layer has none.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    sliding_window: int | None = None
    softcap: float | None = None


class LayerKwargs(dict):
    """The kwargs a decoder layer was called with; ``.args`` holds positional args after the hidden state."""

    args: tuple = ()


def _attn_module(layer: nn.Module) -> nn.Module:
    for name in ("self_attn", "attention", "attn", "self_attention"):
        mod = getattr(layer, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(f"cannot find the attention module of {type(layer).__name__}")


def _rotary_fn(attn: nn.Module):
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return fn if callable(fn) else None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B,nh,T,hd], k [B,nkv,T,hd]; cos/sin [B,T,hd] -> rotated (q, k), via the family's own function."""
    fn = _rotary_fn(attn)
    if fn is not None:
        try:
            return fn(q, k, cos, sin)
        except TypeError:  # a family-specific signature (e.g. multimodal rope): use the standard formula
            pass
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _per_head_norm(norm: nn.Module, x: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """Apply a q_norm/k_norm to x [B,T,heads*hd]: per head (Qwen3, Gemma3) or over all heads (Olmo2)."""
    w = getattr(norm, "weight", None)
    if w is not None and w.numel() == heads * hd and heads > 1:
        return norm(x)
    return norm(x.unflatten(-1, (heads, hd))).flatten(-2)


class Capture:
    """Context manager recording features of chosen decoder layers during a forward pass.

    ``with Capture(model, hidden=[i], qkv=[j], layer_inputs=[k]) as cap: model(input_ids=ids)`` gives

    * ``cap.hidden[i]``: output of decoder layer ``i``, [B,T,H] (the pre-final-norm residual stream);
      it carries the autograd graph when the forward does.
    * ``cap.qkv[j]``: :class:`QKV` with post-rotary q/k (and v if ``want_v``), taken from forward hooks
      on ``q_proj``/``k_proj``/``v_proj`` (or a fused ``qkv_proj``), the model's own ``q_norm``/``k_norm``
      when it has them, and ``position_embeddings=(cos, sin)`` from a pre-hook on the attention module;
      rotary uses the family's ``apply_rotary_pos_emb`` (falling back to the rotate-half formula).
    * ``cap.layer_inputs[k]``: :class:`LayerKwargs` of layer ``k`` (attention_mask, position_embeddings,
      position_ids, ...) for :func:`run_layers`.

    Hooks go only on the requested layers and are removed on exit; captured values stay readable
    after exit and are overwritten by every further forward. Negative indices count from the end.
    Works under ``torch.no_grad`` and with HF activation checkpointing in its default non-reentrant
    mode (layer hooks sit outside the checkpointed ``forward``; q/k/v hooks only keep references). With
    ``use_reentrant=True`` the inside of a checkpointed layer runs under no_grad, so q/k/v carry no grad.
    """

    def __init__(
        self,
        model: nn.Module,
        hidden: Iterable[int] = (),
        qkv: Iterable[int] = (),
        layer_inputs: Iterable[int] = (),
        want_v: bool = True,
    ) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        n = len(self.layers)

        def norm(ids: Iterable[int], what: str) -> list[int]:
            out = []
            for i in ids:
                if not -n <= int(i) < n:
                    raise ValueError(f"Capture({what}=...): layer {i} out of range for a {n}-layer model")
                out.append(int(i) % n)
            return sorted(set(out))

        self.hidden_ids = norm(hidden, "hidden")
        self.qkv_ids = norm(qkv, "qkv")
        self.layer_input_ids = norm(layer_inputs, "layer_inputs")
        self.want_v = want_v
        self.hidden: dict[int, torch.Tensor] = {}
        self._qkv: dict[int, QKV] = {}
        self._pending: dict[int, tuple[nn.Module, dict, bool]] = {}
        self.layer_inputs: dict[int, LayerKwargs] = {}
        self._handles: list = []
        self._raw: dict[int, dict] = {}
        for j in self.qkv_ids:  # fail fast, before any hook exists
            self._qkv_modules(j)

    # -- hook installation -------------------------------------------------------------------
    def _qkv_modules(self, j: int) -> tuple[nn.Module, dict[str, nn.Module]]:
        attn = _attn_module(self.layers[j])
        if all(isinstance(getattr(attn, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj")):
            mods = {"q": attn.q_proj, "k": attn.k_proj}
            if self.want_v:
                mods["v"] = attn.v_proj
        elif isinstance(getattr(attn, "qkv_proj", None), nn.Module):  # Phi-3 style fused projection
            mods = {"qkv": attn.qkv_proj}
        else:
            name = type(attn).__name__
            raise ValueError(f"qkv capture needs q_proj/k_proj/v_proj (or qkv_proj) on {name} of layer {j}")
        return attn, mods

    def __enter__(self) -> Capture:
        try:
            for i in self.hidden_ids:
                self._handles.append(self.layers[i].register_forward_hook(self._hidden_hook(i)))
            for k in self.layer_input_ids:
                self._handles.append(
                    self.layers[k].register_forward_pre_hook(self._inputs_hook(k), with_kwargs=True)
                )
            for j in self.qkv_ids:
                attn, mods = self._qkv_modules(j)
                self._raw[j] = {}
                self._handles.append(attn.register_forward_pre_hook(self._attn_pre_hook(j), with_kwargs=True))
                for name, mod in mods.items():
                    self._handles.append(mod.register_forward_hook(self._proj_hook(j, name)))
                self._handles.append(attn.register_forward_hook(self._attn_hook(j, attn)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent); captured tensors are kept."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._raw.clear()

    def clear(self) -> None:
        """Drop captured tensors (frees their graphs)."""
        self.hidden.clear()
        self._qkv.clear()
        self._pending.clear()
        self.layer_inputs.clear()

    @property
    def qkv(self) -> dict[int, QKV]:
        """``{layer: QKV}``. Assembled (norms, rotary) on first access after a forward, not inside it:
        the hooks only keep references, so no op of ours runs inside an activation-checkpointed layer
        (whose recomputation would otherwise see a different graph)."""
        for j, (attn, raw, grad) in list(self._pending.items()):
            with torch.set_grad_enabled(grad):  # the grad mode of the forward that produced them
                self._qkv[j] = self._assemble(attn, raw)
            del self._pending[j]
        return self._qkv

    # -- hooks -------------------------------------------------------------------------------
    def _hidden_hook(self, i: int):
        def hook(module, args, output):
            self.hidden[i] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _inputs_hook(self, k: int):
        def hook(module, args, kwargs):
            kw = LayerKwargs(kwargs)
            for name in _CACHE_KWARGS:  # do not keep the KV cache alive; run_layers never uses it
                if name in kw:
                    kw[name] = None
            kw.args = tuple(None if _is_cache(a) else a for a in args[1:])
            self.layer_inputs[k] = kw

        return hook

    def _attn_pre_hook(self, j: int):
        def hook(module, args, kwargs):
            raw = self._raw[j]
            raw.clear()
            raw["rope"] = kwargs.get("position_embeddings")

        return hook

    def _proj_hook(self, j: int, name: str):
        def hook(module, args, output):
            self._raw[j][name] = output

        return hook

    def _attn_hook(self, j: int, attn: nn.Module):
        def hook(module, args, output):
            raw = self._raw.get(j)
            if raw:
                self._pending[j] = (attn, dict(raw), torch.is_grad_enabled())
                raw.clear()

        return hook

    def _assemble(self, attn: nn.Module, raw: dict) -> QKV:
        cfg = getattr(attn, "config", None)
        hd = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if "qkv" in raw:
            nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
            q, k, v = raw["qkv"].split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            v = v if self.want_v else None
        else:
            q, k, v = raw["q"], raw["k"], raw.get("v")
        nh, nkv = q.shape[-1] // hd, k.shape[-1] // hd
        if isinstance(getattr(attn, "q_norm", None), nn.Module):
            q = _per_head_norm(attn.q_norm, q, nh, hd)
        if isinstance(getattr(attn, "k_norm", None), nn.Module):
            k = _per_head_norm(attn.k_norm, k, nkv, hd)
        # [B,T,n*hd] -> [B,n,T,hd]
        q = q.unflatten(-1, (nh, hd)).transpose(1, 2)
        k = k.unflatten(-1, (nkv, hd)).transpose(1, 2)
        if v is not None:
            v = v.unflatten(-1, (nkv, hd)).transpose(1, 2)
        if raw.get("rope") is not None:
            cos, sin = raw["rope"]
            q, k = _apply_rotary(attn, q, k, cos, sin)
        # per-layer attribute (Qwen2/3, Gemma2/3) or a model-wide config value (Mistral, Mixtral, Phi3)
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
        softcap = getattr(attn, "attn_logit_softcapping", None)
        return QKV(
            q=q,
            k=k,
            v=v,
            num_heads=nh,
            num_kv_heads=nkv,
            head_dim=hd,
            scaling=float(getattr(attn, "scaling", hd**-0.5)),
            sliding_window=int(window) if isinstance(window, int) and window > 0 else None,
            softcap=float(softcap) if softcap else None,
        )


def run_layers(
    model: nn.Module,
    hidden: torch.Tensor,
    start: int,
    layer_kwargs: Mapping,
) -> torch.Tensor:
    """Run decoder layers ``start..end`` and the final norm on ``hidden`` [B,T,H]; returns [B,T,H].

    ``layer_kwargs`` is either one :class:`LayerKwargs`/dict used for every layer (fine for Llama-style
    models, whose layers all get the same kwargs), or a mapping ``{layer index: kwargs}`` covering
    ``start..end`` (e.g. ``cap.layer_inputs`` captured for those layers; needed when layer types get
    different masks or rotary tables, e.g. sliding/full alternation in Qwen2/Gemma). KV caches are
    dropped and ``use_cache=False``, so re-running never appends to a cache. Autograd flows to
    ``hidden`` (and to the layers' params if they require grad). ``start == len(layers)`` only normalizes.

    The kwargs belong to the attention implementation they were captured under (sdpa passes
    ``attention_mask=None`` to mean "causal", which eager would read as "no mask"): run the layers under
    the same ``config._attn_implementation``.
    """
    layers = decoder_layers(model)
    n = len(layers)
    start = start + n if start < 0 else start
    if not 0 <= start <= n:
        raise ValueError(f"run_layers: start={start} out of range for a {n}-layer model")
    per_layer = bool(layer_kwargs) and all(isinstance(key, int) for key in layer_kwargs)
    h = hidden
    for idx in range(start, n):
        if per_layer and idx not in layer_kwargs:
            raise ValueError(f"run_layers: no kwargs for layer {idx} (capture layer_inputs={start}..{n - 1})")
        kw = layer_kwargs[idx] if per_layer else layer_kwargs
        args = tuple(None if _is_cache(a) else a for a in getattr(kw, "args", ()))
        kwargs = dict(kw)
        for name in _CACHE_KWARGS:
            if name in kwargs:
                kwargs[name] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        out = layers[idx](h, *args, **kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out
    return final_norm(model)(h)


def _is_cache(x) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(x).__mro__)


# ---------------------------------------------------------------------------------------------
# attention maps
# ---------------------------------------------------------------------------------------------
def _causal_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    row0: int,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Masked fp32 attention logits of query rows ``row0..row0+c``.

    q [B,H,c,d], k [B,Hkv,T,d] with Hkv | H (GQA groups as HF repeat_kv, without materializing it);
    key_mask [B,T] bool or None. Returns [B,H,c,T] with -inf at hidden keys (the diagonal is kept).
    """
    B, H, c, d = q.shape
    hkv, T = k.shape[1], k.shape[2]
    if H % hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({hkv})")
    qg = q.float().reshape(B, hkv, H // hkv, c, d)
    s = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)).reshape(B, H, c, T) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    rows = torch.arange(row0, row0 + c, device=q.device)[:, None]
    cols = torch.arange(T, device=q.device)[None, :]
    allowed = cols <= rows  # [c,T]
    if sliding_window is not None:
        allowed = allowed & (cols > rows - sliding_window)
    if key_mask is not None:
        allowed = (key_mask.to(torch.bool)[:, None, :] & allowed) | (cols == rows)  # [B,c,T]
        allowed = allowed[:, None]
    return s.masked_fill(~allowed, float("-inf"))


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal softmax(q k^T * scaling) in fp32: q [B,H,T,d], k [B,Hkv,T,d] -> [B,H,T,T].

    GQA: query head h uses kv head h // (H // Hkv). Reference helper (materializes the full map).
    """
    return torch.softmax(_causal_logits(q, k, scaling, 0, key_mask, sliding_window, softcap), dim=-1)


def _kl_rows(ls: torch.Tensor, lt: torch.Tensor, average_heads: bool) -> torch.Tensor:
    """Per-row KL(teacher || student) from log-probs ls/lt [B,Hs|Ht,c,T]; -> [B,H',c]."""
    if average_heads:  # log of the head-averaged probabilities
        ls = torch.logsumexp(ls, dim=1, keepdim=True) - math.log(ls.shape[1])
        lt = torch.logsumexp(lt, dim=1, keepdim=True) - math.log(lt.shape[1])
    pt = lt.exp()
    return torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(pt)).sum(-1)


def _chunked_kl(
    qs, ks, sc_s, qt, kt, sc_t, mask, q_chunk, kw_s=None, kw_t=None, checkpoint=True
) -> torch.Tensor:
    """Mean over valid rows and heads of KL(teacher map || student map), chunked over query rows."""
    B, Hs, T, _ = qs.shape
    Ht = qt.shape[1]
    if qt.shape[0] != B or qt.shape[2] != T or ks.shape[2] != T or kt.shape[2] != T:
        raise ValueError(f"student/teacher batch or length differ: {tuple(qs.shape)} vs {tuple(qt.shape)}")
    if q_chunk < 1:
        raise ValueError(f"q_chunk must be >= 1, got {q_chunk}")
    kw_s, kw_t = kw_s or {}, kw_t or {}
    average = Hs != Ht
    qt, kt = qt.detach(), kt.detach()
    if mask is not None:
        mask = mask.to(device=qs.device, dtype=torch.bool)
        if mask.shape != (B, T):
            raise ValueError(f"mask must be [B,T]={B, T}, got {tuple(mask.shape)}")
        n_rows = mask.sum()
    else:
        n_rows = torch.tensor(B * T, device=qs.device)
    heads = 1 if average else Hs

    def chunk_loss(q_s, k_s, row0: int):
        ls = torch.log_softmax(_causal_logits(q_s, k_s, sc_s, row0, mask, **kw_s), dim=-1)
        with torch.no_grad():
            q_t = qt[:, :, row0 : row0 + q_s.shape[2]]
            lt = torch.log_softmax(_causal_logits(q_t, kt, sc_t, row0, mask, **kw_t), dim=-1)
        kl = _kl_rows(ls, lt, average)  # [B,H',c]
        if mask is not None:
            kl = kl * mask[:, None, row0 : row0 + q_s.shape[2]]
        return kl.sum()

    use_ckpt = checkpoint and torch.is_grad_enabled() and (qs.requires_grad or ks.requires_grad)
    total = qs.new_zeros((), dtype=torch.float32)
    for row0 in range(0, T, q_chunk):
        q_s = qs[:, :, row0 : row0 + q_chunk]
        if use_ckpt:
            total = total + _checkpoint(chunk_loss, q_s, ks, row0, use_reentrant=False)
        else:
            total = total + chunk_loss(q_s, ks, row0)
    return total / (n_rows.clamp_min(1).float() * heads)


def attention_kl(
    student: QKV,
    teacher: QKV,
    mask: torch.Tensor | None = None,
    q_chunk: int = 256,
    checkpoint: bool = True,
) -> torch.Tensor:
    """Attention-map distillation loss (TinyBERT, Jiao et al. 2020; MiniLM, Wang et al. 2020): scalar.

    KL(teacher attention || student attention) for every query row over its causal keys, averaged
    over valid query rows (``mask`` [B,T] True; all rows if None; False positions are also hidden as
    keys), heads and batch. Each side uses its own ``scaling``, sliding window and soft-cap. When the
    two models have the same number of query heads, head h is matched with head h; otherwise the
    head-averaged maps ``mean_h softmax(...)`` [B,T,T] are compared. Computed in fp32 from
    log-softmax over chunks of ``q_chunk`` query rows; with ``checkpoint`` (and autograd on) each chunk
    is recomputed in backward, so at most [B,H,q_chunk,T] maps per model are alive. Gradients reach
    the student's q/k only (teacher detached).
    """
    return _chunked_kl(
        student.q, student.k, student.scaling, teacher.q, teacher.k, teacher.scaling, mask, q_chunk,
        {"sliding_window": student.sliding_window, "softcap": student.softcap},
        {"sliding_window": teacher.sliding_window, "softcap": teacher.softcap},
        checkpoint,
    )


def _widths(x) -> dict[str, int]:
    """Concatenated-head widths {'q','k','v'} of a QKV, an HF config, or a model with a config."""
    if isinstance(x, QKV):
        nh, nkv, hd = x.num_heads, x.num_kv_heads, x.head_dim
    else:
        cfg = getattr(x, "config", x)
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        nh = cfg.num_attention_heads
        nkv = getattr(cfg, "num_key_value_heads", None) or nh
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    return {"q": nh * hd, "k": nkv * hd, "v": nkv * hd}


def default_relation_heads(student, teacher, kinds: Sequence[str] = ("q", "k", "v"), max_heads: int = 64) -> int:
    """Largest R <= ``max_heads`` dividing every concatenated width involved (for :func:`relation_loss`).

    ``student``/``teacher`` are :class:`QKV` objects, HF configs, or models. The widths are
    ``num_heads*head_dim`` for q and ``num_kv_heads*head_dim`` for k/v (GQA), for both models, over
    ``kinds``. MiniLMv2 uses 48 (base) / 64 (large) relation heads; with GQA the k/v widths are small, so
    R is often limited by gcd of the k/v widths (e.g. SmolLM2-135M: q 576, k/v 192 -> R = 64 if the student
    widths allow it). Always >= 1.
    """
    ws, wt = _widths(student), _widths(teacher)
    g = 0
    for kind in kinds:
        g = math.gcd(g, math.gcd(ws[kind], wt[kind]))
    return max(r for r in range(1, max(1, min(max_heads, g)) + 1) if g % r == 0)


def _relation_heads(x: torch.Tensor, r: int) -> torch.Tensor:
    """[B,n,T,hd] -> concatenate heads [B,T,n*hd] -> R relation heads [B,R,T,n*hd/R]."""
    B, n, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, r, (n * hd) // r).transpose(1, 2)


def relation_loss(
    student: QKV,
    teacher: QKV,
    num_relation_heads: int,
    mask: torch.Tensor | None = None,
    kinds: Sequence[str] = ("q", "k", "v"),
    q_chunk: int = 256,
    checkpoint: bool = True,
) -> torch.Tensor:
    """MiniLMv2 multi-head self-attention relation distillation (Wang et al., Findings of ACL 2021): scalar.

    For each kind X in ``kinds`` (q, k, v): concatenate heads to [B,T,W] (W = nh*hd for q, nkv*hd for
    k/v), split into R = ``num_relation_heads`` relation heads of width d_r = W/R, relation
    ``softmax(X_r X_r^T / sqrt(d_r))`` over causal keys [B,R,T,T]; KL(teacher relation || student
    relation) averaged over valid query rows, relation heads and batch; then the mean over kinds.
    Teacher and student may differ in heads and widths (the relation maps are T x T either way);
    R must divide every width. q and k are the post-rotary ones (what the attention actually dots:
    their relations then encode relative position the same way in both models, and they are what
    :class:`Capture` records). No sliding window or soft-cap applies to relations.
    """
    r = int(num_relation_heads)
    for kind in kinds:
        if kind not in ("q", "k", "v"):
            raise ValueError(f"relation kinds must be among q, k, v; got {kind!r}")
        xs, xt = getattr(student, kind), getattr(teacher, kind)
        if xs is None or xt is None:
            raise ValueError(f"relation_loss needs `{kind}` captured for both models (Capture(..., want_v=True))")
        ws, wt = xs.shape[1] * xs.shape[3], xt.shape[1] * xt.shape[3]
        if r < 1 or ws % r or wt % r:
            raise ValueError(
                f"loss.relation_heads={r} must divide the student and teacher {kind} widths ({ws}, {wt}); "
                f"try {default_relation_heads(student, teacher, kinds)}"
            )
    losses = []
    for kind in kinds:
        xs = _relation_heads(getattr(student, kind), r)
        xt = _relation_heads(getattr(teacher, kind), r)
        losses.append(
            _chunked_kl(
                xs, xs, xs.shape[-1] ** -0.5, xt, xt, xt.shape[-1] ** -0.5, mask, q_chunk, checkpoint=checkpoint
            )
        )
    return torch.stack(losses).mean()
