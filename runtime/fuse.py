"""Find conv -> BatchNorm -> ReLU and conv -> BatchNorm -> add -> ReLU in a model it did not
write (``torch.fx`` tracing) and switch them to :class:`~dfpgen.runtime.fused_bn.DFPBatchNorm2d`.

Modules are visited children first, so each pattern is fused in the smallest module whose
``forward`` contains all of it. In a traced module:

- conv -> BN -> ReLU where the ReLU is an ``nn.ReLU`` module: the BN becomes
  ``DFPBatchNorm2d(fuse="relu")`` and the ReLU module a :class:`FusedReLU` (passes the
  fused output through, applies ReLU to anything else: a ReLU module shared by several call
  sites stays right). No graph is rewritten; the module keeps its class.
- conv -> BN -> add(., residual) -> ReLU (the bottleneck's end): the module's graph is
  rewritten so that the BN takes the residual (``fuse="add_relu"``), and the module is
  replaced in its parent by the rewritten ``torch.fx.GraphModule`` (same submodules, same
  ``state_dict`` keys; checked, else left unfused). A functional ReLU (``F.relu``) after a
  BN is rewritten the same way. The model itself (the root) is never replaced: such a
  pattern in the root's own ``forward`` stays unfused.
- conv -> BN whose output feeds anything else inside the module (e.g. the projection
  shortcut's BN feeding the add): ``fuse="none"`` (DFP16 output with its range, so the add
  above needs no extra read of it).

A module that does not trace (data-dependent control flow, ...) is not fused; when it owns a
BatchNorm directly, one :class:`FusionWarning` names it. Its children are still visited.
"""
from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .fused_bn import DFPBatchNorm2d, FusedReLU


class FusionWarning(UserWarning):
    """A block of the model runs its BatchNorms unfused (it could not be traced)."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.Identity)):
            return True
        return super().is_leaf_module(m, qualname)


_ADDS = {operator.add, operator.iadd, torch.add}
_RELU_FNS = {F.relu, torch.relu, torch.relu_}


@dataclass
class _Pattern:
    bn: fx.Node
    kind: str             # "relu" | "add_relu" | "none"
    last: fx.Node         # the BN node or the Identity chain after it
    add: fx.Node | None = None
    relu: fx.Node | None = None
    residual: fx.Node | None = None


def _is_module(node: fx.Node, mods: dict, cls) -> bool:
    return node.op == "call_module" and type(mods.get(node.target)) in cls


def _through_identity(node: fx.Node, mods: dict) -> fx.Node:
    while _is_module(node, mods, (nn.Identity,)):
        node = node.args[0]
    return node


def _sole_user(node: fx.Node, mods: dict):
    """(the node after ``node`` and any Identity modules, the last node of that chain)."""
    while len(node.users) == 1:
        (u,) = node.users
        if _is_module(u, mods, (nn.Identity,)):
            node = u
            continue
        return u, node
    return None, node


def _is_relu(node: fx.Node, mods: dict) -> bool:
    if _is_module(node, mods, (nn.ReLU,)):
        return True
    if node.op == "call_function" and node.target in _RELU_FNS:
        return True
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in ("add", "add_"))


def find_patterns(gm: fx.GraphModule) -> list[_Pattern]:
    """The BN patterns of a traced module (BNs called once, on a conv's output)."""
    mods = dict(gm.named_modules())
    calls: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    out = []
    for n in gm.graph.nodes:
        if not _is_module(n, mods, (nn.BatchNorm2d,)) or calls[n.target] != 1 or len(n.args) != 1 or n.kwargs:
            continue
        if not isinstance(mods[n.target], nn.BatchNorm2d) or not _is_module(
                _through_identity(n.args[0], mods), mods, (nn.Conv2d,) + _dfp_convs()):
            continue
        u, last = _sole_user(n, mods)
        if u is None or u.op == "output":
            continue  # the consumer is outside this module: decided one level up
        if _is_relu(u, mods):
            out.append(_Pattern(n, "relu", last, relu=u))
        elif _is_add(u) and len(u.users) == 1 and _is_relu(next(iter(u.users)), mods):
            other = u.args[1] if u.args[0] is last else u.args[0]
            if isinstance(other, fx.Node) and other is not last:
                out.append(_Pattern(n, "add_relu", last, add=u, relu=next(iter(u.users)), residual=other))
            else:
                out.append(_Pattern(n, "none", last))
        else:
            out.append(_Pattern(n, "none", last))
    # Both operands of an add may be conv -> BN (the projection shortcut): the add goes to the
    # main branch's BN, the one whose conv does not read the module's input directly.
    by_add: dict = {}
    for p in out:
        if p.kind == "add_relu":
            by_add.setdefault(p.add, []).append(p)
    for group in by_add.values():
        if len(group) > 1:
            reads_input = [_through_identity(p.bn.args[0], mods).args[0].op == "placeholder" for p in group]
            keep = reads_input.index(False) if False in reads_input else 0
            for i, p in enumerate(group):
                if i != keep:
                    p.kind, p.add, p.relu, p.residual = "none", None, None, None
    return out


def _dfp_convs():
    from .modules import DFPConv2d
    return (DFPConv2d,)


def _swap(root: nn.Module, dotted: str, new_cls, init=None) -> nn.Module:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    new = copy.copy(old)
    new.__class__ = new_cls
    if init is not None:
        init(new)
    setattr(parent, child, new)
    return new


def _bn(kind: str, name: str):
    # A ReLU output goes on to a conv (the next layer, or the next block's first conv and
    # projection shortcut): its INT16 mantissas spare that conv's quantize pass. A "none"
    # BatchNorm feeds an add: float32 only.
    return lambda m: m._dfp_bn_init(kind, emit_int16=kind != "none", name=name)


def _fuse_module(module: nn.Module, prefix: str, is_root: bool) -> tuple[list[str], nn.Module | None]:
    """Fuse the patterns of ``module``; returns (fused BN names, a GraphModule replacing
    ``module`` or None)."""
    try:
        gm = fx.GraphModule(module, _Tracer().trace(module), class_name=type(module).__name__)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: not fused here
        if any(type(c) is nn.BatchNorm2d for c in module.children()):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"dfpgen: block {prefix or type(module).__name__!r} does not trace with torch.fx "
                          f"({first[:160]}); its BatchNorm layers run unfused", FusionWarning, stacklevel=4)
        return [], None
    pats = find_patterns(gm)
    mods = dict(gm.named_modules())
    rewrite = [p for p in pats if p.kind == "add_relu" or (p.kind == "relu" and not _is_module(p.relu, mods, (nn.ReLU,)))]
    if is_root:
        rewrite = []
    done = []
    full = lambda t: f"{prefix}.{t}" if prefix else t  # noqa: E731
    shared_relu_ok = {}
    for p in pats:
        if p in rewrite:
            continue
        kind = p.kind if p.kind != "add_relu" else "none"
        if kind == "relu" and not _is_module(p.relu, mods, (nn.ReLU,)):
            kind = "none"
        _swap(module, p.bn.target, DFPBatchNorm2d, _bn(kind, full(p.bn.target)))
        if kind == "relu":
            shared_relu_ok[p.relu.target] = True
        done.append(full(p.bn.target))
    for target in shared_relu_ok:
        if type(module.get_submodule(target)) is nn.ReLU:
            _swap(module, target, FusedReLU)
    if not rewrite:
        return done, None
    keys = list(module.state_dict().keys())
    g = gm.graph
    for p in rewrite:
        _swap(module, p.bn.target, DFPBatchNorm2d, _bn(p.kind, full(p.bn.target)))
        if p.kind == "add_relu":
            with g.inserting_before(p.add):
                new = g.call_module(p.bn.target, (p.bn.args[0], p.residual))
            p.relu.replace_all_uses_with(new)
            g.erase_node(p.relu)
            g.erase_node(p.add)
            chain = []
            n = p.last
            while n is not p.bn:
                chain.append(n); n = n.args[0]
            for n in chain + [p.bn]:
                g.erase_node(n)
        else:
            p.relu.replace_all_uses_with(p.relu.args[0])
            g.erase_node(p.relu)
        done.append(full(p.bn.target))
    g.lint()
    new_gm = fx.GraphModule(module, g, class_name=type(module).__name__)
    _reorder(new_gm, module)
    if list(new_gm.state_dict().keys()) != keys:
        # Undo: a module the graph does not call would drop out of the state_dict.
        for p in rewrite:
            _unswap(module, p.bn.target)
        warnings.warn(f"dfpgen: block {prefix!r}: fusing the residual add would change its state_dict "
                      "keys; its add + ReLU run unfused", FusionWarning, stacklevel=4)
        return [d for d in done if d not in {full(p.bn.target) for p in rewrite}], None
    new_gm.__dict__["_dfp_unfused"] = module  # revert() puts the original module back
    return done, new_gm


def _reorder(new: nn.Module, orig: nn.Module) -> None:
    """Order ``new``'s children, parameters and buffers as ``orig``'s (a GraphModule copies
    them in call order), recursing into the holder modules it made for dotted targets."""
    for attr in ("_modules", "_parameters", "_buffers"):
        d, ref = getattr(new, attr), getattr(orig, attr)
        keys = [k for k in ref if k in d] + [k for k in d if k not in ref]
        items = [(k, d[k]) for k in keys]
        d.clear()
        d.update(items)
    for k, child in new._modules.items():
        o = orig._modules.get(k)
        if o is not None and child is not o and child is not None:
            _reorder(child, o)


def _unswap(root: nn.Module, dotted: str) -> None:
    m = root.get_submodule(dotted)
    back = {DFPBatchNorm2d: nn.BatchNorm2d, FusedReLU: nn.ReLU}.get(type(m))
    if back is None:
        return
    new = _swap(root, dotted, back)
    for attr in ("fuse", "emit_int16", "dfp_name", "_dfp_int16_pad"):
        new.__dict__.pop(attr, None)


def fuse_batchnorm(model: nn.Module) -> list[str]:
    """Switch the conv -> BN (-> add) -> ReLU patterns of ``model`` to fused DFP16 BatchNorm,
    in place (see the module docstring); returns the names of the fused BatchNorm layers."""
    fused: list[str] = []

    def has_bn(m):
        return any(type(c) is nn.BatchNorm2d for c in m.modules())

    def visit(m: nn.Module, name: str, parent: nn.Module | None, child: str) -> None:
        if not has_bn(m):
            return
        for cname, c in list(m.named_children()):
            visit(c, f"{name}.{cname}" if name else cname, m, cname)
        m = getattr(parent, child) if parent is not None else m
        if not has_bn(m):
            return
        done, replacement = _fuse_module(m, name, parent is None)
        fused.extend(done)
        if replacement is not None:
            setattr(parent, child, replacement)

    visit(model, "", None, "")
    return fused


def unfuse_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_batchnorm` in place: original blocks, ``nn.BatchNorm2d``, ``nn.ReLU``."""
    for name, m in list(model.named_modules()):
        orig = m.__dict__.get("_dfp_unfused") if name else None
        if orig is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, orig)
    for name, m in list(model.named_modules()):
        if name and type(m) in (DFPBatchNorm2d, FusedReLU):
            _unswap(model, name)
    return model
