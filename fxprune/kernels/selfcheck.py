"""Check the Triton kernels against `F.conv2d` on small shapes; prints one JSON line per case.

CI runs it on the CPU under Triton's interpreter (the environment variable must be set before
triton is imported, which is why this is a separate process)::

    TRITON_INTERPRET=1 python -m fxprune.kernels.selfcheck

On a GPU machine, ``python -m fxprune.kernels.selfcheck --device cuda`` runs the same cases
compiled. Each case reports the relative max error against ``conv2d(x * in_flags, W, b) * mask``
computed in float64 from the same rounded inputs, whether every masked channel is exactly zero, and which kernel ran.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

# name: (n, cin, cout, h, w, k, stride, padding, dilation, groups, density, in_mask, bias, dtype[, extras])
# extras: nhwc (channels_last input), affine (eval-BN scale/shift in the epilogue), relu
CASES = {
    "3x3": (2, 8, 24, 9, 7, 3, 1, 1, 1, 1, 0.5, False, True, "float32"),
    "stride2_pad0_dil2": (2, 8, 24, 11, 9, 3, 2, 0, 2, 1, 0.5, False, True, "float32"),
    "asymmetric": (1, 5, 19, 7, 10, (3, 1), (2, 1), (1, 0), (1, 2), 1, 0.6, False, True, "float32"),
    "1x1_odd": (3, 13, 37, 5, 3, 1, 1, 0, 1, 1, 0.4, False, False, "float32"),
    "all_zero_mask": (2, 8, 24, 6, 6, 3, 1, 1, 1, 1, 0.0, False, True, "float32"),
    "all_one_mask": (2, 8, 24, 6, 6, 3, 1, 1, 1, 1, 1.0, False, True, "float32"),
    "in_mask": (2, 12, 24, 7, 7, 3, 1, 1, 1, 1, 0.5, True, True, "float32"),
    "in_mask_all_zero_out": (2, 12, 20, 5, 5, 3, 1, 1, 1, 1, 0.0, True, False, "float32"),
    "grouped_gemm": (2, 32, 64, 6, 6, 3, 1, 1, 1, 2, 0.5, False, True, "float32"),
    "grouped_gemm_in_mask": (2, 32, 64, 6, 6, 3, 2, 1, 1, 2, 0.5, True, True, "float32"),
    "grouped_small": (2, 12, 16, 7, 7, 3, 1, 1, 1, 4, 0.5, True, True, "float32"),
    "depthwise": (2, 16, 16, 9, 9, 3, 1, 1, 1, 16, 0.5, False, True, "float32"),
    "depthwise_s2_in_mask": (2, 16, 16, 9, 8, 3, 2, 1, 1, 16, 0.5, True, False, "float32"),
    "depthwise_mult2": (2, 8, 16, 7, 7, 5, 1, 2, 1, 8, 0.6, False, True, "float32"),
    "fp16": (2, 8, 24, 9, 7, 3, 1, 1, 1, 1, 0.5, True, True, "float16"),
    "bf16": (2, 8, 24, 9, 7, 3, 1, 1, 1, 1, 0.5, False, True, "bfloat16"),
    "bf16_depthwise": (2, 16, 16, 9, 9, 3, 1, 1, 1, 16, 0.5, False, True, "bfloat16"),
    # tensor-core path: several K blocks per tap, channels_last activations, fused epilogue
    "wide_k_nhwc": (2, 40, 24, 6, 5, 3, 1, 1, 1, 1, 0.5, False, True, "float32", {"nhwc": True}),
    "wide_k_in_mask_nhwc": (2, 40, 24, 6, 5, 3, 2, 1, 1, 1, 0.5, True, True, "float32", {"nhwc": True}),
    "bf16_tensor_core_nhwc": (2, 48, 40, 6, 6, 3, 1, 1, 1, 1, 0.6, False, True, "bfloat16", {"nhwc": True}),
    "fp16_tensor_core_in_mask": (2, 48, 40, 6, 6, 1, 1, 0, 1, 1, 0.6, True, False, "float16", {}),
    "epilogue_bn_relu": (2, 24, 24, 6, 6, 3, 1, 1, 1, 1, 0.5, False, True, "float32", {"affine": True, "relu": True}),
    "epilogue_relu_depthwise": (2, 16, 16, 7, 7, 3, 1, 1, 1, 16, 0.5, False, True, "float32", {"relu": True}),
}
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}  # output rounding + fp32 accumulation


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def run_case(name: str, device: str, seed: int = 0) -> dict:
    from . import triton_conv

    n, cin, cout, h, w, k, s, p, d, g, density, use_in, use_bias, dtype_name, *more = CASES[name]
    extras = more[0] if more else {}
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    x = torch.randn(n, cin, h, w, generator=gen)
    weight = torch.randn(cout, cin // g, kh, kw, generator=gen)
    bias = torch.randn(cout, generator=gen) if use_bias else None
    live = torch.rand(cout, generator=gen) < density
    mask = live.float() * (torch.rand(cout, generator=gen) + 0.5)
    in_mask = (torch.rand(cin, generator=gen) < 0.6).float() if use_in else None
    scale = torch.rand(cout, generator=gen) + 0.5 if extras.get("affine") else None
    shift = torch.randn(cout, generator=gen) if extras.get("affine") else None

    def dev(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    def exact(t):  # the reference sees the same rounded inputs, in float64
        return None if t is None else t.to(dtype).double()

    xr = exact(x) if in_mask is None else exact(x) * in_mask.double()[None, :, None, None]
    ref = F.conv2d(xr, exact(weight), exact(bias), _pair(s), _pair(p), _pair(d), g)
    ref = ref * exact(mask)[None, :, None, None]
    if scale is not None:
        ref = ref * exact(scale)[None, :, None, None] + exact(shift)[None, :, None, None]
    if extras.get("relu"):
        ref = ref.clamp_min(0)
    ref = ref * live.double()[None, :, None, None]  # dead channels are exact zeros, also after a shift
    xd = dev(x)
    if extras.get("nhwc"):
        xd = xd.contiguous(memory_format=torch.channels_last)

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 tiles in IEEE, not TF32
        y = triton_conv.masked_conv2d(xd, dev(weight), dev(bias), dev(mask), dev(in_mask), _pair(s),
                                      _pair(p), _pair(d), g, scale=dev(scale), shift=dev(shift),
                                      relu=bool(extras.get("relu")))
    same_layout = y.is_contiguous(memory_format=torch.channels_last if extras.get("nhwc") else torch.contiguous_format)
    y = y.double().cpu()
    scale = max(ref.abs().max().item(), 1e-30)
    return {"case": name, "dtype": dtype_name, "shape": list(y.shape), "ref_shape": list(ref.shape),
            "rel_err": (y - ref).abs().max().item() / scale, "tolerance": TOLERANCE[dtype_name],
            "masked_exact_zero": bool((y[:, ~live] == 0).all()), "layout_kept": same_layout,
            "kernel": "gemm" if triton_conv.uses_gemm(cin, cout, kh, kw, g) else "direct",
            "interpreted": triton_conv._interpreted()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (under TRITON_INTERPRET=1) or cuda")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    args = ap.parse_args(argv)
    failed = 0
    for name in args.cases.split(","):
        try:
            r = run_case(name, args.device)
            ok = (r["rel_err"] <= r["tolerance"] and r["masked_exact_zero"] and r["shape"] == r["ref_shape"]
                  and r["layout_kept"])
        except Exception as e:  # report every case, then fail
            r, ok = {"case": name, "error": f"{type(e).__name__}: {e}"}, False
        r["ok"] = ok
        failed += not ok
        print(json.dumps(r), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
