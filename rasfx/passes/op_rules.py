"""How each ATen op treats the token axis: token-wise, token-mixing, or opaque.

``classify(node)`` returns an ``OpRule``:
- ``tokenwise``: the op never combines values of different tokens; it can run on the
  active tokens only (its token axes pass through);
- ``mixing``: some operands are contracted or reduced over their token axis; those
  (``full``) must be full length (fresh values for active tokens, cached ones for the
  rest); the other operands pass through;
- ``opaque``: unknown or irregular; the conservative answer (run at full length on
  full-length inputs) is always correct.

``cheap`` marks ops worth running at full length when all their inputs are full anyway
(views, elementwise ops): the active region starts at the first op that is not cheap.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Optional, cast

import torch
import torch.fx as fx

from ..errors import ArgumentTypeError
from ..tokenwise_modules import TOKENWISE_OP
from .token_info import all_token_axes, token_axes, tokens_kept

aten = torch.ops.aten


@dataclass
class OpRule:
    """How one op treats the token axis (see the module docstring); returned by the built-in
    rules and by user rules (``TransformConfig.op_rules``)."""

    kind: str  # "tokenwise" | "mixing" | "opaque"
    full: set = field(default_factory=set)  # input nodes needed at full length
    cheap: bool = False
    reason: str = ""
    # operands with several token axes gathered along their first one only (an attention
    # mask [.., queries, keys]: its query rows follow the active queries, its key columns
    # stay full length because the keys come from the caches)
    rows: set = field(default_factory=set)


VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int, aten.expand.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default,
    aten.type_as.default, aten.view_as_complex.default, aten.view_as_real.default,
    aten.lift_fresh_copy.default, aten.dropout.default, aten.slice.Tensor, aten.narrow.default,
    aten.select.int, aten.movedim.int, aten.swapaxes.default, aten.real.default, aten.imag.default,
    aten.view.dtype, aten.expand_as.default, aten.reshape_as.default, aten.view_as.default,
    aten.feature_dropout.default, aten.alpha_dropout.default, aten.identity.default if hasattr(aten, "identity") else aten.alias.default,
    operator.getitem,
}
LIKE_OPS = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
            aten.rand_like.default, aten.randn_like.default}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default, aten.tensor_split.indices}
CAT_OPS = {aten.cat.default, aten.concat.default, aten.stack.default}
REDUCE_OPS = {
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
    aten.var_mean.correction, aten.std.correction, aten.softmax.int, aten._softmax.default,
    aten.log_softmax.int, aten._log_softmax.default, aten.logsumexp.default, aten.norm.ScalarOpt_dim,
    aten.linalg_vector_norm.default, aten.argmax.default, aten.max.dim, aten.min.dim, aten.cumsum.default,
    aten.prod.dim_int, aten.any.dim, aten.all.dim,
}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
INDEX_PUT_OPS = {aten.index_put.default, aten.index_put_.default}
MATMUL_OPS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
              aten.matmul.default, aten.einsum.default}


def is_pointwise(target) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


def mutated_input(node: fx.Node):
    """The argument an in-place op writes to (``None`` for functional ops)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable or not node.args:
        return None
    first = schema.arguments[0]
    if first.alias_info is not None and first.alias_info.is_write and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _returns_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def storage_root(node: fx.Node) -> fx.Node:
    """The node whose storage ``node`` views, through view ops and their getitems (itself
    when it is no view)."""
    while True:
        src = node.args[0] if node.target is operator.getitem and node.args else node
        if not isinstance(src, fx.Node) or not _returns_view(src) or not src.args or not isinstance(src.args[0], fx.Node):
            return node
        node = src.args[0]


def mutated_storages(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """The storages the in-place ops of ``graph`` write (``x[i, :L] = v`` is a ``copy_`` into a
    view of ``x``): root node (``storage_root``) -> the writes, in graph order."""
    roots: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.is_mutable:
            continue
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
                roots.setdefault(storage_root(value), []).append(node)
    return roots


def _rank(node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _axis_dims(node) -> set:
    return {a.dim for a in token_axes(node)}


def _dims_arg(node, pos, key, rank):
    dims = node.args[pos] if len(node.args) > pos else node.kwargs.get(key)
    if dims is None:
        return set(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return {d % rank for d in dims}


def _contracted(node) -> dict:
    """{input node: contracted dims} for the matmul family."""
    t, a = node.target, node.args
    if t is aten.linear.default:
        return {a[0]: {_rank(a[0]) - 1}}
    if t is aten.mm.default:
        return {a[0]: {1}, a[1]: {0}}
    if t is aten.addmm.default:
        return {a[1]: {1}, a[2]: {0}}
    if t is aten.bmm.default:
        return {a[0]: {2}, a[1]: {1}}
    if t is aten.baddbmm.default:
        return {a[1]: {2}, a[2]: {1}}
    if t is aten.matmul.default:
        rb = _rank(a[1])
        return {a[0]: {_rank(a[0]) - 1}, a[1]: {0 if rb == 1 else rb - 2}}
    if t is aten.einsum.default:
        eq = a[0].replace(" ", "")
        lhs, _, rhs = eq.partition("->")
        subs = lhs.split(",")
        if "." in eq or not rhs and "->" not in eq:
            return {}
        out: dict[fx.Node, set[int]] = {}
        for op, sub in zip(a[1], subs):
            out.setdefault(op, set()).update(i for i, ch in enumerate(sub) if ch not in rhs)
        return out
    return {}


def classify(node: fx.Node, kv_cache: bool = True, extra: Optional[dict] = None) -> OpRule:
    """``kv_cache=False`` is the paper's ablation without K/V recovery: attention of the
    active queries over the active keys/values only (and the conditioning tokens).
    ``extra``: user rules ``{op: rule(node) -> OpRule}`` (``TransformConfig.op_rules``),
    consulted before rasfx's own; an op may be given as an overload or its packet."""
    t = node.target
    if extra and node.op == "call_function":
        user = extra.get(t) or extra.get(getattr(t, "overloadpacket", None))
        if user is not None:
            rule = user(node)
            if not isinstance(rule, OpRule) or rule.kind not in ("tokenwise", "mixing", "opaque"):
                raise ArgumentTypeError(
                    f"the op rule for {t} returned {rule!r}; it must return rasfx.OpRule('tokenwise' | "
                    "'mixing' | 'opaque', full=..., reason=...)"
                )
            return rule
    ins = [i for i in node.all_input_nodes if token_axes(i)]
    out_axes = all_token_axes(node)
    # fx types every argument as any ``Argument``; the ATen schema of the op says which is
    # a node and which an int (the casts below)
    args = node.args
    if node.op != "call_function":
        return OpRule("opaque", set(ins), reason=f"{node.op}")
    if t in SDPA_OPS:  # its mask may carry a query and a key token axis
        return _attention_rule(node, ins, kv_cache)
    if any(len(token_axes(i)) > 1 for i in ins) or len(token_axes(node)) > 1:
        return OpRule("opaque", set(ins), reason="tensor with several token axes")
    if t is TOKENWISE_OP:  # a module checked to be token-wise over every row of its input (tokenwise_modules)
        if ins and _rank(args[0]) - 1 in _axis_dims(args[0]):
            return OpRule("opaque", set(ins), reason="token-wise module given the tokens in its feature dim")
        return OpRule("tokenwise", reason="module run as one token-wise op")
    if t in VIEW_OPS or t in SPLIT_OPS:
        if t is aten.select.int and ins and (cast(int, args[1]) % _rank(args[0])) in _axis_dims(args[0]):
            return OpRule("opaque", set(ins), reason="select on the token axis")
        if t is aten.chunk.default and ins:
            d = cast(int, args[2] if len(args) > 2 else 0) % _rank(args[0])
            if d in _axis_dims(args[0]):
                return OpRule("opaque", set(ins), reason="chunk over the token axis")
        if t is aten.unbind.int and ins:
            d = cast(int, args[1] if len(args) > 1 else 0) % _rank(args[0])
            if d in _axis_dims(args[0]):
                return OpRule("opaque", set(ins), reason="unbind over the token axis")
        if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
                 aten.unflatten.int) and ins:
            src = ins[0]
            if not out_axes:
                return OpRule("opaque", set(ins), reason="reshape splits or merges the token axis")
            if not tokens_kept(src.meta["val"].shape, token_axes(src)[0], node.meta["val"].shape, out_axes[0]):
                return OpRule("opaque", set(ins), reason="reshape merges the token axis with another dim")
        return OpRule("tokenwise", cheap=True)
    if t in CAT_OPS or t in LIKE_OPS:
        return OpRule("tokenwise", cheap=True)
    if t is aten.embedding.default:  # a per-token lookup: the indices' token axis passes through
        return OpRule("tokenwise") if args[0] not in ins else OpRule("opaque", set(ins), reason="embedding table over tokens")
    if t in INDEX_PUT_OPS and ins:
        return _index_put_rule(node, ins)
    if t is aten.index.Tensor and ins:
        return _index_rule(node, ins)
    if t is aten.index_select.default and ins:
        d = cast(int, args[1]) % _rank(args[0])
        if d in _axis_dims(args[0]) or args[2] in ins:
            return OpRule("opaque", set(ins), reason="index_select over the token axis")
        return OpRule("tokenwise", cheap=True)
    if t in (aten.constant_pad_nd.default, aten.pad.default) and ins:  # any mode: only the padded dims mix
        rank, pad = _rank(args[0]), cast("list[int]", args[1])
        padded = {rank - 1 - i // 2 for i, p in enumerate(pad) if p}
        constant = t is aten.constant_pad_nd.default or (args[2] if len(args) > 2 else "constant") == "constant"
        if padded & _axis_dims(args[0]) and (not constant or node.meta.get("rasfx_ints")):
            # widths that follow the token count (padding to a multiple): the padding mixes
            return OpRule("opaque", set(ins), reason="padding of the token axis")
        # constant widths (Mochi pads each prompt's attention output to one length): the padded
        # positions are conditioning positions, never image tokens
        return OpRule("tokenwise", cheap=True)
    if is_pointwise(t) or t is aten.copy_.default:
        rank = _rank(node)
        for i in ins:
            for ax in token_axes(i):
                if ax.dim + rank - _rank(i) not in {a.dim for a in out_axes}:
                    return OpRule("opaque", set(ins), reason="broadcast moves the token axis")
        return OpRule("tokenwise", cheap=True)
    if t in REDUCE_OPS:
        src = cast(fx.Node, args[0])
        rank = _rank(src)
        if t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
                 aten.cumsum.default, aten.argmax.default, aten.max.dim, aten.min.dim, aten.prod.dim_int,
                 aten.any.dim, aten.all.dim):
            dims = {args[1] % rank} if len(args) > 1 and isinstance(args[1], int) else set(range(rank))
        elif t in (aten.norm.ScalarOpt_dim,):
            dims = _dims_arg(node, 2, "dim", rank)
        elif t is aten.linalg_vector_norm.default:
            dims = _dims_arg(node, 2, "dim", rank)
        else:
            dims = _dims_arg(node, 1, "dim", rank)
        if dims & _axis_dims(src):
            return OpRule("mixing", {src}, reason=f"reduction over the token axis ({t})")
        return OpRule("tokenwise")
    if t in NORM_OPS:
        src = cast(fx.Node, args[0])
        shape = cast("list[int]", args[1])
        if any(d >= _rank(src) - len(shape) for d in _axis_dims(src)):
            return OpRule("mixing", {src}, reason="normalisation over the token axis")
        return OpRule("tokenwise")
    if t is aten.repeat.default and ins:
        src, repeats = cast(fx.Node, args[0]), list(cast("list[int]", args[1]))
        lead = len(repeats) - _rank(src)
        if any(repeats[lead + d] != 1 for d in _axis_dims(src)):
            return OpRule("opaque", set(ins), reason="repeat along the token axis")
        return OpRule("tokenwise", cheap=True)
    if t in _POINTWISE_CONVS and ins and _pointwise_conv(node):
        return OpRule("tokenwise")
    if t in MATMUL_OPS:
        contracted = _contracted(node)
        if not contracted:
            return OpRule("opaque", set(ins), reason=f"unparsed {t}")
        full = {i for i in ins if _axis_dims(i) & contracted.get(i, set())}
        passing = [i for i in ins if i not in full]
        if len(passing) > 1:
            return OpRule("opaque", set(ins), reason="product of two token sequences")
        if full:
            return OpRule("mixing", full, reason="contraction over the token axis")
        return OpRule("tokenwise")
    if t is aten.pad_sequence.default and ins:
        seqs = cast("list[fx.Node]", args[0])
        if len({tuple(s.meta["val"].shape) for s in seqs}) == 1 and all(_axis_dims(s) == {0} for s in seqs):
            # sequences of one length (Z-Image's per-sample ones, each padded to a multiple of
            # 32 before): nothing is padded, a stack of the rows along a new batch dim
            return OpRule("tokenwise", cheap=True)
        return OpRule("opaque", set(ins), reason="pad_sequence of sequences of different lengths")
    return OpRule("opaque", set(ins), reason=f"unknown op {t}")


def _index_put_rule(node: fx.Node, ins: list) -> OpRule:
    """``x[mask] = v`` / ``x[mask] *= c`` (``index_put`` with one boolean mask over the leading
    dims of ``x``, GLM-Image's ``prior_embedding[prior_token_drop] *= 0.0``): token-wise when
    the mask carries ``x``'s token axes in the dims it covers (gathered with the same active
    index as ``x``, each token's row is written or not by its own mask element) and the values
    are broadcast over the masked elements (no dim of their own per masked element). So is
    ``x[..., idx] = v``, an index into the dims after the token axes (``_after_tokens``:
    Ideogram's interleaved RoPE sections), with values whose token axes line up with ``x``'s.
    Values listed one row per masked element follow the mask's order, not the tokens (an active
    subset would take the wrong rows), and an integer index into the token axis names token
    positions (``x[idx] = v`` moves values between tokens): both run at full length.
    ``prompt_values`` replays a specialised ``x[mask] = rows`` as a token-wise write."""
    x, indices, values = cast("tuple[fx.Node, list, object]", node.args[:3])
    x_axes = token_axes(x)
    if x_axes and _after_tokens(x, indices):
        rank = _rank(x)
        shifted = {replace(a, dim=a.dim + rank - _rank(values)) for a in token_axes(values)} if isinstance(
            values, fx.Node) else set()
        if not shifted <= set(x_axes):  # the same axes (segment, offset, fold) in the same dims as x's
            return OpRule("opaque", set(ins), reason="index_put of values whose token axis is not x's")
        return OpRule("tokenwise", cheap=True, reason="write into the dims after the token axis")
    mask = indices[0] if len(indices) == 1 and isinstance(indices[0], fx.Node) else None
    if not x_axes or mask is None or mask.meta["val"].dtype is not torch.bool:
        return OpRule("opaque", set(ins), reason="index_put by an index into the token axis other than one boolean "
                                                  "mask over the leading dims (integer indices name positions)")
    m = _rank(mask)
    if isinstance(values, fx.Node) and _rank(values) > _rank(x) - m:
        return OpRule("opaque", set(ins), reason="index_put of values listed per masked element (in the mask's "
                                                  "order, not the tokens')")
    if isinstance(values, fx.Node) and token_axes(values):
        return OpRule("opaque", set(ins), reason="index_put of values with token axes of their own")
    if token_axes(mask) != tuple(a for a in x_axes if a.dim < m):
        return OpRule("opaque", set(ins), reason="index_put by a mask without x's token axis in the dims it covers")
    return OpRule("tokenwise", cheap=True, reason="write through a per-token mask")


def _index_rule(node: fx.Node, ins: list) -> OpRule:
    """``table[idx]`` (``index.Tensor`` with one integer index, into dim 0 of a table without
    token axes): a lookup per index element, like ``embedding``; the index's token axis passes
    through. ``x[..., idx]`` (``_after_tokens``) picks features of every token. Any other
    indexing of a tensor with token axes picks or moves token positions."""
    table, indices = cast("tuple[fx.Node, list]", node.args[:2])
    if token_axes(table) and _after_tokens(table, indices):
        return OpRule("tokenwise", cheap=True, reason="index into the dims after the token axis")
    if (len(indices) == 1 and isinstance(indices[0], fx.Node) and not token_axes(table)
            and indices[0].meta["val"].dtype not in (torch.bool, torch.uint8)):
        return OpRule("tokenwise", reason="lookup by a per-token index")
    return OpRule("opaque", set(ins), reason="indexing of the token axis (x[mask], x[idx]: picks token positions)")


def _after_tokens(x: fx.Node, indices: list) -> bool:
    """Whether ``indices`` (of ``x[indices]``) is one 1-D integer index without token axes into
    a dim after every token axis of ``x`` (``x[..., idx]``): the result keeps ``x``'s rank and
    its token axes in their dims."""
    tensors = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(tensors) != 1 or not isinstance(tensors[0][1], fx.Node):
        return False
    d, index = tensors[0]
    val = index.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dim() == 1 and val.dtype not in (torch.bool, torch.uint8)
            and not token_axes(index) and d > max(_axis_dims(x)))


_POINTWISE_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def _pointwise_conv(node: fx.Node) -> bool:
    """A convolution with a kernel of size 1, stride 1 and no padding over tokens in its
    spatial dims (Stable Audio's pre/post-processing Conv1d on [B, C, L]): a linear map of
    each position's channels."""
    x, weight = node.args[0], node.args[1]
    if not isinstance(weight, fx.Node) or weight.meta.get("rasfx_tokens") or not isinstance(x, fx.Node):
        return False
    args = list(node.args) + [None] * 7
    stride, padding = cast("list[int]", args[3] or [1]), cast("list[int]", args[4] or [0])  # (any dilation of a size-1 kernel reads one position)
    kernel = tuple(weight.meta["val"].shape[2:])
    return (all(k == 1 for k in kernel) and all(s == 1 for s in stride) and all(p == 0 for p in padding)
            and all(d >= 2 for d in _axis_dims(x)))


def _grouped_attention(q: fx.Node, others: list) -> OpRule | None:
    """Attention whose queries carry the token axis in a batch dim (Latte's temporal blocks:
    ``[B*H*W, heads, F, d]``, each token's frames attend to each other): token-wise when the
    keys, values and mask carry it in the same batch dim (counted from the last dim) or not at
    all; None when the queries' token axis is the sequence dim."""
    qa = token_axes(q)
    if len(qa) != 1 or qa[0].dim >= _rank(q) - 2:
        return None
    lead = qa[0].dim - _rank(q)
    for x in others:
        xa = token_axes(x)
        if len(xa) != 1 or xa[0].dim - _rank(x) != lead or (xa[0].extra, xa[0].outer) != (qa[0].extra, qa[0].outer):
            return OpRule("opaque", {q, *others}, reason="attention: token axes in different dims")
    return OpRule("tokenwise", reason="attention within each token's group (token axis in a batch dim)")


def _attention_rule(node: fx.Node, ins: list, kv_cache: bool) -> OpRule:
    q, k, v = cast("tuple[fx.Node, fx.Node, fx.Node]", node.args[:3])  # the ATen schema: three tensors
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    mask = mask if isinstance(mask, fx.Node) and token_axes(mask) else None
    if any(len(token_axes(i)) > 1 for i in ins if i is not mask) or len(token_axes(node)) > 1:
        return OpRule("opaque", set(ins), reason="tensor with several token axes")
    grouped = _grouped_attention(q, [x for x in (k, v, mask) if x is not None and token_axes(x)])
    if grouped is not None:
        return grouped
    if token_axes(q) and {a.dim for a in token_axes(q)} != {_rank(q) - 2}:
        return OpRule("opaque", set(ins), reason="query token axis is not the sequence dim")
    full = {x for x in (k, v) if token_axes(x)}
    for x in full:
        if {a.dim for a in token_axes(x)} != {_rank(x) - 2}:
            return OpRule("opaque", set(ins), reason="key/value token axis is not the sequence dim")
    rows = set()
    if mask is not None:
        # mask: [.., Lq, Lk] (broadcastable); a token axis on Lq follows the queries, one on
        # Lk the keys (full length from the caches, or active only without them).
        r, dims = _rank(mask), _axis_dims(mask)
        if not dims <= {r - 2, r - 1}:
            return OpRule("opaque", set(ins), reason="attention mask token axis is not a query/key dim")
        if r - 1 in dims and (not kv_cache or not full):
            return OpRule("opaque", set(ins), reason="attention mask over image-token keys")
        if dims == {r - 2, r - 1}:
            rows.add(mask)  # gathered along Lq, full along Lk
        elif dims == {r - 1}:
            full.add(mask)  # mask columns of every key: needed at full length
    if not kv_cache:
        return OpRule("tokenwise", reason="attention over active tokens only (kv_cache=False)", rows=rows)
    return OpRule("mixing", full, reason="attention", rows=rows)
