import shutil

import pytest
import torch

from raykd.config import ConfigError
from raykd.models import (
    build_tiny_random,
    check_same_vocab,
    count_params,
    cut_student,
    load_model,
    load_tokenizer,
    resolve_model,
)


def test_tiny_teacher_is_cached_and_deterministic(tiny_teacher_dir):
    assert build_tiny_random("tiny-random") == tiny_teacher_dir  # second call: the cache
    assert (tiny_teacher_dir / "config.json").is_file() and (tiny_teacher_dir / "tokenizer.json").is_file()
    other = build_tiny_random("tiny-random:layers=4,hidden=32,heads=2,kv_heads=1")
    assert other != tiny_teacher_dir
    m = load_model(other)
    assert m.config.num_hidden_layers == 4 and m.config.hidden_size == 32


def test_all_layers_kept_reproduces_the_teacher(tiny_teacher):
    L = tiny_teacher.config.num_hidden_layers
    student = cut_student(tiny_teacher, list(range(L)))
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, tiny_teacher(ids).logits, rtol=0, atol=0)
    assert count_params(student) == count_params(tiny_teacher)


def test_cut_student_copies_the_kept_layers_and_trains(tiny_teacher, tmp_path):
    keep = [0, 3, 5]
    student = cut_student(tiny_teacher, keep)
    assert student.config.num_hidden_layers == 3
    for new, old in enumerate(keep):
        a = student.model.layers[new].mlp.down_proj.weight
        b = tiny_teacher.model.layers[old].mlp.down_proj.weight
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # a copy, not a view
        assert student.model.layers[new].self_attn.layer_idx == new
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in tiny_teacher.parameters())
    # the cut is a plain HF model: save / load without raykd
    from transformers import AutoModelForCausalLM

    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, student(ids).logits)


def test_vocab_mismatch_is_a_clear_error(tiny_teacher_dir):
    other = build_tiny_random("tiny-random:vocab=512")
    with pytest.raises(ConfigError, match=r"^student.model: vocabulary differs"):
        check_same_vocab(load_tokenizer(tiny_teacher_dir), load_tokenizer(other))
    check_same_vocab(load_tokenizer(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir))


def test_resolve_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^teacher.model: .* not found"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache.*local model directory"):
        resolve_model("someorg/some-model")
    with pytest.raises(ConfigError, match="tiny-random"):
        resolve_model("tiny-random:layers=x")


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00", b"GGUF" + bytes(range(256)) * 4, b"not a gguf file at all"])
def test_an_unreadable_gguf_is_one_line_and_leaves_no_teacher_behind(tmp_path, monkeypatch, content):
    """A download cut short or another format: one ConfigError naming the field and the fix, no half-converted teacher."""
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "teacher.gguf"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^teacher.model: {f} is not a GGUF model transformers can read \(.*\); give a complete .gguf"):
        resolve_model(str(f))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_local_dir_spec(tiny_teacher_dir, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, copy)
    assert resolve_model(str(copy)) == copy


@pytest.mark.parametrize("capability, fast", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_on_a_gpu_is_chosen_by_compute_capability(monkeypatch, capability, fast):
    """A T4/V100-class GPU (< 8.0) emulates bf16 even where torch reports it supported: auto stays fp32."""
    import torch

    from raykd import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert models.bf16_is_fast() is fast
