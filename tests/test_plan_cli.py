import json
import subprocess
import sys

import pytest

from raykd.cli import main
from raykd.config import ConfigError, load_config
from raykd.plan import build_plan


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "raykd.cli", *args], capture_output=True, text=True)


def test_plan_smoke_prints_sizes_layers_map_terms_flops(capsys, tiny_teacher_dir):
    assert main(["plan", "jobs/smoke.yaml"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM: 6 layers, hidden 64" in out
    assert "kept teacher layers [0, 2, 5]" in out or "kept teacher layers [0, 3, 5]" in out
    assert "layer map" in out and "1*ce" in out and "0.5*hidden(cosine)" in out and "0.1*attention" in out
    assert "flops/tok" in out and "frozen" not in out
    assert main(["plan", "jobs/smoke.yaml", "student.freeze_embeddings=true", "--json"]) == 0
    frozen = json.loads(capsys.readouterr().out)
    assert main(["plan", "jobs/smoke.yaml", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    head = trained["student"]["vocab"] * trained["student"]["hidden"]  # the head's weight gradient: 2·V·H FLOPs a token
    assert trained["flops_per_token"]["student_step"] - frozen["flops_per_token"]["student_step"] == 2 * head
    assert main(["plan", "jobs/smoke.yaml", "student.freeze_embeddings=true"]) == 0
    out = capsys.readouterr().out
    assert "embeddings and head frozen" in out and "note" not in out and "stood in" not in out
    assert main(["plan", "jobs/smoke.yaml", "train.max_steps=2", "student.dropped=linear"]) == 0  # allowed, but said
    out = capsys.readouterr().out
    assert "note       train.warmup_steps (2) >= train.max_steps (2): the LR never reaches train.lr" in out
    assert "layer map  (bridge)" in out and "linear maps folded into teacher layer(s) 0 (for 1..1)" in out


def test_plan_json_and_overrides(capsys, tiny_teacher_dir):
    assert main(["plan", "jobs/smoke.yaml", "student.init=first", "student.num_layers=2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["kept"] == [0, 1]
    assert plan["pairs"] == [[0, 0], [1, 1]]
    assert plan["student"]["layers"] == 2 and plan["student"]["params"] < plan["teacher"]["params"]
    assert plan["flops_per_token"]["total"] > plan["flops_per_token"]["teacher_forward"] > 0


@pytest.mark.parametrize(
    "overrides, start",
    [
        (["student.num_layers=6"], "student.num_layers: 6 must be between 1 and 5"),
        (["student.num_layrs=2"], "student.num_layrs: unknown key; did you mean 'num_layers'?"),
        (["layer_map.strategy=list", "layer_map.pairs=[[9, 0]]"], "layer_map.pairs: pair [9, 0] out of range"),
        (["teacher.model=/nonexistent/model"], "teacher.model: /nonexistent/model not found"),
        (["loss.kd=kl"], "loss.kd: unknown logit loss"),
        (["loss.weights.kd=-0.5"], "loss.weights.kd: negative weight"),
        (["student.model=tiny-random:vocab=512"], "student.model: vocabulary differs"),
        (["loss.attention_pairs=[7]"], "loss.attention_pairs: index 7 out of range"),
        (["data.block_size=1"], "data.block_size: must be >= 2"),
        (["data.block_size=4096"], "data.block_size: 4096 exceeds the teacher's context of 2048 tokens; use at most 2048"),
        (["seed=-1"], "seed: must be >= 0, got -1"),
        (["layer_map.strategy=diagonal"], "layer_map.strategy: unknown value 'diagonal'; choose one of: auto,"),
        (["=3"], "=3: overrides look like key=value"),
        (["loss=3"], "loss: expected a mapping of fields, got 3; set its fields one by one, e.g. loss.FIELD=VALUE"),
        (["loss.weights.zzz=1"], "loss.weights.zzz: unknown key; valid keys here: ce, kd,"),
        (["loss.weights={ce:1,kd:0.5}"], "loss.weights: 'ce:1' reads as one key with no value (YAML needs a space after ':'); "
                                         "write loss.weights='{ce: 1,kd: 0.5}'"),
    ],
)
def test_bad_input_exits_2_with_one_line(overrides, start, tiny_teacher_dir):
    proc = run_cli("plan", "jobs/smoke.yaml", *overrides)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("raykd: error: " + start), lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("config_json, start", [
    ('{"model_type": ', "is not a readable JSON model config"),
    ('{"hidden_size": 8}', "names no model_type"),
])
def test_broken_teacher_config_and_output_file_are_one_line(tmp_path, tiny_teacher_dir, config_json, start):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "config.json").write_text(config_json)
    proc = run_cli("plan", "jobs/smoke.yaml", f"teacher.model={teacher}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"raykd: error: teacher.model: {teacher / 'config.json'} {start}" + proc.stderr.split(start, 1)[1].rstrip()], proc.stderr
    (tmp_path / "out").write_text("a file where the run's directory should go")
    proc = run_cli("distill", "jobs/smoke.yaml", f"output_dir={tmp_path / 'out'}")  # refused before Ray starts
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"raykd: error: output_dir: {tmp_path / 'out'} is a file, not a directory; choose a directory path for the run's outputs"]


def test_a_directory_the_run_cannot_write_is_one_line_before_ray(tmp_path, capsys, tiny_teacher_dir):
    """An output_dir or storage path that cannot be created (under a file here; read-only elsewhere) failed after Ray
    started, in a pyarrow traceback; plan and distill refuse it alike, and the probe leaves nothing behind."""
    (tmp_path / "out").write_text("a file")
    for verb in ("plan", "distill"):
        assert main([verb, "jobs/smoke.yaml", f"output_dir={tmp_path / 'run' / 'a' / 'b'}", f"scale.storage_path={tmp_path / 'out' / 'ckpt'}"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"raykd: error: scale.storage_path: cannot write {tmp_path / 'out' / 'ckpt'} (Not a directory); choose a directory you can "
            "write, e.g. scale.storage_path=runs/NAME"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # output_dir's probe left nothing behind


def test_missing_config_file_exits_2():
    proc = run_cli("plan", "jobs/nope.yaml")
    assert proc.returncode == 2 and "config: file not found: jobs/nope.yaml" in proc.stderr


def test_hf_student_gets_a_uniform_map(tiny_teacher_dir):
    from raykd.models import build_tiny_random

    small = build_tiny_random("tiny-random:layers=2,hidden=32,heads=2,kv_heads=1")
    cfg = load_config("jobs/smoke.yaml", [f"student.model={small}"])
    plan = build_plan(cfg, log=lambda m: None)
    assert plan.kept is None and plan.pairs == [(2, 0), (5, 1)]
    assert plan.student.hidden == 32


def test_importance_cut_on_the_tiny_teacher(tiny_teacher_dir):
    cfg = load_config("jobs/smoke.yaml", ["student.init=importance", "student.calibration_tokens=256"])
    plan = build_plan(cfg, log=lambda m: None)
    scores = plan.importance["perplexity"]
    best = min(scores, key=scores.get)
    assert plan.kept == [int(i) for i in best.split(",")]
    assert len(scores) == 5  # 4 contiguous drops of 3 of 6 layers + the uniform cut
    cfg = load_config("jobs/smoke.yaml", ["student.init=importance", "student.importance_metric=block_influence", "student.calibration_tokens=128"])
    plan = build_plan(cfg, log=lambda m: None)
    assert len(plan.kept) == 3 and len(plan.importance["block_influence"]) == 6


def test_a_missing_strategy_package_is_one_line_at_plan(monkeypatch, tiny_teacher_dir):
    import importlib.util

    from raykd.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^scale\.strategy: deepspeed is not installed here; pip install deepspeed==0\.19\.8"):
        build_plan(load_config("jobs/smoke.yaml", ["scale.strategy=deepspeed"]), log=lambda m: None)


@pytest.mark.parametrize("verb", ["distill", "plan"])
@pytest.mark.parametrize("split", ["train", "validation"])
def test_corpus_too_short_for_one_block_is_one_line_before_ray(tmp_path, tiny_teacher_dir, split, verb):
    """`raykd distill` on a corpus shorter than one block: exit 2 and one line naming the split and its
    token count, before Ray starts (the lane guard fails this unmarked test if anything calls ray.init)
    and before anything is written (it used to start Ray, build the datasets, then fail). `raykd plan`,
    the verb that validates, refuses it alike (it used to print a plan distill would then refuse)."""
    import re

    short = tmp_path / "short.txt"
    short.write_text("Four score and seven years ago our fathers brought forth, upon this continent, a new nation.\n")
    out = tmp_path / "out"
    data = ["data.train=[pydoc]", f"data.validation=[{short}]"] if split == "validation" else [f"data.train=[{short}]", "data.validation=[pydoc]"]
    proc = run_cli(verb, "jobs/smoke.yaml", f"output_dir={out}", *data, "data.block_size=256")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    fix = "add training text" if split == "train" else "add held-out text"
    m = re.fullmatch(rf"raykd: error: data\.{split}: the {split} split holds (\d+) tokens, fewer than one block of 256; "
                     rf"{fix}.* or lower data\.block_size", lines[0])
    assert m and 10 < int(m.group(1)) < 256, lines[0]
    assert not out.exists()


def test_plan_checks_the_corpus_and_the_task_files_as_distill_does(tmp_path, tiny_teacher_dir):
    """`raykd plan` prints the corpus it would read and refuses an lm-eval task file distill would refuse."""
    proc = run_cli("plan", "jobs/smoke.yaml")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("data "))
    assert "training /" in line and "validation documents" in line and "eval tasks" in line, line
    bad = tmp_path / "mytask.yaml"
    bad.write_text("dataset_path: json\noutput_type: multiple_choice\n")
    proc = run_cli("plan", "jobs/smoke.yaml", f"eval.tasks=[{bad}]")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"raykd: error: eval.tasks: task file {bad} has no `task:` name; an lm-eval task YAML starts with `task: NAME`"], proc.stderr
    assert proc.stdout == ""


def test_bridge_map_of_an_ends_cut(tiny_teacher_dir):
    cfg = load_config("jobs/smoke.yaml", ["student.num_layers=3", "student.init=ends", "layer_map.strategy=bridge"])
    plan = build_plan(cfg, log=lambda m: None)
    assert plan.kept == [0, 1, 5]  # 6 teacher layers, 2..4 dropped
    assert plan.pairs == [(0, 0), (4, 1), (5, 2)]  # student layer 1 <-> teacher 4, the state teacher layer 5 reads


def test_importance_cut_is_scored_once_then_read_from_its_memo(tmp_path, monkeypatch, tiny_teacher_dir):
    import raykd.importance as imp

    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))  # a fresh memo store (the tiny teacher is rebuilt there)
    overrides = ["student.init=importance", "student.calibration_tokens=256"]
    lines = []
    first = build_plan(load_config("jobs/smoke.yaml", overrides), log=lines.append)
    assert any("scoring block_ppl cuts" in m for m in lines)
    assert len(list((tmp_path / "cache" / "importance").glob("*.json"))) == 1

    def never(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr(imp, "importance_cut", never)
    lines.clear()
    again = build_plan(load_config("jobs/smoke.yaml", overrides), log=lines.append)
    assert again.kept == first.kept and again.importance == first.importance
    assert any("scored before" in m for m in lines) and not any("scoring" in m for m in lines)
    with pytest.raises(AssertionError, match="scored again"):  # other calibration tokens: another memo
        build_plan(load_config("jobs/smoke.yaml", ["student.init=importance", "student.calibration_tokens=128"]), log=lambda m: None)


def test_importance_memo_is_keyed_by_the_teachers_weight_files(tmp_path):
    """A rewritten teacher (same path, new weights file) never reads the cut scored on the old one."""
    import os

    import torch

    from raykd.importance import memo_path

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"x" * 64)
    (teacher / "config.json").write_text("{}")
    ids = torch.arange(32).reshape(2, 16)
    first = memo_path(tmp_path, teacher, 4, ids, "block_ppl")
    assert memo_path(tmp_path, teacher, 4, ids, "block_ppl") == first  # stable
    (teacher / "config.json").write_text('{"a": 1}')  # not a weight file: same memo
    assert memo_path(tmp_path, teacher, 4, ids, "block_ppl") == first
    st = (teacher / "model.safetensors").stat()
    os.utime(teacher / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert memo_path(tmp_path, teacher, 4, ids, "block_ppl") != first
    assert memo_path(tmp_path, teacher, 5, ids, "block_ppl") != memo_path(tmp_path, teacher, 4, ids, "block_ppl")


@pytest.mark.parametrize("override, start", [
    # each listed value is checked against the teacher before any trial starts (the tiny teacher has 6 layers)
    ("sweep.params.student.num_layers={choice: [2, 9]}", "sweep.params.student.num_layers: the value 9 makes an invalid config "
                                                          "(student.num_layers: 9 must be between 1 and 5"),
    ("sweep.params.data.block_size={choice: [64, 4096]}", "sweep.params.data.block_size: the value 4096 makes an invalid config "
                                                          "(data.block_size: 4096 exceeds the teacher's context of 2048"),
    # nested keys from the command line are the dotted keys of the YAML; 1e-3 (YAML 1.1: text) is a number
    ("sweep.params.train.lr={loguniform: [1e-3, 1e-5]}", "sweep.params.train.lr.loguniform: expected [low, high] with low < high, got [0.001, 1e-05]"),
    ("sweep.params.train.lr={uniform: [a, 1]}", "sweep.params.train.lr.uniform: bounds must be numbers, got 'a'"),
])
def test_a_sweep_space_is_checked_value_by_value_before_ray(override, start, tiny_teacher_dir, tmp_path):
    proc = run_cli("sweep", "jobs/sweep-smoke.yaml", f"output_dir={tmp_path / 'sweep'}", override)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("raykd: error: " + start), proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_sweep_params_nested_from_the_command_line_are_dotted_keys():
    from raykd.sweep_config import SweepConfig

    sw = SweepConfig(params={"loss.kd": {"choice": ["jsd"]}, "train": {"lr": {"loguniform": ["1e-4", "1e-2"]}}})
    assert sw.params == {"loss.kd": {"choice": ["jsd"]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_address_where_nothing_answers_is_one_line_before_ray(monkeypatch, tmp_path, capsys, tiny_teacher_dir):
    """Ray retries an unreachable RAY_ADDRESS for minutes; raykd says so in one line, before anything is written."""
    from raykd.runtime import _check_answers

    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["distill", "jobs/smoke.yaml", f"output_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"raykd: error: RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:{port} (Connection refused); start it (`ray start --head`), "
        "correct the address, or unset RAY_ADDRESS to start Ray on this machine"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=rf"^RAY_ADDRESS: no Ray cluster answers at ray://localhost:{port} "):
        _check_answers(f"ray://localhost:{port}")
    for left_to_ray in ("auto", "http://127.0.0.1:8265", "somehost"):
        _check_answers(left_to_ray)
