"""PruningNet (MetaPruning, Liu et al. ICCV 2019) built from a model's fx graph and channel groups.

Every parameter of two or more dims that a prunable group slices — the weights of convolutions and
linear layers, whatever the model — gets a generator: a small MLP (Linear -> ReLU -> Linear, hidden
32 by default) from the kept fractions of the genes it touches (its input and output groups) to the
full-size tensor, which is then cropped to the sampled widths. BatchNorm affine parameters of a
single gene get a *bank*: one full-size copy per width choice. Every other parameter (biases,
other norms, fixed layers) is shared and cropped.

The network of a genome is built by the core rewrite (`apply_plan` with the first k units of
every group kept): a real slim GraphModule, so views, splits, concat offsets and grouped convs are
fixed by the same handlers that build the final model. `forward` runs that structure with the
generated tensors through `torch.func.functional_call`, so gradients reach the generators; in
training mode a new random genome is drawn for every call (every mini-batch): every gene uniform,
as the authors draw, or from `sampler(rng)` when one is set (MetaPruning's
``pruningnet_sampling="feasible"``: the structures a search under a MACs target scores).

Generators start at the model's own weights: the second Linear's bias is the flattened weight and
its matrix is zero, so before training every structure is the model cropped (an untrained model
gives a from-scratch PruningNet, as in the paper). One SGD step moves a generated weight by
``lr x (1 + |h|^2) x its gradient`` (h: the generator's hidden ReLU activations; the bias and the
matrix both follow the same gradient), and 1 + |h|^2 is 3-10 (5-95 %, median 5.3; `step_gain`
over ResNet-20's 22 generators on ratios in [0.1, 1]) at the default initialisation of a
Linear(genes -> 32): the authors' lr 0.1, meant for a
PruningNet trained from scratch under affine-free BatchNorm, moves a trained model's weights 3-10x
as far as a plain training step at the same lr would, and wrecks them (the evidence runner's
PruningNets of trained ResNet-20s at lr 0.1: 12-65 % held-out after 18 epochs); start a trained
model at a fine-tuning lr (0.02 there; docs/results.md, "Schedules"). Cost: the second Linear holds `hidden` + 1
values per weight, so a PruningNet has about (hidden + 1) x the model's conv/linear parameters
(ResNet-20: 9M; ResNet-50 at hidden 32: ~0.8G) — the authors' design, affordable at small scale.

Example::

    >>> net = PruningNet(analysis.channels, build_encoding(analysis.channels))
    >>> net.train(); loss = F.cross_entropy(net(x), y)          # a random structure
    >>> slim = net.materialize(genome)                          # a plain slim GraphModule
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fxprune.errors import ConfigError

from .plan import PruningPlan
from .rewrite import apply_plan
from .tensors import get_tensor, set_tensor

if TYPE_CHECKING:  # the analysis' type, for annotations only (dependency imports the handlers)
    from .dependency import ChannelAnalysis

_BN = nn.modules.batchnorm._BatchNorm


class WeightGenerator(nn.Module):
    """MLP from the kept fractions of `genes` to a full-size tensor shaped like `base`."""

    def __init__(self, genes: list, base: torch.Tensor, hidden: int):
        super().__init__()
        self.genes = list(genes)
        self.shape = tuple(base.shape)
        kw = {"dtype": base.dtype, "device": base.device}
        self.fc1 = nn.Linear(len(self.genes), hidden, **kw)
        self.fc2 = nn.Linear(hidden, base.numel(), **kw)
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(base.detach().reshape(-1))

    def forward(self, ratios: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(ratios))).view(self.shape)

    @torch.no_grad()
    def step_gain(self, ratios: torch.Tensor) -> float:
        """1 + |h|^2 at `ratios`: how much further one SGD step (no momentum, no weight decay)
        moves the generated weight than it would move a plain weight with the same gradient, while
        the second Linear's matrix is zero (at the start; the first Linear's share is then zero too)."""
        h = F.relu(self.fc1(ratios))
        return float(1 + (h * h).sum())


def _key(target: str) -> str:
    return target.replace(".", "__")


def crops(channels: ChannelAnalysis, keep_root: np.ndarray, device) -> dict:
    """{target: [(dim, kept indices)]} for every member tensor the keep-set slices."""
    out: dict[str, list] = {}
    for (target, dim), member in channels.members.items():
        kept = keep_root[channels.root[member.ids]]
        if not kept.all():
            out.setdefault(target, []).append((dim, torch.as_tensor(np.nonzero(kept)[0], device=device)))
    return out


class PruningNet(nn.Module):
    """Generators, BN banks and shared parameters of one analysed model (see module docstring)."""

    def __init__(self, channels: ChannelAnalysis, encoding, hidden: int = 32, bn_banks: bool = True, seed: int = 0,
                 cache_size: int = 8):
        super().__init__()
        if hidden < 1:
            raise ConfigError(f"hidden={hidden} must be a positive layer width (the authors use 32 or 64)")
        self.channels = channels  # ChannelAnalysis (a dataclass: not registered as a submodule)
        self.encoding = encoding
        self.hidden = hidden
        self.generators = nn.ModuleDict()
        self.banks = nn.ParameterDict()
        self.shared = nn.ParameterDict()
        self.kinds: dict[str, tuple] = {}  # target -> ("gen" | "bank" | "shared", gene for banks)
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()  # genome -> (structure, crops)
        self.rng = np.random.default_rng(seed)
        self.sampler = None  # rng -> genome for training; None: every gene uniform (the authors')
        genes_of = {}
        for (target, _dim), member in channels.members.items():
            genes_of.setdefault(target, set()).update(encoding.genes_of_ids(member.ids))
        for name, p in channels.gm.named_parameters():
            genes = sorted(genes_of.get(name, ()))
            owner = channels.gm.get_submodule(name.rpartition(".")[0])
            if _key(name) in self.generators or _key(name) in self.banks or _key(name) in self.shared:
                raise ConfigError(f"parameter names {name!r} and another one collide once dots become '__'")
            if p.ndim >= 2 and genes:
                self.generators[_key(name)] = WeightGenerator(genes, p, hidden)
                self.kinds[name] = ("gen", None)
            elif bn_banks and isinstance(owner, _BN) and len(genes) == 1 and p.ndim == 1:
                n = len(encoding.choices[genes[0]])
                self.banks[_key(name)] = nn.Parameter(p.detach().clone().unsqueeze(0).repeat(n, 1))
                self.kinds[name] = ("bank", genes[0])
            else:
                self.shared[_key(name)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                self.kinds[name] = ("shared", None)
        self._gene_index = {name: torch.as_tensor(self.generators[_key(name)].genes)
                            for name, (kind, _) in self.kinds.items() if kind == "gen"}

    # -- structures -----------------------------------------------------------------------------
    @property
    def _device(self):
        return next(iter(self.parameters())).device

    def sample(self) -> tuple:
        """The genome of the next training mini-batch: `sampler(rng)` when set, else uniformly
        random (the authors draw every choice uniformly, per mini-batch)."""
        if self.sampler is not None:
            return self.sampler(self.rng)
        return self.encoding.random(self.rng)

    def plan(self, genome) -> PruningPlan:
        return PruningPlan(keep=self.encoding.keep(genome))

    def _structure(self, genome: tuple):
        hit = self._cache.get(genome)
        if hit is not None:
            self._cache.move_to_end(genome)
            return hit
        keep_root = self.encoding.keep_roots(genome)
        structure = apply_plan(self.channels, self.plan(genome))
        hit = (structure, crops(self.channels, keep_root, self._device))
        self._cache[genome] = hit
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return hit

    def tensors(self, genome, crop: dict | None = None) -> dict:
        """Every parameter of the slim network of `genome`, generated/banked/shared and cropped."""
        genome = self.encoding.check(genome)
        if crop is None:
            crop = self._structure(genome)[1]
        ratios = torch.as_tensor(self.encoding.ratios(genome), dtype=torch.float32)
        out = {}
        for name, (kind, gene) in self.kinds.items():
            if kind == "gen":
                gen = self.generators[_key(name)]
                t = gen(ratios[self._gene_index[name]].to(device=gen.fc1.weight.device, dtype=gen.fc1.weight.dtype))
            elif kind == "bank":
                t = self.banks[_key(name)][genome[gene]]
            else:
                t = self.shared[_key(name)]
            for dim, index in crop.get(name, ()):
                t = t.index_select(dim, index)
            out[name] = t
        return out

    def forward(self, *args, genome=None, **kwargs):
        """Run the slim network of `genome` (a fresh random one per call when training)."""
        if genome is None:
            if not self.training:
                raise ConfigError("an eval-mode PruningNet needs genome=: it has no single structure")
            genome = self.sample()
        genome = self.encoding.check(genome)
        structure, crop = self._structure(genome)
        structure.train(self.training)
        return functional_call(structure, self.tensors(genome, crop), args, kwargs)

    @torch.no_grad()
    def materialize(self, genome) -> fx.GraphModule:
        """A new plain slim GraphModule of `genome` holding the PruningNet's tensors for it."""
        genome = self.encoding.check(genome)
        slim = apply_plan(self.channels, self.plan(genome))
        for name, t in self.tensors(genome).items():
            set_tensor(slim, name, t.detach().clone())
        slim.train(self.channels.gm.training)
        return slim

    def check_compatible(self, channels: ChannelAnalysis, encoding) -> None:
        """Refuse to reuse this PruningNet for another model or another width space."""
        mine = [(n, tuple(p.shape)) for n, p in self.channels.gm.named_parameters()]
        theirs = [(n, tuple(p.shape)) for n, p in channels.gm.named_parameters()]
        if mine != theirs or self.encoding.signature() != encoding.signature():
            raise ConfigError("this PruningNet was built for another model or another width space (ratios, "
                              "round_to, min_channels, min_ratio): build a new one for this call")


@torch.no_grad()
def write_back(channels: ChannelAnalysis, slim: nn.Module, keep_root: np.ndarray) -> None:
    """Copy `slim`'s tensors into `analysis.gm`'s full-size ones at the kept positions, in place.

    Afterwards the core rewrite of `analysis.gm` with the same keep-set rebuilds exactly `slim`;
    the positions it drops keep their old values (nothing reads them).
    """
    sliced = crops(channels, keep_root, "cpu")
    for name, t in [*slim.named_parameters(), *slim.named_buffers()]:
        full = get_tensor(channels.gm, name)
        if full.shape == t.shape:
            full.copy_(t)
            continue
        index = []
        for d in range(full.ndim):
            idx = next((i for dim, i in sliced.get(name, ()) if dim == d), None)
            idx = torch.arange(full.shape[d]) if idx is None else idx
            shape = [1] * full.ndim
            shape[d] = -1
            index.append(idx.to(full.device).view(shape))
        full.index_put_(tuple(index), t.to(full.dtype))


def reinitialize(model: nn.Module, seed: int = 0) -> None:
    """Fresh random weights (each module's own `reset_parameters`), for training from scratch."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()


__all__ = ["PruningNet", "WeightGenerator", "crops", "reinitialize", "write_back"]
