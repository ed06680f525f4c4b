"""Tests for raykd.capture on tiny random HF models (CPU, no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from raykd.capture import QKV, Capture, decoder_layers, final_norm, run_layers
from raykd.losses.attention import (
    attention_kl,
    attention_probs,
    default_relation_heads,
    relation_loss,
)

V, B, T = 128, 2, 11
TEACHER = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2)
STUDENT = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=3, num_key_value_heads=1)


def make(cls=tf.LlamaConfig, seed=0, attn="sdpa", **kw):
    torch.manual_seed(seed)
    cfg = cls(**{**TEACHER, **kw})
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def eager_twin(model):
    """Same weights, eager attention (own config copy: `_from_config` would otherwise flip the shared one)."""
    twin = tf.AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    twin.load_state_dict(model.state_dict())
    return twin


def ids(seed=1, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (b, t), generator=g)


def n_hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def naive_kl(ps, pt, mask=None):
    """Mean over valid rows/heads of KL(pt || ps) from full probability maps [B,H,T,T]."""
    lt, ls = pt.clamp_min(1e-30).log(), ps.clamp_min(1e-30).log()  # clamp: finite grads at masked keys
    kl = torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(pt)).sum(-1)  # [B,H,T]
    if mask is None:
        return kl.mean()
    return (kl * mask[:, None]).sum() / (mask.sum() * kl.shape[1])


def capture_qkv(model, x, layer=1, grad=False, mask=None):
    with torch.set_grad_enabled(grad), Capture(model, qkv=[layer]) as cap:
        model(input_ids=x, attention_mask=mask)
    return cap.qkv[layer]


# ------------------------------------------------------------------------------------------------
# layout / hooks
# ------------------------------------------------------------------------------------------------
def test_decoder_layers_layouts():
    llama = make()
    assert decoder_layers(llama) is llama.model.layers
    assert decoder_layers(llama.model) is llama.model.layers
    assert final_norm(llama) is llama.model.norm
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2))
    assert decoder_layers(gpt2) is gpt2.transformer.h
    neox = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64))
    assert decoder_layers(neox) is neox.gpt_neox.layers
    with pytest.raises(ValueError, match="cannot find decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="q_proj"):
        Capture(gpt2, qkv=[0])


FAMILIES = {
    "llama": (tf.LlamaConfig, {}, "sdpa"),
    "qwen2": (tf.Qwen2Config, {}, "sdpa"),
    "qwen3-qk-norm": (tf.Qwen3Config, dict(head_dim=16), "sdpa"),
    "mistral-sliding": (tf.MistralConfig, dict(sliding_window=5), "sdpa"),
    "phi3-fused-partial-rope": (tf.Phi3Config, dict(partial_rotary_factor=0.5, sliding_window=None,
                                                    pad_token_id=0, eos_token_id=1, bos_token_id=1), "sdpa"),
    "gemma3-headnorm-sliding": (tf.Gemma3TextConfig, dict(head_dim=16, sliding_window=4, num_hidden_layers=3,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"]), "sdpa"),
    # Gemma-2 has no sdpa path (logit soft-capping); capture still works on eager
    "gemma2-softcap": (tf.Gemma2Config, dict(head_dim=16, sliding_window=4, attn_logit_softcapping=1.0,
                       num_hidden_layers=3,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]), "eager"),
    "olmo2-flat-qk-norm": (tf.Olmo2Config, dict(pad_token_id=0, eos_token_id=1, bos_token_id=1), "sdpa"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_probs_match_eager(family):
    """Post-rotary q/k captured from the sdpa model reproduce the eager model's attention weights (GQA 4/2)."""
    cls, kw, attn = FAMILIES[family]
    model = make(cls, attn=attn, **kw)
    eager = eager_twin(model)
    x = ids()
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 7:] = 0  # right padding in row 1
    L = model.config.num_hidden_layers
    with torch.no_grad(), Capture(model, qkv=range(L)) as cap:
        model(input_ids=x, attention_mask=am)
    with torch.no_grad():
        ref = eager(input_ids=x, attention_mask=am, output_attentions=True).attentions
    valid = am.bool()[:, None, :, None].expand(B, 4, T, T)  # padded query rows are garbage in HF
    for j in range(L):
        c = cap.qkv[j]
        assert c.q.shape == (B, 4, T, c.head_dim) and c.k.shape == (B, 2, T, c.head_dim) == c.v.shape
        assert (c.num_heads, c.num_kv_heads) == (4, 2)
        p = attention_probs(c.q, c.k, c.scaling, key_mask=am.bool(),
                            sliding_window=c.sliding_window, softcap=c.softcap)
        torch.testing.assert_close(p[valid], ref[j][valid], atol=1e-5, rtol=0)


def test_attention_probs_is_causal_softmax_and_no_padding_path():
    model = make()
    eager = eager_twin(model)
    x = ids()
    c = capture_qkv(model, x, layer=2)
    with torch.no_grad():
        ref = eager(input_ids=x, output_attentions=True).attentions[2]
    p = attention_probs(c.q, c.k, c.scaling)
    assert p.dtype == torch.float32 and p.shape == (B, 4, T, T)
    torch.testing.assert_close(p, ref, atol=1e-5, rtol=0)
    assert torch.all(p.triu(1) == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(B, 4, T))


def test_hidden_matches_output_hidden_states():
    """transformers 5.23 convention: hidden_states[0] = embeddings, hidden_states[i+1] = output of layer i
    for i < L-1, and hidden_states[L] = final-norm(output of layer L-1) (== last_hidden_state)."""
    model = make()
    L = model.config.num_hidden_layers
    x = ids()
    with torch.no_grad(), Capture(model, hidden=range(L)) as cap:
        out = model(input_ids=x, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == L + 1
    for i in range(L - 1):
        torch.testing.assert_close(cap.hidden[i], hs[i + 1], atol=0, rtol=0)
    torch.testing.assert_close(model.model.norm(cap.hidden[L - 1]), hs[L], atol=1e-6, rtol=0)
    assert not torch.allclose(cap.hidden[L - 1], hs[L])  # the last entry is post-norm


def test_logits_unchanged_and_hooks_removed():
    model = make()
    x = ids()
    before = n_hooks(model)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with Capture(model, hidden=[0, -1], qkv=[1, 3], layer_inputs=[2]) as cap:
            assert n_hooks(model) > before
            out = model(input_ids=x).logits
        assert n_hooks(model) == before
        for m in model.modules():
            assert not m._forward_hooks_with_kwargs and not m._forward_pre_hooks_with_kwargs
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert sorted(cap.hidden) == [0, 3] and sorted(cap.qkv) == [1, 3] and list(cap.layer_inputs) == [2]
    assert model.config._attn_implementation == "sdpa"


def test_only_requested_layers_hooked():
    model = make()
    layers = decoder_layers(model)
    with Capture(model, hidden=[1], qkv=[2], want_v=False):
        hooked = [n_hooks(layer) > 0 for layer in layers]
        assert hooked == [False, True, True, False]
        attn = layers[2].self_attn
        assert len(attn.v_proj._forward_hooks) == 0 and len(attn.q_proj._forward_hooks) == 1
        assert n_hooks(model.model.embed_tokens) == 0 and n_hooks(model.lm_head) == 0
    with pytest.raises(ValueError, match="out of range"):
        Capture(model, hidden=[4])


def test_capture_grad_no_grad_and_overwrite():
    model = make().train()
    x1, x2 = ids(1), ids(2)
    with Capture(model, hidden=[1], qkv=[1], want_v=False) as cap:
        with torch.no_grad():
            model(input_ids=x1)
        assert not cap.hidden[1].requires_grad and not cap.qkv[1].q.requires_grad
        assert cap.qkv[1].v is None
        first = cap.hidden[1]
        model(input_ids=x2)  # with grad: overwrites
    assert cap.hidden[1] is not first and cap.hidden[1].requires_grad and cap.qkv[1].k.requires_grad
    cap.hidden[1].sum().backward()
    assert model.model.layers[1].mlp.down_proj.weight.grad is not None
    assert model.model.layers[2].mlp.down_proj.weight.grad is None


def test_qkv_assembled_in_the_forwards_grad_mode():
    """q/k are assembled lazily (outside checkpointed regions) but keep the forward's grad mode: a no_grad
    teacher with q_norm/k_norm (Qwen3) gives graph-free tensors even when read with grad enabled."""
    cls, kw, _ = FAMILIES["qwen3-qk-norm"]
    model = make(cls, **kw)
    with Capture(model, qkv=[0]) as cap:
        with torch.no_grad():
            model(input_ids=ids())
    c = cap.qkv[0]
    assert torch.is_grad_enabled() and not c.q.requires_grad and not c.k.requires_grad
    with Capture(model, qkv=[0]) as cap:
        model(input_ids=ids())
    assert cap.qkv[0].q.requires_grad


# ------------------------------------------------------------------------------------------------
# attention_kl
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    teacher = make(seed=0)
    student = make(seed=1)  # same shape, different weights
    return teacher, student


@pytest.mark.parametrize("q_chunk", [1, 3, 4, 11, 256])
def test_attention_kl_matches_naive(pair, q_chunk):
    teacher, student = pair
    x = ids()
    t, s = capture_qkv(teacher, x), capture_qkv(student, x)
    ref = naive_kl(attention_probs(s.q, s.k, s.scaling), attention_probs(t.q, t.k, t.scaling))
    got = attention_kl(s, t, q_chunk=q_chunk)
    assert got.ndim == 0 and got.item() > 0
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_attention_kl_zero_for_identical(pair):
    teacher, _ = pair
    t = capture_qkv(teacher, ids())
    assert attention_kl(t, t, q_chunk=4).abs().item() < 1e-7


def test_attention_kl_grad_reaches_student_qk(pair):
    teacher, _ = pair
    student = make(seed=1).train()
    x = ids()
    t = capture_qkv(teacher, x)
    s = capture_qkv(student, x, grad=True, layer=1)
    loss = attention_kl(s, t, q_chunk=3)
    loss.backward()
    attn = student.model.layers[1].self_attn
    for p in (attn.q_proj.weight, attn.k_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert attn.v_proj.weight.grad is None  # attention maps do not depend on v
    g_ckpt = attn.q_proj.weight.grad.clone()
    # same gradient without chunk recomputation, and the naive map
    student.zero_grad()
    s = capture_qkv(student, x, grad=True, layer=1)
    naive_kl(attention_probs(s.q, s.k, s.scaling), attention_probs(t.q, t.k, t.scaling)).backward()
    torch.testing.assert_close(attn.q_proj.weight.grad, g_ckpt, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_kl_written_out_gradient_equals_autograd(masked, window):
    """The closed-form gradient (GQA 6 query / 2 kv heads, padding mask, sliding window, chunks that do
    not divide T) equals autograd through the naive full maps (float64 inputs; the loss computes in fp32)."""
    g = torch.Generator().manual_seed(31)
    b, t, d = 2, 9, 4
    qs, ks = torch.randn(b, 6, t, d, generator=g, dtype=torch.float64), torch.randn(b, 2, t, d, generator=g, dtype=torch.float64)
    qt, kt = torch.randn(b, 6, t, d, generator=g, dtype=torch.float64), torch.randn(b, 2, t, d, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    if masked:
        mask[0, 6:], mask[1, :2] = False, False
    m = mask if masked else None
    tq = QKV(qt, kt, None, 6, 2, d, 0.5, sliding_window=window)
    grads = []
    for closed in (True, False):
        q, k = qs.clone().requires_grad_(), ks.clone().requires_grad_()
        s = QKV(q, k, None, 6, 2, d, 0.5, sliding_window=window)
        if closed:
            loss = attention_kl(s, tq, m, q_chunk=4)
        else:
            loss = naive_kl(attention_probs(q, k, 0.5, m, window), attention_probs(qt, kt, 0.5, m, window), m)
        (loss * 3.0).backward()
        grads.append((loss.detach(), q.grad, k.grad))
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c.to(a.dtype), rtol=2e-5, atol=1e-6)
    assert grads[0][1].abs().sum() > 0 and grads[0][2].abs().sum() > 0


def test_attention_kl_mask(pair):
    teacher, student = pair
    x = ids()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, :2] = False  # left padding too
    t, s = capture_qkv(teacher, x), capture_qkv(student, x)
    got = attention_kl(s, t, mask=mask, q_chunk=4)
    ref = naive_kl(attention_probs(s.q, s.k, s.scaling, key_mask=mask),
                   attention_probs(t.q, t.k, t.scaling, key_mask=mask), mask)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # changing the teacher at masked positions (as queries and keys) changes nothing
    noise = torch.randn_like(t.q) * (~mask)[:, None, :, None]
    t2 = QKV(t.q + noise, t.k + 3 * noise[:, :2], t.v, 4, 2, t.head_dim, t.scaling)
    torch.testing.assert_close(attention_kl(s, t2, mask=mask, q_chunk=5), got, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(attention_kl(s, t2, q_chunk=5), attention_kl(s, t, q_chunk=5))


def test_attention_kl_different_head_counts_uses_head_average():
    teacher = make(seed=0)
    torch.manual_seed(3)
    student = tf.LlamaForCausalLM(tf.LlamaConfig(**STUDENT)).eval()
    x = ids()
    t, s = capture_qkv(teacher, x), capture_qkv(student, x, layer=0)
    ref = naive_kl(attention_probs(s.q, s.k, s.scaling).mean(1, keepdim=True),
                   attention_probs(t.q, t.k, t.scaling).mean(1, keepdim=True))
    torch.testing.assert_close(attention_kl(s, t, q_chunk=5), ref, atol=1e-6, rtol=1e-5)


def test_attention_kl_with_gradient_checkpointing():
    """HF (non-reentrant) activation checkpointing of the student: layer 1 really runs again in
    backward, its captured q/k still carry grads, and every student weight gets the gradient it gets
    without checkpointing (q/k projections of layer 1 and all of layer 0 below it)."""
    teacher = make(seed=0)
    x = ids()
    t = capture_qkv(teacher, x)
    grads, forwards = [], []
    for ckpt in (False, True):
        student = make(seed=1).train()
        if ckpt:
            student.activation_checkpointing_enable()
        calls = []
        student.model.layers[1].self_attn.k_proj.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        s = capture_qkv(student, x, grad=True)
        attention_kl(s, t, q_chunk=4).backward()
        forwards.append(len(calls))
        grads.append({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    assert forwards == [1, 2]  # with checkpointing, layer 1 was recomputed in backward
    must = [f"model.layers.{i}.self_attn.{w}_proj.weight" for i in (0, 1) for w in ("q", "k")] + ["model.embed_tokens.weight"]
    for name in must:
        assert name in grads[0] and grads[0][name].abs().sum() > 0, name
    assert set(grads[1]) == set(grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------
# relation_loss
# ------------------------------------------------------------------------------------------------
def naive_relation(s: QKV, t: QKV, r: int, kinds=("q", "k", "v"), mask=None):
    out = []
    for kind in kinds:
        maps = []
        for x in (s, t):
            y = getattr(x, kind)
            b, n, tt, hd = y.shape
            y = y.transpose(1, 2).reshape(b, tt, n * hd).reshape(b, tt, r, n * hd // r).transpose(1, 2)
            maps.append(attention_probs(y, y, (n * hd // r) ** -0.5, key_mask=mask))
        out.append(naive_kl(maps[0], maps[1], mask))
    return torch.stack(out).mean()


def test_relation_loss_zero_and_matches_naive(pair):
    teacher, student = pair
    x = ids()
    t, s = capture_qkv(teacher, x), capture_qkv(student, x)
    assert relation_loss(t, t, 4, q_chunk=3).abs().item() < 1e-7
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    for r, kinds in ((1, ("q", "k", "v")), (8, ("q", "k", "v")), (4, ("k",))):
        torch.testing.assert_close(relation_loss(s, t, r, mask=mask, kinds=kinds, q_chunk=4),
                                   naive_relation(s, t, r, kinds, mask), atol=1e-6, rtol=1e-5)


def test_relation_loss_different_shapes_has_grads():
    teacher = make(seed=0)
    torch.manual_seed(3)
    student = tf.LlamaForCausalLM(tf.LlamaConfig(**STUDENT)).train()
    x = ids()
    t = capture_qkv(teacher, x, layer=3)
    s = capture_qkv(student, x, layer=1, grad=True)
    # widths: teacher q 64, k/v 32; student q 48, k/v 16
    r = default_relation_heads(s, t)
    assert r == 16 == default_relation_heads(student, teacher) == default_relation_heads(student.config, t)
    assert default_relation_heads(s, t, kinds=("q",)) == 16
    assert default_relation_heads(s, t, max_heads=6) == 4
    loss = relation_loss(s, t, r, q_chunk=5)
    torch.testing.assert_close(loss, naive_relation(s, t, r), atol=1e-6, rtol=1e-5)
    loss.backward()
    attn = student.model.layers[1].self_attn
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert teacher.model.layers[3].self_attn.q_proj.weight.grad is None
    with pytest.raises(ValueError, match=r"loss\.relation_heads=3") as exc:
        relation_loss(s, t, 3)
    assert "\n" not in str(exc.value)
    s_nov = QKV(s.q, s.k, None, s.num_heads, s.num_kv_heads, s.head_dim, s.scaling)
    with pytest.raises(ValueError, match="want_v"):
        relation_loss(s_nov, t, 4)
    relation_loss(s_nov, t, 4, kinds=("q", "k"))  # fine without v


# ------------------------------------------------------------------------------------------------
# run_layers
# ------------------------------------------------------------------------------------------------
def forward_replacing(model, layer, h, **inputs):
    """last_hidden_state [B,T,H] of a fresh forward (no cache) in which decoder layer `layer` outputs h [B,T,H]."""
    def hook(module, args, out):
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.model(**inputs, use_cache=False).last_hidden_state
    finally:
        handle.remove()


def no_cache_kept(layer_inputs):
    return all("Cache" not in type(v).__name__ for kw in layer_inputs.values() for v in (*kw.values(), *kw.args))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_run_layers_reproduces_last_hidden_state(k):
    """The capture forward fills a KV cache (transformers passes it as `cache` from 5.24, `past_key_values`
    before): run_layers must recompute k/v from the hidden state it is given, never reuse or grow that cache."""
    model = make()
    x = ids()
    with torch.no_grad(), Capture(model, hidden=[k], layer_inputs=[k + 1]) as cap:
        last = model.model(input_ids=x, use_cache=True).last_hidden_state
    assert no_cache_kept(cap.layer_inputs)
    with torch.no_grad():
        out = run_layers(model, cap.hidden[k], k + 1, cap.layer_inputs[k + 1])
    torch.testing.assert_close(out, last, atol=1e-5, rtol=0)
    # another hidden state (block-wise KD feeds the student's), twice: same as a fresh forward from it
    h2 = cap.hidden[k] + torch.randn_like(cap.hidden[k])
    ref = forward_replacing(model, k, h2, input_ids=x)
    assert not torch.allclose(ref, last, atol=1e-2)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(run_layers(model, h2, k + 1, cap.layer_inputs[k + 1]), ref, atol=1e-5, rtol=0)


def test_run_layers_padding_per_layer_kwargs_and_grad():
    """Gemma-3 alternates sliding/full masks, so kwargs are given per layer; padding mask honoured, also for a
    hidden state other than the captured one (with a KV cache filled during the capture forward)."""
    cls, kw, _ = FAMILIES["gemma3-headnorm-sliding"]
    model = make(cls, **kw)
    x = ids()
    am = torch.ones(B, T, dtype=torch.long)
    am[0, 8:] = 0  # right padding
    am[1, :3] = 0  # left padding: changes what the valid rows of sequence 1 attend to
    with torch.no_grad(), Capture(model, hidden=[0], layer_inputs=[1, 2]) as cap:
        last = model.model(input_ids=x, attention_mask=am, use_cache=True).last_hidden_state
    assert no_cache_kept(cap.layer_inputs)
    h = cap.hidden[0].clone().requires_grad_(True)
    out = run_layers(model, h, 1, cap.layer_inputs)
    torch.testing.assert_close(out, last, atol=1e-5, rtol=0)
    out.pow(2).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    h2 = cap.hidden[0] + torch.randn_like(cap.hidden[0])
    ref = forward_replacing(model, 0, h2, input_ids=x, attention_mask=am)
    with torch.no_grad():
        torch.testing.assert_close(run_layers(model, h2, 1, cap.layer_inputs), ref, atol=1e-5, rtol=0)
        # the padding mask matters: without it the valid positions of the left-padded sequence change
        no_pad = forward_replacing(model, 0, h2, input_ids=x)
        assert not torch.allclose(no_pad[1, 3:], ref[1, 3:], atol=1e-3)
    # start == num_layers only applies the final norm
    torch.testing.assert_close(run_layers(model, h, 3, {}), model.model.norm(h))
    with pytest.raises(ValueError, match="no kwargs for layer 1"):
        run_layers(model, h, 1, {2: cap.layer_inputs[2]})


@pytest.mark.parametrize("student_heads", [4, 2])  # 4: written-out gradient path; 2: head-averaged autograd path
def test_attention_and_relation_scores_stay_fp32_under_bf16_autocast(student_heads):
    """Under bf16 autocast (as training runs with train.precision=bf16) the attention-map KL and the
    relation loss, and their gradients, equal the fp32 computation: q·k^T is not taken in bf16."""
    g = torch.Generator().manual_seed(5)
    b, t, d = 2, 24, 16
    qt, kt, vt = (torch.randn(b, 4, t, d, generator=g) * 2 for _ in range(3))
    qs0, ks0, vs0 = (torch.randn(b, student_heads, t, d, generator=g) * 2 for _ in range(3))
    teacher = QKV(qt, kt, vt, 4, 4, d, d ** -0.5)
    results = []
    for autocast in (False, True):
        qs, ks, vs = (x.clone().requires_grad_() for x in (qs0, ks0, vs0))
        student = QKV(qs, ks, vs, student_heads, student_heads, d, d ** -0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = attention_kl(student, teacher, q_chunk=8) + relation_loss(student, teacher, 4)
        loss.backward()
        results.append((loss.detach(), qs.grad, ks.grad, vs.grad))
    for fp32, under_autocast in zip(*results):  # (the head-averaged path once gave NaN gradients: hidden keys)
        assert under_autocast.dtype == torch.float32 and torch.isfinite(fp32).all() and fp32.abs().sum() > 0
        torch.testing.assert_close(under_autocast, fp32, rtol=1e-5, atol=1e-7)
