"""torch.ops.fxprune.masked_conv2d: the forward equals conv2d * mask with exact zeros; gradients pass
gradcheck in float64 and follow the hard/soft semantics; opcheck; the FLOP formula counts only the
live channels; compile and export see one opaque op; bad input is refused. The Triton kernels are
checked against F.conv2d under TRITON_INTERPRET=1 in a subprocess (the variable never reaches this
process); GPU checks are skipped where no GPU is present."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.kernels import cuda_backend, masked_conv2d
from fxprune.kernels.selfcheck import CASES as TRITON_CASES

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = torch.cuda.is_available()
INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET")  # the self-check's subprocess must not change it

# name: (cin, cout, hw, k, stride, padding, dilation, groups, in_mask, bias)
GEOMETRIES = {
    "3x3": (4, 6, (7, 6), 3, 1, 1, 1, 1, False, True),
    "strided_dilated": (4, 6, (9, 8), 3, (2, 1), (1, 0), (1, 2), 1, False, True),
    "1x1_no_bias": (5, 7, (4, 5), 1, 1, 0, 1, 1, False, False),
    "1x1_in_mask": (6, 7, (5, 4), 1, 1, 0, 1, 1, True, True),
    "in_mask": (6, 5, (6, 6), 3, 1, 1, 1, 1, True, True),
    "grouped": (4, 8, (6, 5), 3, 2, 1, 1, 2, False, True),
    "grouped_in_mask": (6, 9, (5, 5), 3, 1, 1, 1, 3, True, False),
    "depthwise": (6, 6, (7, 7), 3, 1, 1, 1, 6, False, True),
    "depthwise_mult2": (4, 8, (6, 6), 3, 1, 1, 1, 4, True, True),
}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make(name, density=0.5, dtype=torch.float64, seed=0, n=2):
    cin, cout, hw, k, s, p, d, g, use_in, use_bias = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *hw, generator=gen, dtype=dtype)
    w = torch.randn(cout, cin // g, k, k, generator=gen, dtype=dtype)
    b = torch.randn(cout, generator=gen, dtype=dtype) if use_bias else None
    live = torch.zeros(cout, dtype=torch.bool)
    live[torch.randperm(cout, generator=gen)[:round(density * cout)]] = True
    m = live.to(dtype) * (torch.rand(cout, generator=gen, dtype=dtype) + 0.5)
    im = (torch.arange(cin) % 3 != 1).to(dtype) if use_in else None
    return x, w, b, m, im, dict(stride=_pair(s), padding=_pair(p), dilation=_pair(d), groups=g)


@pytest.fixture(name="mask_reads")
def mask_reads_fixture(monkeypatch) -> list:
    """The masks the masked conv op reads, in order: every live set it builds from a mask's values
    rather than from live indices handed over (`fxprune.kernels.live.live` without `given`).
    Here, not in conftest.py: the oldest-torch job runs the kernel tests without it."""
    from fxprune.kernels import gather, live as live_module, ops

    reads = []

    def spy(mask, given=None):
        if given is None:
            reads.append(mask)
        return live_module.live(mask, given)

    monkeypatch.setattr(ops, "live", spy)
    monkeypatch.setattr(gather, "live", spy)
    return reads


def reference(x, w, b, m, im, conf):
    xr = x if im is None else x * (im != 0).to(x.dtype)[None, :, None, None]
    y = F.conv2d(xr, w, b, conf["stride"], conf["padding"], conf["dilation"], conf["groups"])
    return y * m[None, :, None, None]


def op(x, w, b, m, im, conf, hard=True):
    return masked_conv2d(x, w, b, m, **conf, in_mask=im, hard=hard)


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_forward_equals_conv_times_mask_with_exact_zeros(name, density):
    x, w, b, m, im, conf = make(name, density, torch.float32)
    y = op(x, w, b, m, im, conf)
    ref = reference(x, w, b, m, im, conf)
    assert y.shape == ref.shape and y.is_contiguous()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.equal(y[:, m == 0], torch.zeros_like(y[:, m == 0]))  # not computed: exact zeros


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("live", [[0, 1, 5], [2, 3, 7], [0, 1, 2, 3, 4, 5, 6, 7], [4]])
def test_scatter_places_the_live_channels_among_exact_zeros(live, fmt):
    """`gather._scatter_channels` (zero fill + one index_copy_ on the CPU): a leading or trailing
    run of either kind, every channel live, both layouts; the gather is index_select."""
    from fxprune.kernels import gather

    idx = torch.tensor(live)
    z = torch.randn(2, len(live), 9, 7).contiguous(memory_format=fmt)
    y = gather._scatter_channels(z, idx, 8, fmt)
    assert torch.equal(y, torch.zeros(2, 8, 9, 7).index_copy_(1, idx, z)) and y.is_contiguous(memory_format=fmt)
    x = torch.randn(2, 8, 9, 7)
    assert torch.equal(gather.gather_channels(x, idx), x.index_select(1, idx))


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_gradcheck_float64(name):
    x, w, b, m, im, conf = make(name)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def soft(x, w, *rest):
        bias, mask = (rest[0], rest[1]) if b is not None else (None, rest[0])
        return op(x, w, bias, mask, im, conf, hard=False)

    def hard(x, w, *rest):  # the hard mask gradient is not the numerical derivative at zeros
        return op(x, w, rest[0] if rest else None, m, im, conf, hard=True)

    # fast mode: random projections of the Jacobian (the slow mode costs minutes on this CPU)
    assert torch.autograd.gradcheck(soft, (*inputs, m.clone().requires_grad_()), fast_mode=True)
    assert torch.autograd.gradcheck(hard, tuple(inputs), fast_mode=True)


@pytest.mark.parametrize("name", ["3x3", "in_mask", "grouped", "depthwise_mult2"])
def test_hard_and_soft_gradient_semantics(name):
    x, w, b, m, im, conf = make(name, density=0.5)
    dead = m == 0
    ref_inputs = [t.clone().requires_grad_() for t in (x, w, b if b is not None else torch.zeros(1), m)]
    rx, rw, rb, rm = ref_inputs
    ref = reference(rx, rw, rb if b is not None else None, rm, im, conf)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.dtype)
    ref.backward(go)
    assert rm.grad[dead].abs().min() > 0  # the exact mask gradient at zero entries is not zero here
    for hard in (True, False):
        ins = [t.clone().requires_grad_() for t in (x, w, b if b is not None else torch.zeros(1), m)]
        ox, ow, ob, om = ins
        op(ox, ow, ob if b is not None else None, om, im, conf, hard=hard).backward(go)
        assert torch.allclose(ox.grad, rx.grad) and torch.allclose(ow.grad, rw.grad)
        assert torch.equal(ow.grad[dead], torch.zeros_like(ow.grad[dead]))  # pruned filters get exactly 0
        if b is not None:
            assert torch.allclose(ob.grad, rb.grad) and torch.equal(ob.grad[dead], torch.zeros_like(ob.grad[dead]))
        assert torch.allclose(om.grad[~dead], rm.grad[~dead])
        if hard:
            assert torch.equal(om.grad[dead], torch.zeros_like(om.grad[dead]))  # zero means pruned
        else:
            assert torch.allclose(om.grad[dead], rm.grad[dead])  # FISTA sees the true gradient


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("name,hard", [("in_mask", False), ("depthwise_mult2", True)])
def test_opcheck(name, hard, given):
    """`given`: with the masks' live indices handed over (`out_live` / `in_live`) as well."""
    x, w, b, m, im, conf = make(name)
    args = (x.requires_grad_(), w.requires_grad_(), b, m.requires_grad_(), list(conf["stride"]),
            list(conf["padding"]), list(conf["dilation"]), conf["groups"], im, hard)
    if given:
        args += ((m != 0).nonzero().reshape(-1), None if im is None else (im != 0).nonzero().reshape(-1))
    torch.library.opcheck(torch.ops.fxprune.masked_conv2d.default, args)


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["3x3", "in_mask", "grouped_in_mask", "depthwise"])
def test_flop_formula_counts_only_live_channels(name):
    x, w, b, m, im, conf = make(name, density=0.5, dtype=torch.float32, n=3)
    g = conf["groups"]
    live_out = m != 0
    live_in = torch.ones(x.shape[1], dtype=torch.bool) if im is None else im != 0
    fused = _flops(lambda: op(x, w, b, m, im, conf))
    # the same conv, physically sliced (per group for grouped convs)
    opg, ipg = w.shape[0] // g, w.shape[1]
    sliced = 0
    for gi in range(g):
        outs = live_out[gi * opg:(gi + 1) * opg].nonzero().reshape(-1) + gi * opg
        ins = live_in[gi * ipg:(gi + 1) * ipg].nonzero().reshape(-1)
        if len(outs) and len(ins):
            xs = x[:, gi * ipg + ins]
            ws = w[outs][:, ins]
            sliced += _flops(lambda: F.conv2d(xs, ws, None, conf["stride"], conf["padding"], conf["dilation"]))
    dense = _flops(lambda: F.conv2d(x, w, b, conf["stride"], conf["padding"], conf["dilation"], g))
    assert fused == sliced < dense
    # fake/meta masks cannot be read: every channel counts
    meta = [t.to("meta") if t is not None else None for t in (x, w, b, m, im)]
    assert _flops(lambda: op(*meta, conf)) == dense


def test_flop_formula_backward():
    x, w, b, m, im, conf = make("in_mask", density=0.5, dtype=torch.float32)
    forward = _flops(lambda: op(x, w, b, m, im, conf))
    for hard, extra in ((True, 0), (False, 1)):
        xs, ws, ms = x.clone().requires_grad_(), w.clone().requires_grad_(), m.clone().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            op(xs, ws, b, ms, im, conf, hard=hard).sum().backward()
        # forward + input grad + weight grad over the live channels; soft: + weight grad of the dead ones
        live, dead = int((m != 0).sum()), int((m == 0).sum())
        assert counter.get_total_flops() == 3 * forward + extra * forward * dead // live


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.register_buffer("mask", (torch.arange(8) % 3 != 0).float())

    def forward(self, x):
        c = self.conv
        return torch.ops.fxprune.masked_conv2d(x, c.weight, c.bias, self.mask, [1, 1], [1, 1], [1, 1], 1, None, True)


def test_compile_and_export_see_one_opaque_op():
    torch.manual_seed(0)
    model, x = _Masked(), torch.randn(2, 4, 6, 6)
    expected = model(x)
    expected.sum().backward()
    grad = model.conv.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(model.conv.weight.grad, grad, atol=1e-6)
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.fxprune.masked_conv2d.default in targets
    assert torch.allclose(exported.module()(x), expected, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiles_a_fused_model():
    torch.manual_seed(0)
    model, x = _Masked(), torch.randn(2, 4, 6, 6)
    assert torch.allclose(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5)


def test_bad_input_is_refused():
    x, w, b, m, im, conf = make("3x3", dtype=torch.float32)
    with pytest.raises(fxprune.InputError, match=r"out_mask must have shape \[6\]"):
        op(x, w, b, m.reshape(1, -1, 1, 1), im, conf)
    with pytest.raises(fxprune.InputError, match="cast it with"):
        op(x, w, b, m.double(), im, conf)
    with pytest.raises(fxprune.InputError, match="groups"):
        op(x, w, b, m, im, dict(conf, groups=2))
    with pytest.raises(fxprune.InputError, match="smaller than the dilated kernel"):
        op(x[:, :, :1, :1], w, b, m, im, dict(conf, padding=(0, 0)))
    with pytest.raises(fxprune.InputError, match="unknown masked-conv backend"):
        with cuda_backend("cudnn"):
            pass


@pytest.fixture(scope="module")
def interpreted():
    """Run the Triton self-check in a subprocess with TRITON_INTERPRET=1; {case: result}."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (the CPU path does not need it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    command = ([sys.executable, str(ROOT / "tests" / "kernels_alone.py"), "--selfcheck"]
               if os.environ.get("FXPRUNE_KERNELS_ALONE") else [sys.executable, "-m", "fxprune.kernels.selfcheck"])
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["case"]] = r
    assert results, f"selfcheck printed nothing:\n{proc.stderr[-3000:]}"
    return results


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_kernel_matches_conv2d_under_the_interpreter(interpreted, case):
    r = interpreted[case]
    assert "error" not in r, r.get("error")
    assert r["interpreted"] and r["shape"] == r["ref_shape"]
    assert r["rel_err"] <= r["tolerance"], r
    assert r["masked_exact_zero"]


def test_interpreter_variable_did_not_leak(interpreted):
    assert os.environ.get("TRITON_INTERPRET") == INTERPRET_AT_IMPORT
    if not INTERPRET_AT_IMPORT:
        from fxprune.kernels import triton_conv

        assert not triton_conv._interpreted()  # this process compiled (decorated) the real kernels


@pytest.mark.skipif(not (HAS_GPU and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_gpu_triton_equals_gather_path(name, dtype):
    x, w, b, m, im, conf = (t.cuda() if isinstance(t, torch.Tensor) else t
                            for t in make(name, 0.5, torch.float32, n=4))
    x, w, m = x.to(dtype), w.to(dtype), m.to(dtype)
    b = b.to(dtype) if b is not None else None
    im = im.to(dtype) if im is not None else None
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        with cuda_backend("triton"):
            y = op(x, w, b, m, im, conf)
        with cuda_backend("torch"):
            ref = op(x, w, b, m, im, conf)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert (y.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    assert torch.equal(y[:, m == 0], torch.zeros_like(y[:, m == 0]))


@pytest.mark.skipif(not (HAS_GPU and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_gpu_selfcheck_compiled():
    proc = subprocess.run([sys.executable, "-m", "fxprune.kernels.selfcheck", "--device", "cuda"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
