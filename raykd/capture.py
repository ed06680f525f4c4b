"""Feature capture from Hugging Face causal LMs (the attention-level KD losses live in raykd.losses.attention).

Pure torch (no Ray). Everything is obtained with forward hooks registered only on the layers asked
for, so the model keeps its own attention kernel (sdpa / flash): nothing here needs
``attn_implementation="eager"`` or ``output_attentions=True``.

* :func:`decoder_layers` finds the decoder-layer ``ModuleList`` of a causal LM.
* :func:`store_for_autocast` keeps a frozen model's decoder matmul weights in autocast's dtype (no per-call casts).
* :class:`Capture` records, per requested layer, the layer output ``[B,T,H]``, the post-rotary
  ``q [B,nh,T,hd]`` / ``k, v [B,nkv,T,hd]`` (as :class:`QKV`), and the kwargs the layer was called with.
* :func:`run_layers` re-runs decoder layers ``start..end`` plus the final norm on another hidden state
  (block-wise KD: feed one model's hidden state through the rest of a model).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "QKV",
    "Capture",
    "LayerKwargs",
    "decoder_layers",
    "final_norm",
    "run_layers",
]

# (owner attribute, layers attribute, final-norm attribute) per HF family.
_LAYOUTS = (
    ("model", "layers", "norm"),  # Llama, Qwen2/3, Mistral, Gemma, Phi3, Olmo, Granite ...
    ("transformer", "h", "ln_f"),  # GPT-2, GPT-J, Bloom-style
    ("gpt_neox", "layers", "final_layer_norm"),  # GPT-NeoX / Pythia
)
# KV-cache kwargs of decoder layers: ``cache`` from transformers 5.24 on (was ``past_key_values``), older
# spellings and GPT-2's ``layer_past``. Any kwarg holding a ``*Cache`` object is dropped too, whatever its name.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


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


def store_for_autocast(model, dtype: torch.dtype | None) -> int:
    """A frozen model's decoder-layer Linear weights stored in autocast's `dtype` (None: unchanged), the number converted.
    Autocast casts a frozen fp32 weight on every call (it caches only leaves that require grad): same products, no casts.
    Norms, embeddings and the head keep fp32 (so does the residual stream); outside autocast, reload the model."""
    if dtype is None:
        return 0
    n = 0
    for m in decoder_layers(model).modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 and not m.weight.requires_grad:
            n += sum(p.numel() for p in m.parameters())
            m.to(dtype)
    return n


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


def attention_module(layer: nn.Module) -> nn.Module:
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
        attn = attention_module(self.layers[j])
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
            kw = LayerKwargs(_without_cache(kwargs))  # do not keep the KV cache alive; run_layers never uses it
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
        kwargs = _without_cache(kw)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        out = layers[idx](h, *args, **kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out
    return final_norm(model)(h)


def _is_cache(x) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(x).__mro__)


def _without_cache(kwargs: Mapping) -> dict:
    """A copy of layer kwargs with every KV cache set to None (by name, or by value type for renamed ones).

    A cache passed back to a layer would be appended to and attended over: the keys grow to
    ``[B, nkv, T_cached + T, hd]`` against a ``[B, 1, T, T]`` mask, or (sdpa, causal, no mask) the stale
    cached keys of the captured forward are used instead of the new hidden state's.
    """
    return {k: None if k in _CACHE_KWARGS or _is_cache(v) else v for k, v in kwargs.items()}
