"""Whether Gate Decorator and GAL train through the fused graph (their ``fused_kernels`` option).

The fused graph (`passes.fuse_masked_conv` with compact regions) computes the live channels only:
the same training up to float32 rounding. Whether that is faster depends on the device, as
measured (docs/kernels.md): on a CPU a Gate Decorator or frozen-GAL training step at half the
channels takes 1/1.5 - 1/2.7 of the eager-mask step's time and a whole Gate Decorator run to 10 %
of the MACs 1/1.25 of its time (ResNet-56 and a MobileNetV2-style net, 2 cores); on a GPU (H200,
eager) the same steps were 1.3-1.7x *slower*, bound by the host launching kernels. And the modules
a compact region absorbs (its convs, BatchNorms, activations) are not called as modules while it
trains, so their hooks would not run.

So ``fused_kernels="auto"`` (the default) turns it on exactly when the network trains on a CPU, no
module of it and no global module hook has hooks a region could skip, and no torch.distributed
process group is up (DDP over the fused graph is not tested). ``True`` / ``False`` force it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from fxprune.distributed import is_distributed
from fxprune.errors import ConfigError
from fxprune.hooks import root_hooks

CHOICES = (True, False, "auto")
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_always_called",
                 "_global_backward_pre_hooks", "_global_backward_hooks")


def check(value, method: str) -> None:
    """Refuse a `fused_kernels` value other than True, False or "auto"."""
    if not any(value is c or (isinstance(c, str) and value == c) for c in CHOICES):
        raise ConfigError(f"{method}: fused_kernels={value!r}; choose True, False or 'auto' (on when training on "
                          "a CPU without module hooks: measured faster there, slower on a GPU)")


def decide(value, module: nn.Module) -> tuple[bool, str]:
    """(train through the fused graph, why) for the option `value` and the network `module` to train."""
    if value is True or value is False:
        return value, "set by the caller"
    devices = {p.device.type for p in module.parameters()} | {b.device.type for b in module.buffers()}
    if devices - {"cpu"}:
        return False, (f"auto: off, the network is on {', '.join(sorted(devices - {'cpu'}))} (measured slower "
                       "there: the steps are bound by kernel launches)")
    hooked = [name or "(root)" for name, m in module.named_modules() if root_hooks(m)]
    if hooked:
        return False, (f"auto: off, {len(hooked)} module(s) have hooks a compact region would skip "
                       f"({', '.join(hooked[:3])}{', ...' if len(hooked) > 3 else ''})")
    if any(getattr(module_globals, name, None) for name in _GLOBAL_HOOKS):
        return False, "auto: off, global module hooks are registered (a compact region would skip them)"
    if is_distributed():
        return False, "auto: off under torch.distributed (not tested with the fused graph)"
    return True, f"auto: on, training on a CPU ({torch.get_num_threads()} threads)"
