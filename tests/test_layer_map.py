import pytest
import torch

from raykd.config import ConfigError
from raykd.layer_map import (
    Projections,
    contiguous_drops,
    evenly_spaced,
    layer_map,
    select_layers,
)
from raykd.spec import pick_pairs


@pytest.mark.parametrize("L", [2, 6, 12, 30, 32])
def test_every_strategy_for_every_depth(L):
    for k in range(1, L):
        for init in ("uniform", "first", "last", "ends"):
            kept = select_layers(init, L, k)
            assert len(kept) == k and kept == sorted(set(kept)), (init, L, k, kept)
            assert all(0 <= i < L for i in kept)
        assert select_layers("first", L, k) == list(range(k))
        assert select_layers("last", L, k) == list(range(L - k, L))
        if k > 1:
            u = select_layers("uniform", L, k)
            assert u[0] == 0 and u[-1] == L - 1
        for strategy in ("kept", "uniform", "last"):
            pairs = layer_map(strategy, L, k, kept=select_layers("uniform", L, k))
            assert [s for _, s in pairs] == list(range(k))
            assert all(0 <= t < L for t, _ in pairs)
            teacher_side = [t for t, _ in pairs]
            assert teacher_side == sorted(teacher_side)
        assert layer_map("uniform", L, k)[-1] == (L - 1, k - 1)  # the last student layer <-> the teacher's last


def test_known_values():
    assert select_layers("uniform", 30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers("ends", 30, 10) == [0, 1, 2, 3, 4, 25, 26, 27, 28, 29]
    assert select_layers("ends", 30, 10, ends_first=6) == [0, 1, 2, 3, 4, 5, 26, 27, 28, 29]
    assert select_layers("list", 30, 0, layers=[9, 0, 4]) == [0, 4, 9]
    assert layer_map("uniform", 12, 4) == [(2, 0), (5, 1), (8, 2), (11, 3)]
    assert layer_map("auto", 12, 3, kept=[0, 5, 11]) == [(0, 0), (5, 1), (11, 2)]
    assert layer_map("auto", 12, 4) == layer_map("uniform", 12, 4)
    assert layer_map("list", 12, 4, pairs=[[11, 3], [5, 1]]) == [(5, 1), (11, 3)]
    assert layer_map("uniform", 12, 4, num_pairs=2) == [(2, 0), (11, 3)]
    assert evenly_spaced(5, 1) == [4]


def test_bridge_asks_the_layer_before_a_dropped_block_for_the_state_after_it():
    kept = select_layers("ends", 30, 10)  # [0..4] + [25..29]: teacher layers 5..24 dropped
    pairs = layer_map("bridge", 30, 10, kept=kept)
    assert pairs[4] == (24, 4)  # student layer 4 (teacher 4) <-> teacher 24, the input teacher layer 25 expects
    assert [t for t, _ in pairs] == [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]
    assert layer_map("bridge", 12, 3, kept=[0, 5, 11]) == [(4, 0), (10, 1), (11, 2)]
    assert layer_map("bridge", 12, 3, kept=[9, 10, 11]) == layer_map("kept", 12, 3, kept=[9, 10, 11])  # no gap: same as kept
    with pytest.raises(ConfigError, match="layer_map.strategy"):
        layer_map("bridge", 12, 4)


def test_contiguous_drops_cover_first_and_last():
    cuts = contiguous_drops(30, 10)
    assert len(cuts) == 11
    assert cuts[0] == list(range(20, 30)) and cuts[-1] == list(range(10))
    assert [0, 1, 2, 3, 4, 5, 26, 27, 28, 29] in cuts
    assert all(len(c) == 10 for c in cuts)


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: select_layers("uniform", 12, 12), "student.num_layers"),
        (lambda: select_layers("uniform", 12, 0), "student.num_layers"),
        (lambda: select_layers("list", 12, 0, layers=[0, 12]), "student.layers"),
        (lambda: layer_map("list", 12, 4, pairs=[[12, 0]]), "layer_map.pairs"),
        (lambda: layer_map("list", 12, 4, pairs=[[0, 4]]), "layer_map.pairs"),
        (lambda: layer_map("kept", 12, 4), "layer_map.strategy"),
        (lambda: layer_map("uniform", 12, 4, num_pairs=5), "layer_map.num_pairs"),
        (lambda: pick_pairs([(0, 0), (1, 1)], [2], "all", "loss.attention_pairs"), "loss.attention_pairs"),
    ],
)
def test_out_of_range_is_a_one_line_error(call, field):
    with pytest.raises(ConfigError) as e:
        call()
    assert str(e.value).startswith(field + ":") and "\n" not in str(e.value)


def test_projections_identity_and_learned():
    pairs = [(2, 0), (5, 1)]
    same = Projections(pairs, 64, 64)
    assert sum(p.numel() for p in same.parameters()) == 0
    h = torch.randn(2, 3, 64)
    assert same(1, h) is h
    proj = Projections(pairs, 48, 64)
    assert proj(0, torch.randn(2, 3, 48)).shape == (2, 3, 64)
    assert sum(p.numel() for p in proj.parameters()) == 2 * 48 * 64
    assert pick_pairs(pairs, None, "middle", "x") == [(5, 1)]


def test_pack_blocks_and_clean_text():
    from raykd.data.corpora import clean_text, pack_blocks

    blocks, rest = pack_blocks([[1, 2, 3], [4, 5], [6]], 4, eos_id=0)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6]] and rest == [0]
    blocks, rest = pack_blocks([[7, 8, 9]], 4, eos_id=0, carry=rest)
    assert blocks == [[0, 7, 8, 9]] and rest == [0]
    assert clean_text("  a   b \r\n\n\n\n c\t d  ") == "a b\n\nc d"
