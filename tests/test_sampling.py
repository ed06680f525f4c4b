"""raykd.sampling on the tiny random teacher: greedy equals Hugging Face's greedy generate, seeded
samples repeat, sampled frequencies follow the model's distribution (temperature and top-p), the
recorded log-probabilities equal a plain forward's, and rows stop at EOS. No Ray."""

import pytest
import torch

from raykd.sampling import _filter_top_p, sample, token_logprobs


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(5, 1000, (4, 6), generator=torch.Generator().manual_seed(0))


def test_greedy_matches_hugging_face_generate(tiny_teacher, prompts):
    out = sample(tiny_teacher, prompts, 12, temperature=0)
    ref = tiny_teacher.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[:, prompts.shape[1]:]
    assert torch.equal(out.tokens, ref) and out.mask.all()


def test_prefill_computes_only_the_last_positions_logits(tiny_teacher, prompts):
    """The prompt's forward returns logits [B, 1, V], not [B, P, V]: a prompt of P tokens costs one
    row of the LM head, not P (the on-policy student continues 192-token prompts)."""
    shapes = []
    hook = tiny_teacher.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        sample(tiny_teacher, prompts, 3, temperature=0)
    finally:
        hook.remove()
    vocab = tiny_teacher.config.vocab_size
    assert shapes == [(prompts.shape[0], 1, vocab)] * 3


def test_logprobs_are_the_models_and_seeds_repeat(tiny_teacher, prompts):
    a = sample(tiny_teacher, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample(tiny_teacher, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    c = sample(tiny_teacher, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    full = token_logprobs(tiny_teacher, a.ids(prompts), batch_size=3)  # [B, P + N - 1]
    torch.testing.assert_close(a.logprobs, full[:, prompts.shape[1] - 1:], atol=2e-4, rtol=0)


def test_sampled_frequencies_follow_the_tempered_distribution(tiny_teacher):
    """5,000 first tokens from one prompt: each frequent token's share is within 4 standard errors of
    softmax(logits / T), and top-p never draws outside the nucleus."""
    prompt = torch.tensor([[11, 42, 7, 99]])
    logits = tiny_teacher(input_ids=prompt).logits[0, -1].float()
    n, temp = 5000, 0.7
    draws = sample(tiny_teacher, prompt.expand(n, -1), 1, temperature=temp, generator=torch.Generator().manual_seed(1)).tokens[:, 0]
    want = (logits / temp).softmax(-1)
    got = torch.bincount(draws, minlength=want.numel()).double() / n
    for tok in want.topk(5).indices:
        p = want[tok].item()
        assert abs(got[tok].item() - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (tok, got[tok].item(), p)
    nucleus = _filter_top_p((logits / temp)[None], 0.5)[0].isfinite()
    assert 1 <= nucleus.sum() < want.numel()
    draws = sample(tiny_teacher, prompt.expand(500, -1), 1, temperature=temp, top_p=0.5, generator=torch.Generator().manual_seed(2)).tokens[:, 0]
    assert nucleus[draws].all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert _filter_top_p(logits, 0.7).isfinite().tolist() == [[True, True, False, False]]
    assert _filter_top_p(logits, 0.8).isfinite().tolist() == [[True, True, False, False]]
    assert _filter_top_p(logits, 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert _filter_top_p(logits, 0.1).isfinite().tolist() == [[True, False, False, False]]  # the top token always stays
    assert _filter_top_p(logits[:, [3, 1, 0, 2]], 0.7).isfinite().tolist() == [[False, True, True, False]]  # order-free


def test_rows_stop_at_eos(tiny_teacher, prompts):
    greedy = sample(tiny_teacher, prompts, 8, temperature=0)
    eos = int(greedy.tokens[0, 2])  # row 0's third token, made the EOS
    out = sample(tiny_teacher, prompts, 8, temperature=0, eos_id=eos, pad_id=1)
    first = (greedy.tokens[0] == eos).nonzero()[0].item()
    assert out.mask[0].tolist() == [True] * (first + 1) + [False] * (7 - first)
    assert (out.tokens[0, first + 1:] == 1).all() and (out.logprobs[0, first + 1:] == 0).all()
    for row in range(1, 4):  # the other rows run on as before until their own EOS
        hit = (greedy.tokens[row] == eos).nonzero()
        stop = hit[0].item() + 1 if len(hit) else 8
        assert torch.equal(out.tokens[row, :stop], greedy.tokens[row, :stop])


def test_bad_prompts_are_refused(tiny_teacher):
    with pytest.raises(ValueError, match=r"prompts: expected a LongTensor \[B, P\]"):
        sample(tiny_teacher, torch.tensor([1, 2, 3]), 4)
