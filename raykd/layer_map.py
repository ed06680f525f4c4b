"""Which teacher layers a student keeps, which layers are aligned, and the projections between.

Everything here is generated from a strategy and the two depths (never hand-written per
depth), so Tune can sample a strategy and a depth. Layer indices are 0-based decoder
layers; "the hidden state of layer i" is that layer's output [B, T, H].
"""

from __future__ import annotations

import torch
from torch import nn

from raykd.errors import ConfigError


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread over range(n), first and last included (k = 1: the last)."""
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def select_layers(init: str, teacher_depth: int, k: int, layers: list[int] | None = None, ends_first: int | None = None) -> list[int]:
    """Teacher layers kept by a student of depth k cut with strategy `init` (not `importance`).

    uniform: evenly spaced, first and last included (DistilBERT keeps every other layer);
    first: layers 0..k-1; last: the top k; ends: the first `ends_first` (default ceil(k/2))
    plus the last k - ends_first; list: `layers` as given (sorted).
    """
    L = teacher_depth
    if init == "list":
        bad = [i for i in layers or [] if not 0 <= i < L]
        if bad:
            raise ConfigError(f"student.layers: index {bad[0]} out of range for a {L}-layer teacher; use 0..{L - 1}")
        k = len(layers)
    if not 1 <= k < L:
        raise ConfigError(f"student.num_layers: {k} must be between 1 and {L - 1} (the teacher has {L} layers); pick a smaller depth")
    if init == "list":
        return sorted(layers)
    if init == "uniform":
        return evenly_spaced(L, k)
    if init == "first":
        return list(range(k))
    if init == "last":
        return list(range(L - k, L))
    if init == "ends":
        a = (k + 1) // 2 if ends_first is None else ends_first
        return list(range(a)) + list(range(L - (k - a), L))
    raise ConfigError(f"student.init: {init!r} is not a fixed strategy here; importance needs the teacher (raykd.importance)")


def contiguous_drops(teacher_depth: int, k: int) -> list[list[int]]:
    """Every cut that keeps k layers by dropping one contiguous block of L - k layers.

    Start s keeps layers [0, s) and [s + L - k, L): s = 0 is `last`, s = k is `first`.
    """
    L = teacher_depth
    return [list(range(s)) + list(range(s + L - k, L)) for s in range(k + 1)]


def layer_map(strategy: str, teacher_depth: int, student_depth: int, kept: list[int] | None = None,
              pairs: list[list[int]] | None = None, num_pairs: int | None = None) -> list[tuple[int, int]]:
    """(teacher_layer, student_layer) pairs, sorted by student layer.

    kept: student layer j <-> the teacher layer it was copied from (cut students; `auto` picks
    it then); bridge (cut students): j <-> the teacher layer whose output the teacher's next kept
    layer reads, kept[j+1] - 1 (the last student layer <-> the teacher's last), so the student layer
    just before a dropped block is asked for the state at the end of that block; uniform: j <-> the
    last layer of the j-th of `student_depth` equal teacher blocks (TinyBERT's uniform mapping); last: j <-> teacher layer L - S + j; list: `pairs` as given.
    `num_pairs` keeps that many pairs, evenly spread over the student, the last one included.
    """
    L, S = teacher_depth, student_depth
    if strategy == "auto":
        strategy = "kept" if kept is not None else "uniform"
    if strategy in ("kept", "bridge"):
        if kept is None:
            raise ConfigError(f"layer_map.strategy: {strategy!r} needs a student cut from the teacher; use uniform, last or list for student.model")
        out = [(t, j) for j, t in enumerate(kept)] if strategy == "kept" else \
            [((kept[j + 1] - 1) if j + 1 < len(kept) else L - 1, j) for j in range(len(kept))]
    elif strategy == "uniform":
        out = [(round((j + 1) * L / S) - 1, j) for j in range(S)]
    elif strategy == "last":
        if S > L:
            raise ConfigError(f"layer_map.strategy: 'last' needs a student no deeper than the teacher ({S} > {L}); use uniform")
        out = [(L - S + j, j) for j in range(S)]
    elif strategy == "list":
        out = []
        for t, s in pairs or []:
            if not (0 <= t < L and 0 <= s < S):
                raise ConfigError(f"layer_map.pairs: pair [{t}, {s}] out of range; teacher layers are 0..{L - 1}, student layers 0..{S - 1}")
            out.append((int(t), int(s)))
        out.sort(key=lambda p: (p[1], p[0]))
    else:
        raise ConfigError(f"layer_map.strategy: unknown strategy {strategy!r}")
    if num_pairs is not None:
        if num_pairs > len(out):
            raise ConfigError(f"layer_map.num_pairs: {num_pairs} exceeds the {len(out)} available pairs; use at most {len(out)}")
        out = [out[i] for i in evenly_spaced(len(out), num_pairs)]
    return out


class Projections(nn.Module):
    """Learned linear maps student width -> teacher width, one per mapped pair (FitNets' regressor,
    Romero et al. 2015). With equal widths the map is the identity and holds no parameters.

    Part of the training state (checkpointed), never of the exported student.
    forward(pair_index, h[B, T, Hs]) -> [B, T, Ht].
    """

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int):
        super().__init__()
        self.pairs = list(pairs)
        self.identity = student_width == teacher_width
        self.maps = nn.ModuleList(
            [] if self.identity else [nn.Linear(student_width, teacher_width, bias=False) for _ in self.pairs]
        )
        for m in self.maps:  # random init, variance 1/Hs: the projected state keeps the scale of the student's (not an identity)
            nn.init.normal_(m.weight, std=student_width ** -0.5)

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.identity else self.maps[index](hidden)
