"""The measured dispatcher of torch.ops.fxprune.masked_conv2d: every implementation it may pick gives
the op's result (values, exact zeros, memory format) for every geometry, dtype and layout; the first
call of a class measures and later calls reuse the choice (also from the disk cache); forcing works
and falls back where the forced implementation cannot run (no Triton, CPU tensors)."""
from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune.kernels import backend, dispatch, ops
from tests.test_kernels import GEOMETRIES, make, mask_reads_fixture, op, reference  # noqa: F401 (a fixture)

CPU_IMPLEMENTATIONS = ("gather", "gather_cl", "gather_zero_row", "dense", "gemm", "dense_gemm")


def _pointwise(name: str) -> bool:
    """A geometry the GEMM implementations take (1x1, stride 1, no padding, one group)."""
    conf = make(name)[-1]
    return (GEOMETRIES[name][3] == 1 and conf["stride"] == (1, 1) and conf["padding"] == (0, 0)
            and conf["groups"] == 1)


@pytest.fixture(autouse=True)
def fresh_dispatcher(monkeypatch):
    monkeypatch.delenv("FXPRUNE_KERNEL_CACHE_FILE", raising=False)
    monkeypatch.delenv("FXPRUNE_KERNEL_DISPATCH", raising=False)
    dispatch.clear()
    yield
    dispatch.clear()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_every_implementation_equals_the_reference(name, impl, dtype, layout):
    x, w, b, m, im, conf = make(name, 0.5, torch.float32)
    x, w, m = x.to(dtype), w.to(dtype), m.to(dtype)
    b = None if b is None else b.to(dtype)
    im = None if im is None else im.to(dtype)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with backend(impl):
        y = op(x, w, b, m, im, conf)
    valid = {"gather_cl": layout == "nchw", "gather_zero_row": layout == "nchw" and conf["groups"] == 1,
             "gemm": _pointwise(name), "dense_gemm": _pointwise(name)}
    if valid.get(impl, True):  # otherwise not a candidate for this call: the measured choice ran
        assert dispatch.last()[1] == impl
    ref = reference(x.double(), w.double(), None if b is None else b.double(), m.double(),
                    None if im is None else im.double(), conf)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max() + 1e-30
    assert torch.equal(y[:, m == 0], torch.zeros_like(y[:, m == 0]))
    assert y.is_contiguous(memory_format=fmt)  # the output keeps the input's layout (as conv2d does)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_an_in_place_op_after_the_op_trains(impl, layout):
    """The op's output is never a view (a GEMM's reshaped result was): an in-place activation after it
    (EfficientNet's SiLU(inplace=True), which GAL's fused graph runs) trains, with the gradients of
    relu(conv2d(x) * m) (float64, 1e-10 relative)."""
    x, w, b, m, im, conf = make("1x1_in_mask", 0.5, torch.float64)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    with backend(impl):
        y = op(*leaves, m, im, conf)
    assert y._base is None
    y.relu_().square().sum().backward()
    ref_leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    reference(*ref_leaves, m, im, conf).relu().square().sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert torch.allclose(got.grad, want.grad, rtol=1e-10, atol=1e-10 * want.grad.abs().max().item())


def test_zero_row_with_a_full_channel_block(monkeypatch):
    """16k live channels: the zero plane is appended instead of a 17th filter; same result."""
    from fxprune.kernels import gather

    x, w, b, m, im, conf = make("3x3", 0.5, torch.float32)
    live = int((m != 0).sum())
    monkeypatch.setattr(gather, "CHANNEL_BLOCK", live)
    with backend("gather_zero_row"):
        y = op(x, w, b, m, im, conf)
    assert dispatch.last()[1] == "gather_zero_row"
    ref = reference(x, w, b, m, im, conf)
    assert torch.allclose(y, ref, atol=1e-5 * ref.abs().max().item())
    assert torch.equal(y[:, m == 0], torch.zeros_like(y[:, m == 0]))


@pytest.mark.parametrize("name", ["in_mask", "1x1_in_mask"])
@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_every_implementation_passes_gradcheck(impl, name):
    """Forced forward (and, for "gemm", backward) implementations; soft mode so the mask gradient
    of the skipped channels is checked too."""
    x, w, b, m, im, conf = make(name)
    with backend(impl):
        assert torch.autograd.gradcheck(lambda x, w, m: op(x, w, b, m, im, conf, hard=False),
                                        tuple(t.requires_grad_() for t in (x, w, m)), fast_mode=True)
        if impl == "gemm" and _pointwise(name):
            assert dispatch.last_backward()[1] == "gemm" and dispatch.last()[1] == "gemm"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", dispatch.BACKWARD_IMPLEMENTATIONS)
def test_every_backward_implementation_equals_the_reference(impl, dtype, layout):
    """The backward's candidates give conv2d's gradients (input, weight, bias) in either layout and
    dtype on a pointwise conv with an input mask (tolerance: 1e-5 float32, 3e-2 bfloat16, of the
    largest gradient)."""
    x, w, b, m, im, conf = make("1x1_in_mask", 0.5, torch.float32, n=3)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=fmt)
    w, b, m, im = (t.to(dtype) for t in (w, b, m, im))
    g = torch.randn(x.shape[0], w.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(1)).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    with backend(impl):
        op(*leaves, m, im, conf).backward(g)
    assert dispatch.last_backward()[1] == impl
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    reference(*ref_leaves, m.double(), im.double(), conf).backward(g.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for got, want in zip(leaves, ref_leaves):
        assert torch.isfinite(got.grad).all()
        assert (got.grad.double() - want.grad).abs().max() <= tol * want.grad.abs().max()


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_given_live_indices_are_used_instead_of_reading_the_masks(name, impl, hard, mask_reads):
    """`out_live` / `in_live` handed over (what the fused pass does with ``cache_live=True``): no live
    set is read from a mask, in the forward or the backward, and values and gradients (x, weight,
    bias, mask; hard and soft) equal those of the op reading its masks (float64, 1e-12 relative)."""
    x, w, b, m, im, conf = make(name, 0.5, torch.float64)
    given = {"out_live": (m != 0).nonzero().reshape(-1),
             "in_live": None if im is None else (im != 0).nonzero().reshape(-1)}
    reads = mask_reads

    def run(**kw):
        leaves = [t.detach().requires_grad_() for t in (x, w, m) + (() if b is None else (b,))]
        xs, ws, ms, *bs = leaves
        with backend(impl):
            y = fxprune.kernels.masked_conv2d(xs, ws, bs[0] if bs else None, ms, **conf, in_mask=im, hard=hard, **kw)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
        return [y.detach()] + [t.grad for t in leaves]

    trusted = run(**given)
    assert reads == []
    read = run()
    assert reads  # the op without the indices does read its masks (the spy sees it)
    for got, want in zip(trusted, read):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item()), impl


def test_given_live_indices_of_the_wrong_kind_are_refused():
    x, w, b, m, im, conf = make("in_mask", 0.5, torch.float32)
    idx = (m != 0).nonzero().reshape(-1)
    for bad in (idx.int(), idx.reshape(1, -1), torch.arange(w.shape[0] + 1)):
        with pytest.raises(fxprune.InputError, match="out_live must be the sorted indices"):
            fxprune.kernels.masked_conv2d(x, w, b, m, **conf, in_mask=im, out_live=bad)
    with pytest.raises(fxprune.InputError, match="without the mask"):
        fxprune.kernels.masked_conv2d(x, w, b, m, **conf, in_live=idx)


def test_first_call_measures_later_calls_reuse_the_choice(monkeypatch):
    x, w, b, m, im, conf = make("3x3", 0.5, torch.float32)
    calls = []
    real = dispatch.measure
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    op(x, w, b, m, im, conf)
    key, choice = dispatch.last()
    assert calls == [1] and choice in CPU_IMPLEMENTATIONS and dispatch.decisions() == {key: choice}
    assert "density=8/16" in key and "float32" in key and "nchw" in key and "eval" in key
    op(x, w, b, m, im, conf)
    assert calls == [1]  # remembered
    op(x.contiguous(memory_format=torch.channels_last), w, b, m, im, conf)
    assert calls == [1, 1] and "nhwc" in dispatch.last()[0]  # another layout is another class
    m2 = m.clone()
    m2[m2 == 0] = 1.0  # density 1: another class
    op(x, w, b, m2, im, conf)
    assert len(calls) == 3 and "density=16/16" in dispatch.last()[0]
    op(x, w.requires_grad_(), b, m, im, conf)
    assert len(calls) == 4 and "train" in dispatch.last()[0]


def test_the_backward_measures_once_per_class_too(monkeypatch):
    """A pointwise conv's backward: the first call of its class measures `conv` against `gemm`, the
    next reuses the choice; which gradients are needed (x or not) makes another class."""
    x, w, b, m, im, conf = make("1x1_in_mask", 0.5, torch.float32)
    measured = []
    real = dispatch.measure
    monkeypatch.setattr(dispatch, "measure", lambda runners, *a, **k: measured.append(sorted(runners)) or
                        real(runners, *a, **k))

    def backward(x_grad: bool):
        leaves = [x.detach().requires_grad_(x_grad), w.detach().requires_grad_(), b.detach().requires_grad_()]
        op(*leaves, m, im, conf).sum().backward()
        return dispatch.last_backward()

    key, choice = backward(True)
    assert ["conv", "gemm"] in measured and choice in dispatch.BACKWARD_IMPLEMENTATIONS
    assert "|backward|needs=1110|hard" in key and dispatch.decisions()[key] == choice
    count = len(measured)
    assert backward(True) == (key, choice) and len(measured) == count  # remembered (the forward too)
    key2, _ = backward(False)
    assert "|backward|needs=0110|hard" in key2 and len(measured) == count + 1


def test_disk_cache_is_read_by_a_new_process(tmp_path, monkeypatch):
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv("FXPRUNE_KERNEL_CACHE_FILE", str(path))
    x, w, b, m, im, conf = make("grouped", 0.5, torch.float32)
    op(x, w, b, m, im, conf)
    key, choice = dispatch.last()
    data = json.loads(path.read_text())
    assert data["choices"] == {key: choice} and data["torch"] == torch.__version__
    # a new process (simulated: forget the memory) reads the file instead of measuring
    dispatch.clear()
    other = next(i for i in CPU_IMPLEMENTATIONS if i != choice)
    path.write_text(json.dumps({"torch": torch.__version__, "choices": {key: other}}))
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: pytest.fail("measured despite the cache file"))
    op(x, w, b, m, im, conf)
    assert dispatch.last() == (key, other)


def test_heuristic_mode_does_not_measure(monkeypatch):
    monkeypatch.setenv("FXPRUNE_KERNEL_DISPATCH", "heuristic")
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: pytest.fail("measured in heuristic mode"))
    x, w, b, m, im, conf = make("3x3", 0.5, torch.float32)
    op(x, w, b, m, im, conf)
    assert dispatch.last()[1] == "gather"
    op(x, w, b, torch.ones_like(m), im, conf)
    assert dispatch.last()[1] == "dense"


def test_falls_back_when_triton_is_missing_or_cannot_run(monkeypatch):
    x, w, b, m, im, conf = make("3x3", 0.5, torch.float32)
    ref = reference(x, w, b, m, im, conf)
    with backend("triton"):  # CPU tensors without the interpreter: Triton is not a candidate
        y = op(x, w, b, m, im, conf)
    assert dispatch.last()[1] in CPU_IMPLEMENTATIONS and torch.allclose(y, ref, atol=1e-5)
    monkeypatch.setattr(ops, "triton_conv", None)
    assert not ops._triton_valid(x.cuda() if torch.cuda.is_available() else x, interpreted_ok=True)
    with pytest.raises(fxprune.InputError, match="needs the triton package"):
        with ops.cuda_backend("triton"):
            pass
    with backend("triton"):
        y = op(x, w, b, m, im, conf)
    assert dispatch.last()[1] in CPU_IMPLEMENTATIONS and torch.allclose(y, ref, atol=1e-5)


def test_unknown_backend_is_refused():
    with pytest.raises(fxprune.InputError, match="unknown masked-conv backend 'cudnn'"):
        with backend("cudnn"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["3x3", "1x1_in_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_dispatcher_picks_a_valid_implementation(dtype, name):
    """On CUDA tensors: the measured choice, and for the pointwise conv the GEMM forced (forward
    and backward: cuBLAS), give the reference in both layouts (2e-2 of the largest value: TF32 /
    bf16)."""
    x, w, b, m, im, conf = (t.cuda().to(dtype) if isinstance(t, torch.Tensor) else t
                            for t in make(name, 0.5, torch.float32, n=4))
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        for impl in ("auto", "gemm") if name.startswith("1x1") else ("auto",):
            leaves = [xl.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()]
            with backend(impl):
                y = op(*leaves, m, im, conf)
                y.square().sum().backward()
            assert dispatch.last()[1] in dispatch.IMPLEMENTATIONS and y.is_contiguous(memory_format=layout)
            assert impl == "auto" or dispatch.last()[1] == dispatch.last_backward()[1] == "gemm"
            ref_leaves = [t.detach().double().requires_grad_() for t in (xl, w, b)]
            ref = reference(*ref_leaves, m.double(), None if im is None else im.double(), conf)
            ref.square().sum().backward()
            assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
            for got, want in zip(leaves, ref_leaves):
                assert (got.grad.double() - want.grad).abs().max() <= 2e-2 * want.grad.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_op_with_given_live_indices_is_captured_in_a_cuda_graph(monkeypatch):
    """Handed its masks' live indices, the op reads no mask, so a CUDA graph captures it, also for a
    call class first met inside the capture (the heuristic's choice runs, unremembered: measuring
    would synchronise); replays on new input equal the reference (2e-2 of the largest value: TF32)."""
    x, w, b, m, im, conf = (t.cuda() if isinstance(t, torch.Tensor) else t
                            for t in make("in_mask", 0.5, torch.float32, n=4))
    given = {"out_live": (m != 0).nonzero().reshape(-1), "in_live": (im != 0).nonzero().reshape(-1)}
    static_x = x.clone()
    monkeypatch.setenv("FXPRUNE_KERNEL_DISPATCH", "heuristic")  # warm-up (cuDNN, cuBLAS) without deciding
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fxprune.kernels.masked_conv2d(static_x, w, b, m, **conf, in_mask=im, **given)
    torch.cuda.current_stream().wait_stream(side)
    monkeypatch.delenv("FXPRUNE_KERNEL_DISPATCH")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fxprune.kernels.masked_conv2d(static_x, w, b, m, **conf, in_mask=im, **given)
    assert dispatch.decisions() == {}
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference(static_x.double(), w.double(), b.double(), m.double(), im.double(), conf)
    assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
