"""The masked reference: the original model with the pruned channels switched off.

Pruning removes a channel from every op that reads it. The same effect, at full size, is to zero
the input columns (`role == "in"` members) that read pruned channels; everything between producer
and consumer acts per channel, so the rest of the network is untouched. A removed residual branch
is replaced by zeros. The slim model must equal this reference up to float rounding: that is the
verification contract.

Ops whose slim form is not "the original with zeroed inputs" edit the reference through their
handler's `reference` hook: with ``layernorm="prune"`` a LayerNorm over pruned channels becomes a
`MaskedLayerNorm` (`ops/norm.py`) whose statistics cover the kept channels only, as the slim
LayerNorm's do. That reference is then not the original model's function (the pruned channels
changed the original's statistics): the option is not function-preserving, by design.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx

from .module_copy import copy_sharing
from .ops import handler_for
from .plan import PruningPlan, ResolvedPlan, insert_input_scales, resolve
from .tensors import get_tensor, set_tensor

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis


def masked_reference(channels: ChannelAnalysis, plan: PruningPlan | ResolvedPlan) -> fx.GraphModule:
    resolved = resolve(channels, plan)
    keep_root, plan = resolved.keep_roots, resolved.plan
    everything = [name for name, _ in [*channels.gm.named_parameters(), *channels.gm.named_buffers()]]
    ref = copy_sharing(channels.gm, everything)  # shared tensors are only read; masked ones replaced
    with torch.no_grad():
        for (target, dim), member in channels.members.items():
            if member.role != "in":
                continue
            kept = keep_root[channels.root[member.ids]]
            if kept.all():
                continue
            tensor = get_tensor(ref, target)
            index = torch.as_tensor(np.nonzero(~kept)[0], device=tensor.device)
            set_tensor(ref, target, tensor.detach().index_fill(dim, index, 0))
    for node in list(ref.graph.nodes):
        if node.op in ("call_module", "call_function", "call_method"):
            handler = handler_for(node, ref)
            if handler is not None:
                handler.reference(channels, ref, node, keep_root)
    nodes = {n.name: n for n in ref.graph.nodes}
    for add_name, operand in plan.remove_branches:
        add = nodes[add_name]
        with ref.graph.inserting_before(add):
            zeros = ref.graph.call_function(torch.zeros_like, (add.args[operand],))
        args = list(add.args)
        args[operand] = zeros
        add.args = tuple(args)
    insert_input_scales(ref.graph, plan.scale_inputs)
    ref.recompile()
    return ref
