"""Evaluation of a student against its teacher: perplexity, agreement, generation overlap, speed.

Pure torch + transformers + rouge_score + sacrebleu; no Ray (the train loop and `raykd eval`
both call these). Blocks are packed token ids, ``LongTensor[N, T]`` (no padding), moved to the
model's device batch by batch. Every metric runs the model in eval mode under ``no_grad`` and
puts it back in the mode it was in.

Memory stays bounded by ``batch_size``: one batch's logits ``[B, T, V]`` at a time, reduced at
once to summed NLL (fp32 cross-entropy) and argmax ids ``[B, T]``; nothing of size ``V`` is kept.
``evaluate_pair`` runs each model over the blocks once for perplexity and top-1 agreement.

ROUGE-L and BLEU use the ``rouge_score`` and ``sacrebleu`` packages directly
(``evaluate.load`` needs the hub, which is offline here).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time

import torch
import torch.nn.functional as F

from raykd.errors import ConfigError

METRIC_KEYS = (
    "val_perplexity", "teacher_val_perplexity", "top1_agreement", "rougeL", "bleu",
    "student_tokens_per_s", "teacher_tokens_per_s", "student_params", "teacher_params", "val_tokens",
)


# --- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model):
    """Eval mode + no_grad for the block; restores the model's training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_blocks(blocks: torch.Tensor, min_len: int = 2) -> None:
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < min_len:
        raise ValueError(f"blocks must be a LongTensor[N, T] with N >= 1 and T >= {min_len}, got shape {tuple(blocks.shape)}")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """ids: LongTensor[B, T] on the model's device -> logits [B, T, V] (model dtype)."""
    return model(input_ids=ids, use_cache=False).logits


def batch_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32 cross-entropy, float64 sum) of logits [B, T, V] for ids [B, T]: B*(T-1) predictions."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum").double()


def nll_sums(score, blocks: torch.Tensor, batch_size: int = 8, rank: int = 0, world: int = 1, all_reduce=None,
             device: torch.device | None = None) -> tuple[float, int]:
    """The one perplexity routine (evaluation, importance scoring and validation during training).

    `score(ids [B, T]) -> summed next-token NLL` (a 0-dim tensor) of a batch of `blocks` [N, T];
    returns (summed NLL in nats, number of predictions). With `world` > 1 rank r scores every
    world-th block (blocks repeated when fewer than `world`: sharded models need every rank in
    every forward) and the sums are added across ranks with `all_reduce(tensor)` on `device`;
    the sums stay on the device until the end (one host sync).
    """
    _check_blocks(blocks)
    if world > 1:
        blocks = blocks.repeat(world, 1) if len(blocks) < world else blocks
        blocks = blocks[: len(blocks) // world * world][rank::world]
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for ids in blocks.split(batch_size):
        sums[0] += score(ids).to(sums.device)
        sums[1] += ids[:, 1:].numel()
    if all_reduce is not None:
        all_reduce(sums)
    nll, count = sums.tolist()
    return nll, int(count)


def _forward_stats(model, blocks: torch.Tensor, batch_size: int = 8, want_nll: bool = True, want_argmax: bool = True):
    """One pass over `blocks` [N, T]: (summed next-token NLL as float, count N*(T-1), argmax [N, T] on CPU or None)."""
    device, argmax = _device(model), []

    def score(ids):
        logits = _logits(model, ids.to(device))  # [B, T, V]
        if want_argmax:
            argmax.append(logits.argmax(dim=-1).cpu())  # [B, T]
        return batch_nll(logits, ids.to(device)) if want_nll else torch.zeros((), dtype=torch.float64)

    with _inference(model):
        nll, count = nll_sums(score, blocks, batch_size)
    return nll, count, (torch.cat(argmax) if want_argmax else None)


def _ppl(nll: float, count: int) -> float:
    return math.exp(nll / count) if nll / count < 700 else float("inf")


# --- metrics ----------------------------------------------------------------------------------


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all N*(T-1) predictions of `blocks` LongTensor[N, T].

    Equals exp of Hugging Face's own ``labels=`` loss on the same blocks (one batch).
    """
    nll, count, _ = _forward_stats(model, blocks, batch_size, want_nll=True, want_argmax=False)
    return _ppl(nll, count)


def top1_agreement(student, teacher, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Share of the N*T positions of `blocks` [N, T] where argmax student logits == argmax teacher logits."""
    _, _, s = _forward_stats(student, blocks, batch_size, want_nll=False)
    _, _, t = _forward_stats(teacher, blocks, batch_size, want_nll=False)
    return (s == t).double().mean().item()


def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int, pad_token_id: int, eos_token_id=None) -> torch.Tensor:
    """Greedy decoding from `prompts` LongTensor[P, L] (no padding) -> new ids LongTensor[P, <= new_tokens] (CPU).

    Uses its own GenerationConfig, so a model's saved sampling defaults do not apply.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    ids = prompts.to(_device(model))
    with _inference(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out[:, ids.shape[1]:].cpu()


def _decode(tokenizer, rows: torch.Tensor, pad_token_id: int, eos_token_id) -> list[str]:
    """rows [P, K] of new token ids -> P strings; cut at the first EOS (generate pads after it)."""
    stops = {pad_token_id} if eos_token_id is None else set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    texts = []
    for row in rows.tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        row = row[:cut]
        texts.append(tokenizer.decode(row, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, row)))
    return texts


def _rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure; identical strings score 1.0 even where rouge_score finds no words."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [1.0 if p == r else scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


def greedy_texts(model, blocks: torch.Tensor, tokenizer=None, prompt_tokens: int = 32, new_tokens: int = 32,
                 num_prompts: int = 8, eos_from=None) -> tuple[list[str], list[str]]:
    """(greedy continuations of `model`, the corpus's own next `new_tokens` tokens): P strings each.

    Prompts are the first `prompt_tokens` ids of the first `num_prompts` blocks of `blocks`
    LongTensor[N, T]: P = min(num_prompts, N). Generation stops at EOS (the tokenizer's, else the
    generation config of `eos_from`, default `model`); texts are decoded with `tokenizer` (without
    one, token ids written as words).
    """
    _check_blocks(blocks, min_len=1)
    prompts = blocks[:num_prompts, :prompt_tokens]
    pad = eos = None
    if tokenizer is not None:
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    eos = eos if eos is not None else getattr((eos_from or model).generation_config, "eos_token_id", None)
    pad = pad if pad is not None else (eos if isinstance(eos, int) else 0)
    texts = _decode(tokenizer, greedy_continuations(model, prompts, new_tokens, pad, eos), pad, eos)
    truth = _decode(tokenizer, blocks[:num_prompts, prompt_tokens:prompt_tokens + new_tokens].cpu(), pad, eos)
    return texts, truth


def generation_texts(student, teacher, blocks: torch.Tensor, tokenizer=None, prompt_tokens: int = 32,
                     new_tokens: int = 32, num_prompts: int = 8, memo=None) -> tuple[list[str], list[str], list[str]]:
    """Greedy continuations of student and teacher from the same prompts (`greedy_texts`, EOS from the
    teacher; the teacher's read from `memo` when it holds them) -> (student texts, teacher texts, the
    corpus's own next tokens)."""
    inputs = [blocks[:num_prompts, :prompt_tokens + new_tokens].tolist(), prompt_tokens, new_tokens]
    ref, truth = memo.get("greedy", inputs, lambda: list(greedy_texts(teacher, blocks, tokenizer, prompt_tokens, new_tokens, num_prompts))) \
        if memo is not None else greedy_texts(teacher, blocks, tokenizer, prompt_tokens, new_tokens, num_prompts)
    hyp, _ = greedy_texts(student, blocks, tokenizer, prompt_tokens, new_tokens, num_prompts, eos_from=teacher)
    return hyp, ref, truth


def overlap(hypotheses: list[str], references: list[str]) -> dict:
    """{"rougeL": mean ROUGE-L F-measure in [0, 1], "bleu": sacrebleu corpus BLEU in [0, 100]} of the
    hypotheses against the references, BLEU with effective order (n-gram orders that short texts
    never reach are skipped instead of zeroing the score)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True).corpus_score(hypotheses, [references]).score
    return {"rougeL": _rouge_l(hypotheses, references), "bleu": min(float(bleu), 100.0)}


def generation_agreement(student, teacher, blocks: torch.Tensor, tokenizer=None, prompt_tokens: int = 32,
                         new_tokens: int = 32, num_prompts: int = 8, memo=None) -> dict:
    """Greedy continuations of student vs teacher from the same prompts (`generation_texts`) ->
    {"rougeL", "bleu"} of the student's texts against the teacher's as the reference (`overlap`)."""
    hyp, ref, _ = generation_texts(student, teacher, blocks, tokenizer, prompt_tokens, new_tokens, num_prompts, memo)
    return overlap(hyp, ref)


def tokens_per_s(model, blocks: torch.Tensor, batch_size: int = 8, repeats: int = 1, max_batches: int | None = None) -> float:
    """Prefill (one forward, full logits, no KV cache) throughput in tokens/s wall-clock.

    One warm-up batch first (not timed), then `repeats` passes over the batches of `blocks`
    LongTensor[N, T] (the first `max_batches` of them, if given).
    """
    _check_blocks(blocks, min_len=1)
    device = _device(model)
    batches = [blocks[i:i + batch_size] for i in range(0, blocks.shape[0], batch_size)][:max_batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with _inference(model):
        _logits(model, batches[0].to(device))
        sync()
        t0, tokens = time.perf_counter(), 0
        for _ in range(max(1, repeats)):
            for batch in batches:
                _logits(model, batch.to(device))
                tokens += batch.numel()
        sync()
    return tokens / max(time.perf_counter() - t0, 1e-9)


def _teacher_side(teacher, blocks: torch.Tensor, batch_size: int, speed_batches: int | None, memo) -> dict:
    """The teacher's half of `evaluate_pair` (NLL, argmax, prefill speed), read from `memo` (a
    raykd.tasks.memo.TeacherMemo: per teacher, keyed by the blocks' digest) when it holds them: every
    trial of a sweep, and every later run on the same validation blocks, scores the teacher once."""
    def compute() -> dict:
        nll, count, top = _forward_stats(teacher, blocks, batch_size)
        return {"nll": float(nll), "count": int(count), "top": top.flatten().tolist(),
                "tokens_per_s": tokens_per_s(teacher, blocks, batch_size, max_batches=speed_batches)}

    if memo is None:
        return compute()
    digest = hashlib.sha256(blocks.cpu().contiguous().numpy().tobytes()).hexdigest()
    return memo.get("val-stats", [digest, list(blocks.shape), batch_size, speed_batches], compute)


def evaluate_student(student, blocks: torch.Tensor, batch_size: int = 8, speed_batches: int | None = 4) -> dict:
    """The student's half of `evaluate_pair` on `blocks` LongTensor[N, T] (`eval.final: light`, a sweep's
    trials): val_perplexity, student_tokens_per_s, student_params, val_tokens; no teacher is loaded."""
    from raykd.models import count_params

    return {"val_perplexity": perplexity(student, blocks, batch_size),
            "student_tokens_per_s": tokens_per_s(student, blocks, batch_size, max_batches=speed_batches),
            "student_params": count_params(student), "val_tokens": blocks.numel()}


def evaluate_pair(student, teacher, tokenizer, blocks: torch.Tensor, batch_size: int = 8, generation: bool = True,
                  speed_batches: int | None = 4, memo=None) -> dict:
    """All metrics of `student` against `teacher` on validation `blocks` LongTensor[N, T].

    Keys: val_perplexity, teacher_val_perplexity, top1_agreement (over N*T positions), rougeL,
    bleu (None when `generation` is False), student_tokens_per_s, teacher_tokens_per_s (prefill,
    over at most `speed_batches` batches), student_params, teacher_params, val_tokens (N*T).
    Each model runs once over the blocks for perplexity and agreement together; the teacher's side
    comes from `memo` when it has been computed before (`_teacher_side`).
    """
    from raykd.models import count_params

    s_nll, count, s_top = _forward_stats(student, blocks, batch_size)
    t = _teacher_side(teacher, blocks, batch_size, speed_batches, memo)
    gen = generation_agreement(student, teacher, blocks, tokenizer, memo=memo) if generation else {"rougeL": None, "bleu": None}
    return {
        "val_perplexity": _ppl(s_nll, count),
        "teacher_val_perplexity": _ppl(t["nll"], t["count"]),
        "top1_agreement": (s_top.flatten() == torch.tensor(t["top"], dtype=s_top.dtype)).double().mean().item(),
        "rougeL": gen["rougeL"],
        "bleu": gen["bleu"],
        "student_tokens_per_s": tokens_per_s(student, blocks, batch_size, max_batches=speed_batches),
        "teacher_tokens_per_s": t["tokens_per_s"],
        "student_params": count_params(student),
        "teacher_params": count_params(teacher),
        "val_tokens": blocks.numel(),
    }


# --- `raykd eval`: reading text without Ray ------------------------------------------------------


def eval_blocks(sources: list[str], tokenizer, block_size: int, max_blocks: int, text_field: str = "text",
                field: str = "data.validation") -> torch.Tensor:
    """Validation text -> LongTensor[n, block_size], n <= max_blocks, documents packed with EOS between.

    `sources`: files, directories, globs or named corpora (their validation split unless
    `field` is "data.train"). Documents are cleaned, tokenized without special tokens and
    packed in order; reading stops once `max_blocks` blocks are full, and a final partial
    block is dropped. `field` names the setting in error messages.
    """
    from raykd.config import DataConfig
    from raykd.data.corpora import pack_blocks
    from raykd.data.reader import documents

    if block_size < 2:
        raise ConfigError(f"{field}: block size {block_size} is too small; use at least 2 tokens")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{field}: the tokenizer has no EOS token to separate documents; use a tokenizer with eos_token set")
    split = "train" if field == "data.train" else "validation"
    # the training reader: a named corpus or a datasets dir gives its own split, plain files are read whole
    data_cfg = DataConfig(train=list(sources), validation=None if split == "train" else list(sources), text_field=text_field,
                          min_chars=1, dedupe=False)
    blocks, carry, n_tokens = [], [], 0
    for text in documents(data_cfg, split):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        n_tokens += len(ids) + 1
        new, carry = pack_blocks([ids], block_size, tokenizer.eos_token_id, carry)
        blocks.extend(new)
        if len(blocks) >= max_blocks:
            return torch.tensor(blocks[:max_blocks], dtype=torch.long)
    if not blocks:
        raise ConfigError(f"{field}: the text holds {n_tokens} tokens, fewer than one block of {block_size}; add more text or use a smaller block size")
    return torch.tensor(blocks, dtype=torch.long)
