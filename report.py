"""Counting (parameters, multiply-accumulates) and the per-layer report table.

MACs are counted per image, for the layers that carry the arithmetic: convolutions
(``out_elements * in_channels / groups * kh * kw``), Linear layers
(``out_features * in_features`` per row) and :class:`decompositions.DiagonalLinear`
(one multiply-add per stored weight); products computed outside those layers (Swin's and
MaxViT's attention) from the operators.  Pooling, activations and normalization are left
out, as fvcore and thop do by default.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import torch
from torch import nn

from atomic import atomic_open

__all__ = ["count_params", "count_macs", "module_macs", "record_input_shapes", "format_table", "totals",
           "write_json"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def module_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one leaf module's forward call, per image (batch dimension divided out)."""
    batch = inp.shape[0] if inp.dim() > 1 else 1
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() // batch * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() // batch * module.in_features
    weight = getattr(module, "weight", None)
    if getattr(module, "method", None) == "diagonal" and weight is not None:
        return inp.numel() // batch // module.in_features * weight.numel()
    if isinstance(module, nn.MultiheadAttention):
        # Its projections are functional calls on its weights (no Linear forward to hook):
        # q, k, v and the output projection, E^2 each per token, and the two L x L products
        # (self-attention: the query's length for all three).
        tokens = inp.shape[1] if module.batch_first or inp.dim() == 2 else inp.shape[0]
        embed = module.embed_dim
        return 4 * tokens * embed * embed + 2 * tokens * tokens * embed
    return 0


def _leaf_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if (isinstance(module, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))
                or getattr(module, "method", None) == "diagonal"):
            yield name, module


def _run_with_hooks(model: nn.Module, example: torch.Tensor, hook, pre=None) -> None:
    """One eval-mode forward pass with ``hook(name)`` (and ``pre``, a forward pre-hook, when
    given) on every counted layer; the hooks and the training mode are restored after."""
    leaves = list(_leaf_modules(model))
    handles = [m.register_forward_hook(hook(name)) for name, m in leaves]
    if pre is not None:
        handles += [m.register_forward_pre_hook(pre) for _, m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """MACs of one forward pass for one image of shape ``input_size`` (C, H, W).

    A layer called twice is counted twice.  Products a model computes outside any counted
    layer -- the attention of Swin (``shifted_window_attention``) and MaxViT, written as
    ``matmul`` / ``einsum`` in their forward functions -- are counted from the operators
    themselves (:class:`torch.utils.flop_counter.FlopCounterMode`, FLOPs / 2): no module
    hook sees them.
    """
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    example = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    total = 0
    depth = 0        # how many counted layers the forward pass is inside
    entered_at = 0   # the operator count when the outermost one began
    inside = 0       # operator FLOPs inside counted layers: already in ``total`` by their rule

    def pre(module, args):
        nonlocal depth, entered_at
        if depth == 0:
            entered_at = counter.get_total_flops()
        depth += 1

    def hook(name):
        def fn(module, args, out):
            nonlocal total, depth, inside
            total += module_macs(module, args[0], out)
            depth -= 1
            if depth == 0:
                inside += counter.get_total_flops() - entered_at
        return fn

    with counter:
        _run_with_hooks(model, example, hook, pre)
    return total + (counter.get_total_flops() - inside) // 2


def record_input_shapes(model: nn.Module, input_size: Sequence[int], *,
                        calls: dict[str, int] | None = None) -> dict[str, tuple[torch.Size, int]]:
    """For each conv/Linear layer: (input shape, MACs) of its first call on one image; ``calls``,
    when given, is filled with how many times each layer is called in the forward pass."""
    param = next(model.parameters())
    example = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    shapes: dict[str, tuple[torch.Size, int]] = {}

    def hook(name):
        def fn(module, args, out):
            shapes.setdefault(name, (args[0].shape, module_macs(module, args[0], out)))
            if calls is not None:
                calls[name] = calls.get(name, 0) + 1
        return fn

    _run_with_hooks(model, example, hook)
    return shapes


def totals(rows: Sequence[dict], *, params_total: tuple[int, int], macs_total: tuple[int, int]) -> dict:
    """Whole-model totals next to the per-layer rows: before, after and the ratio."""
    (p0, p1), (m0, m1) = params_total, macs_total
    return {
        "layers_decomposed": sum(not r["skipped"] for r in rows),
        "layers_skipped": sum(bool(r["skipped"]) for r in rows),
        "params_before": p0,
        "params_after": p1,
        "params_ratio": p0 / p1 if p1 else float("inf"),
        "macs_before": m0,
        "macs_after": m1,
        "macs_ratio": m0 / m1 if m1 else float("inf"),
    }


def short_list(items: Sequence[str], limit: int = 4, *, sep: str = ", ") -> str:
    """``a, b, c and N more``: a list capped for one line of output ("none" when empty);
    ``sep="; "`` for items that hold commas themselves (whole reasons)."""
    if not items:
        return "none"
    shown = sep.join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_table(rows: Sequence[dict], summary: dict | None = None) -> str:
    """A fixed-width text table of the per-layer report rows (and totals)."""
    header = ("layer", "kind", "shape", "method", "ranks", "params", "MACs", "rel.err", "note")
    lines = []
    for r in rows:
        ranks = "-" if r["ranks"] is None else "x".join(str(v) for v in r["ranks"])
        err = "-" if r["error"] is None else f"{r['error']:.3f}"
        note = f"skipped: {r['reason']}" if r["skipped"] else (r["reason"] or "")
        lines.append((
            r["name"], r["kind"], "x".join(str(v) for v in r["shape"]), r["method"], ranks,
            f"{_human(r['params_before'])}->{_human(r['params_after'])}",
            f"{_human(r['macs_before'])}->{_human(r['macs_after'])}", err, note,
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths[:-1]), "----")]
    out += [fmt.format(*line) for line in lines]
    if summary:
        out.append(
            f"total: params {_human(summary['params_before'])} -> {_human(summary['params_after'])} "
            f"({summary['params_ratio']:.2f}x smaller), MACs {_human(summary['macs_before'])} -> "
            f"{_human(summary['macs_after'])} ({summary['macs_ratio']:.2f}x fewer); "
            f"{summary['layers_decomposed']} layers decomposed, {summary['layers_skipped']} skipped"
        )
    return "\n".join(out)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON (atomically: temp file, then rename)."""
    with atomic_open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
