"""Teacher-written training text for `raykd generate`, the parts without Ray: prompts cut from
training documents, one shard's samples (batched KV-cache sampling with `raykd.sampling.sample`,
each continuation scored by the teacher), shards written atomically beside a checksum, and the
check that a generator is a causal LM. The Ray Data stage that runs shards on an actor pool is
`raykd.data.generate`; the page is docs/generation.md.

A shard of an output directory is three files:

    shard-00003.jsonl          the rows (or .parquet); only ever created by a rename, so complete
    .shard-00003.stats.json    its counts and the sha256 of its bytes (written before the rename)
    .shard-00003.jsonl.tmp     only while it is being written (hidden, *.tmp: never read as data)

A shard is finished when its file exists and matches the checksum of its stats file; anything
else (a missing, truncated or half-written shard) is generated again, with the same seed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from raykd import manifest
from raykd.config import ConfigError, GenerateConfig
from raykd.sampling import sample, token_logprobs

# text and prompt + continuation (strings), teacher_logprob / generator_logprob (mean log-prob per
# continuation token), tokens (continuation length, EOS included), ids (prompt + continuation ids),
# prompt_index (position of the prompt among all prompts), sample (0 .. num_samples - 1)
COLUMNS = ("text", "prompt", "continuation", "teacher_logprob", "generator_logprob", "tokens", "ids", "prompt_index", "sample")


def check_causal_lm(model_dir: Path, field: str, trust_remote_code: bool = False) -> None:
    """One ConfigError line unless the directory holds a causal (decoder-only) LM: its architecture
    must be a *ForCausalLM / *LMHeadModel class of a model type transformers can load for causal LM
    (an encoder such as BERT, or an encoder-decoder, is refused)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from raykd.models import load_config

    config = load_config(model_dir, trust_remote_code, field)
    archs = list(getattr(config, "architectures", None) or [])
    causal = [a for a in archs if a.endswith(("ForCausalLM", "LMHeadModel"))]
    encoder = getattr(config, "is_encoder_decoder", False) or (archs and not causal)
    known = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (trust_remote_code and causal)
    if encoder or not known:
        what = f"{config.model_type} ({', '.join(archs) or 'no architectures listed'})"
        raise ConfigError(f"{field}: {model_dir} holds a {what}, not a causal language model; "
                          f"give a decoder-only model directory (a *ForCausalLM, e.g. the teacher or a raykd student)")


def prefix_ids(tokenizer, text: str, n: int) -> list[int] | None:
    """The first `n` token ids of `text` (no special tokens), or None when it has fewer; two tokens
    of margin, so the n-th token is not cut by the end of the prefix tokenized."""
    from raykd.data.corpora import leading_ids

    ids = leading_ids(tokenizer, text, n + 2)
    return ids[:n] if len(ids) >= n else None


def prompt_ids(documents: Iterable[str], tokenizer, prompt_tokens: int, num_prompts: int = 0) -> list[list[int]]:
    """Prompts [k][prompt_tokens]: the first `prompt_tokens` tokens of each document long enough, in
    corpus order, at most `num_prompts` of them (0 = all)."""
    out = []
    for doc in documents:
        ids = prefix_ids(tokenizer, doc, prompt_tokens)
        if ids is not None:
            out.append(ids)
            if num_prompts and len(out) >= num_prompts:
                break
    return out


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a continuation: the generation config's EOS ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]
    return sorted({int(i) for i in ids} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's masked entries: values, mask [B, N] -> [B]."""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def _texts(tokenizer, prompt: list[int], cont: list[int], stops: set[int]) -> tuple[str, str]:
    """(prompt text, continuation text); a final stop token is not text. The continuation is cut
    from the decoded whole, so a character split across the boundary is decoded once."""
    body = cont[:-1] if cont and cont[-1] in stops else cont
    p = tokenizer.decode(prompt, skip_special_tokens=True)
    whole = tokenizer.decode(prompt + body, skip_special_tokens=True)
    return p, whole[len(p):] if whole.startswith(p) else tokenizer.decode(body, skip_special_tokens=True)


@torch.no_grad()
def sample_shard(generator, teacher, tokenizer, prompts: torch.Tensor, gen: GenerateConfig, seed: int, first: int = 0,
                 stops: list[int] | None = None) -> tuple[list[dict], dict]:
    """Sample `gen.num_samples` continuations of each prompt of `prompts` [n, P] (LongTensor; rows of
    `gen.batch_size` sequences, KV cache) with a generator seeded by `seed`, score them with
    `teacher` (None: the generator is the teacher, its own log-probs are the teacher's) and keep
    those whose teacher log-prob per token reaches `gen.filter_min_logprob`. `first` is the index of
    prompts[0] among all prompts. Returns (kept rows with the COLUMNS, counts)."""
    t0 = time.perf_counter()
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    stops = stop_ids(generator, tokenizer) if stops is None else stops
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    rows, counts = [], {"prompts": int(prompts.shape[0]), "samples": 0, "kept": 0, "tokens": 0, "kept_tokens": 0}
    expanded = prompts.to(device).repeat_interleave(gen.num_samples, dim=0)  # [n * S, P], a prompt's samples together
    P = prompts.shape[1]
    for start in range(0, expanded.shape[0], gen.batch_size):
        batch = expanded[start:start + gen.batch_size]
        out = sample(generator, batch, gen.max_new_tokens, gen.temperature, gen.top_p, rng, eos_id=stops, pad_id=pad)
        ids = out.ids(batch)  # [b, P + N]
        gen_lp = _mean(out.logprobs, out.mask)
        t_lp = gen_lp if teacher is None else _mean(token_logprobs(teacher, ids, gen.batch_size)[:, P - 1:].float(), out.mask)
        lengths = out.mask.sum(1)
        for j in range(batch.shape[0]):
            n_tok, lp = int(lengths[j]), float(t_lp[j])
            counts["samples"] += 1
            counts["tokens"] += n_tok
            if gen.filter_min_logprob is not None and lp < gen.filter_min_logprob:
                continue
            row_ids = ids[j, :P + n_tok].tolist()
            prompt_text, cont_text = _texts(tokenizer, row_ids[:P], row_ids[P:], set(stops))
            k = start + j
            rows.append({"text": prompt_text + cont_text, "prompt": prompt_text, "continuation": cont_text, "teacher_logprob": lp,
                         "generator_logprob": float(gen_lp[j]), "tokens": n_tok, "ids": row_ids,
                         "prompt_index": first + k // gen.num_samples, "sample": k % gen.num_samples})
            counts["kept"] += 1
            counts["kept_tokens"] += n_tok
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    return rows, counts


# --- shards on disk ----------------------------------------------------------------------------


def shard_path(out: Path, shard: int, fmt: str) -> Path:
    return Path(out) / f"shard-{shard:05d}.{fmt}"


def _stats_path(out: Path, shard: int) -> Path:
    return Path(out) / f".shard-{shard:05d}.stats.json"


def _write_rows(rows: list[dict], path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string()), ("prompt", pa.string()), ("continuation", pa.string()), ("teacher_logprob", pa.float64()),
                        ("generator_logprob", pa.float64()), ("tokens", pa.int64()), ("ids", pa.list_(pa.int32())),
                        ("prompt_index", pa.int64()), ("sample", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")


def write_shard(rows: list[dict], out: Path, shard: int, fmt: str, counts: dict) -> Path:
    """Write one shard: rows to a hidden temp file, its counts and checksum beside it, then rename the
    rows into place (the rename is the commit: a shard's final name only ever holds a whole shard)."""
    final = shard_path(out, shard, fmt)
    tmp = final.with_name(f".{final.name}.tmp")
    _write_rows(rows, tmp, fmt)
    stats = {**counts, "shard": shard, "format": fmt, "bytes": tmp.stat().st_size, "sha256": manifest.file_sha256(tmp)}
    manifest.write_json(_stats_path(out, shard), stats, indent=None)
    os.replace(tmp, final)
    return final


def finished(out: Path, shard: int, fmt: str) -> dict | None:
    """The counts of a finished shard, or None: its file is missing, or differs from the checksum
    written beside it (truncated, overwritten), or it has no stats."""
    final, stats_file = shard_path(out, shard, fmt), _stats_path(out, shard)
    if not (final.is_file() and stats_file.is_file()):
        return None
    try:
        stats = json.loads(stats_file.read_text())
    except ValueError:
        return None
    if stats.get("bytes") != final.stat().st_size or stats.get("sha256") != manifest.file_sha256(final):
        return None
    return stats


def read_rows(path: Path) -> list[dict]:
    """The rows of one shard file (.jsonl or .parquet)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
