"""Linear stand-ins for the layers a cut student drops (`student.dropped: linear`).

ReplaceMe (Shopkhoev et al. 2025, "ReplaceMe: Network Simplification via Layer Pruning and Linear
Transformations"): a pre-norm decoder layer `a` writes h_a = y_a + m_a, its attention residual y_a plus its
MLP's output m_a = down_proj(z_a) [N, H]. When teacher layers a+1 .. b-1 are dropped, the student's next layer
(a copy of teacher layer b) reads h_a where the teacher's reads h_{b-1}. A matrix T [H, H], fitted by ridge
least squares on calibration tokens,

    T = argmin_T  || m_a T - (h_{b-1} - y_a) ||^2 + lam ||T||^2,

makes y_a + m_a T stand in for h_{b-1}. Folded into layer a's down-projection (W' = T^T W, bias' = bias T) it
costs nothing when the student runs, and the student stays a plain model of the teacher's architecture.
On SmolLM2-135M cut to 10 of 30 layers the untrained cut's held-out perplexity falls from 11,932 to 562
(docs/BENCHMARKS.md), so training starts much nearer the teacher.

Pure torch (no Ray). The fit streams: per gap only the normal equations (M^T M and M^T (target - y), [H, H]
each, fp64) are kept, and a forward stops after the deepest layer any gap needs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from raykd.capture import decoder_layers

RIDGE = 1e-3  # lam as a fraction of the mean diagonal of M^T M: keeps T well posed on few tokens
MEMO_VERSION = 2  # bump when the fit changes: older memos are then never read


def gaps(kept: list[int], depth: int) -> list[tuple[int, int]]:
    """(a, b) for each run of dropped teacher layers a+1 .. b-1 that follows a kept layer a (b = `depth`: the
    teacher's last layers dropped, the target is its last layer's output). Dropped layers before the first kept
    one have no layer to fold into and are left out."""
    ends = list(kept) + [depth]
    return [(a, b) for a, b in zip(ends, ends[1:]) if b - a > 1]


def check_foldable(model: nn.Module, field: str = "student.dropped") -> None:
    """Every decoder layer adds its MLP's output straight to the residual stream through a Linear `down_proj`
    (Llama, Qwen, Mistral, SmolLM...); a model with a norm after its MLP (Gemma 2/3) cannot take the fold."""
    from raykd.config import ConfigError

    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(getattr(mlp, "down_proj", None), nn.Linear) or hasattr(layer, "post_feedforward_layernorm"):
            raise ConfigError(f"{field}: 'linear' needs decoder layers whose MLP ends in a Linear down_proj added to the "
                              f"residual (Llama, Qwen, Mistral...), not {type(layer).__name__}; use {field}=drop")


class _Stop(Exception):
    pass


def _output(o) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def fit(model: nn.Module, ids: torch.Tensor, pairs: list[tuple[int, int]], batch_size: int = 4,
        ridge: float = RIDGE) -> tuple[dict[tuple[int, int], torch.Tensor], dict[tuple[int, int], float]]:
    """The maps T [H, H] (fp32) for `pairs` (from `gaps`, teacher layer indices of `model`, the whole teacher)
    fitted on the token ids [N, T], and each one's relative residual ||m T - target||^2 / ||target||^2."""
    layers = decoder_layers(model)
    sources = sorted({a for a, _ in pairs})
    outputs = sorted({a for a, _ in pairs} | {b - 1 for _, b in pairs})
    last = max(outputs)
    gram = {a: 0.0 for a in sources}
    cross = {p: 0.0 for p in pairs}
    sq = {p: 0.0 for p in pairs}
    got: dict = {}

    def on_mlp(a):
        return lambda m, i, o: got.__setitem__(("m", a), _output(o).reshape(-1, _output(o).shape[-1]).double())

    def on_layer(i):
        def hook(m, args, o):
            got[("h", i)] = _output(o).reshape(-1, _output(o).shape[-1]).double()
            if i == last:
                raise _Stop  # nothing deeper is needed
        return hook

    handles = [layers[a].mlp.register_forward_hook(on_mlp(a)) for a in sources]
    handles += [layers[i].register_forward_hook(on_layer(i)) for i in outputs]
    was_training = model.training
    model.eval()
    try:
        for rows in ids.split(batch_size):
            got.clear()
            with contextlib.suppress(_Stop):
                model(input_ids=rows.to(next(model.parameters()).device), use_cache=False)
            for a in sources:
                m = got[("m", a)]
                gram[a] = gram[a] + m.T @ m
            for a, b in pairs:
                m = got[("m", a)]
                target = got[("h", b - 1)] - (got[("h", a)] - m)  # what layer b reads in the teacher, less y_a
                cross[(a, b)] = cross[(a, b)] + m.T @ target
                sq[(a, b)] = sq[(a, b)] + target.pow(2).sum()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    maps, residual = {}, {}
    for a, b in pairs:
        g = gram[a]
        lam = ridge * torch.diagonal(g).mean()
        t = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device), cross[(a, b)])
        # ||mT - y||^2 = tr(T^T G T) - 2 tr(T^T C) + ||y||^2, from the accumulated sums alone
        err = (t * (g @ t)).sum() - 2 * (t * cross[(a, b)]).sum() + sq[(a, b)]
        maps[(a, b)], residual[(a, b)] = t.float().cpu(), float(err / sq[(a, b)])
    return maps, residual


@torch.no_grad()
def fold(layer: nn.Module, t: torch.Tensor) -> None:
    """Fold T [H, H] into `layer`'s MLP down-projection in place: down_proj(z) T = z (T^T W)^T + bias T."""
    proj = layer.mlp.down_proj
    t = t.to(device=proj.weight.device, dtype=torch.float64)
    proj.weight.copy_((t.T @ proj.weight.double()).to(proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_((proj.bias.double() @ t).to(proj.bias.dtype))


def fold_student(student: nn.Module, kept: list[int], maps: dict[tuple[int, int], torch.Tensor]) -> int:
    """Fold each map (a, b) into the student layer copied from teacher layer a; returns how many were folded."""
    layers = decoder_layers(student)
    for (a, _), t in maps.items():
        fold(layers[kept.index(a)], t)
    return len(maps)


@contextlib.contextmanager
def folded(model: nn.Module, maps: dict[tuple[int, int], torch.Tensor]):
    """`model` (the whole teacher) with the maps folded into its layers a (restored on exit): a candidate cut
    scored with its stand-ins (`raykd.importance` with `only_layers`)."""
    layers = decoder_layers(model)
    saved = {a: (layers[a].mlp.down_proj.weight.detach().clone(),
                 None if layers[a].mlp.down_proj.bias is None else layers[a].mlp.down_proj.bias.detach().clone())
             for a, _ in maps}
    try:
        for (a, _), t in maps.items():
            fold(layers[a], t)
        yield model
    finally:
        with torch.no_grad():
            for a, (w, b) in saved.items():
                layers[a].mlp.down_proj.weight.copy_(w)
                if b is not None:
                    layers[a].mlp.down_proj.bias.copy_(b)


def save(path: Path, maps: dict[tuple[int, int], torch.Tensor]) -> None:
    """Written whole or not at all (a temporary file renamed): safetensors, one tensor per gap named 'a-b'."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({f"{a}-{b}": t.contiguous() for (a, b), t in maps.items()}, str(tmp))
    os.replace(tmp, path)


def load(path: Path) -> dict[tuple[int, int], torch.Tensor] | None:
    """The maps `save` wrote (safetensors: no pickle), None if absent or unreadable (then fitted anew)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
        return {tuple(int(x) for x in k.split("-")): t for k, t in raw.items()}
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return None


# --- the run's maps: fitted once (the driver's plan), read by every worker of the node ------------------------


def memo_path(root: Path, teacher_dir: Path, kept: list[int], ids: torch.Tensor) -> Path:
    """Where the maps of the cut `kept` fitted on `ids` are kept: a name hashing the teacher's weight files (path,
    size, mtime), the cut, the ridge and the token ids, so a changed teacher or corpus never reads old maps."""
    from raykd.calibration import memo_digest

    return root / "dropped" / f"{memo_digest(f'v{MEMO_VERSION}', teacher_dir, ids, list(kept), RIDGE)}.safetensors"


def maps_for(cfg, teacher_dir: Path, kept: list[int], teacher: nn.Module | None = None, log=print):
    """The maps of the cut `kept` for a run config with `student.dropped: linear`: read from the node's cache, or
    fitted on an fp32 teacher (`teacher` when it is one, else loaded for the fit) and cached."""
    from raykd import models
    from raykd.calibration import calibration

    trc = cfg.teacher.trust_remote_code
    _, fit_ids = calibration(cfg, models.load_tokenizer(teacher_dir, trc))
    path = memo_path(models.cache_root(), teacher_dir, kept, fit_ids)
    if (found := load(path)) is not None:
        return found
    if teacher is None or next(teacher.parameters()).dtype != torch.float32:
        teacher = models.load_model(teacher_dir, torch.float32, trc, frozen=True)
    check_foldable(teacher)
    maps, residual = fit(teacher, fit_ids, gaps(kept, len(decoder_layers(teacher))))
    log("raykd: linear stand-ins for the dropped layers, fitted on "
        f"{fit_ids.numel()} tokens: " + ", ".join(f"{a}->{b} residual {r:.3f}" for (a, b), r in residual.items()))
    save(path, maps)
    return maps


def applies(cfg) -> bool:
    """Whether a run config's student gets stand-ins: `student.dropped: linear` on a cut (not `student.model`)."""
    return cfg.student.dropped == "linear" and not cfg.student.model


def stand_ins(cfg, teacher_dir: Path, student: nn.Module, teacher: nn.Module | None = None, log=print, maps: dict | None = None) -> nn.Module:
    """`student`, cut from the teacher's layers `cfg.student.layers`, with `student.dropped`'s stand-ins folded in
    (unchanged for `drop` or a student that is not a cut): `maps` when given (the driver's), else `maps_for`'s."""
    if applies(cfg):
        kept = list(cfg.student.layers)
        fold_student(student, kept, maps if maps is not None else maps_for(cfg, teacher_dir, kept, teacher, log))
    return student
