"""GPU benchmark: deformconv's Triton kernels against torchvision and cuDNN's convolution.

Times forward and forward+backward with ``triton.testing.do_bench`` (median), measures the
extra peak memory of one forward+backward (beyond inputs and ``grad_output``) and the
relative error of the output and every gradient against the float64 computation on the same
rounded inputs.  Also reports the first call of each shape (compilation included), and at
the first shape the cost of deterministic mode, of a gradient penalty (double backward) and
of torch.func.grad and vmap(grad).  Every step is bounded by ``--budget`` seconds in all;
progress is printed with timestamps.  Writes a Markdown table (``--out``) and CSV (``--csv``).

    deformconv bench --gpu --out gpu.md
    deformconv bench --gpu --quick       # the first shape, bfloat16 and float16
    deformconv bench --gpu --tune        # also sweep tile sizes at the first shape
    python benchmarks/bench_gpu.py [same arguments]   # the same from a source tree
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import deformconv

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}",
          flush=True)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    batch: int
    channels: int
    size: int

    @property
    def label(self) -> str:
        return f"N={self.batch} C={self.channels}→{self.channels} {self.size}²"


STANDARD = [Shape(8, 256, 64), Shape(16, 128, 96), Shape(8, 512, 32), Shape(2, 64, 200)]
#: "fp32" contracts float32 exactly; "tf32" lets PyTorch (and so deformconv, and
#: torchvision's matrix products) use TF32.
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "tf32": torch.float32,
}


def make_inputs(shape: Shape, seed: int = 0, device: str = "cuda") -> dict[str, torch.Tensor]:
    """float64 inputs on ``device`` (the GPU): DCNv2 with mask, 3×3, padding 1, offsets of a few
    pixels."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, c, s = shape.batch, shape.channels, shape.size

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float64) * scale

    return {
        "input": randn(n, c, s, s),
        "offset": randn(n, 18, s, s, scale=2.0),
        "mask": torch.rand(n, 9, s, s, generator=g, device=device, dtype=torch.float64),
        "weight": randn(c, c, 3, 3, scale=1 / math.sqrt(9 * c)),
        "bias": randn(c),
        "grad": randn(n, c, s, s),
    }


def deformconv_fn(x, offset, mask, weight, bias):
    return deformconv.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)


def torchvision_fn():
    try:
        import torchvision.ops
    except Exception:  # missing, or built for another torch
        return None

    def run(x, offset, mask, weight, bias):
        return torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    return run


def conv_fn(x, offset, mask, weight, bias):
    return F.conv2d(x, weight, bias, padding=1)


def cast(tensors: dict, dtype: torch.dtype) -> dict:
    return {name: t.to(dtype).requires_grad_(name != "grad") for name, t in tensors.items()}


def runners(fn, tensors: dict):
    names = ("input", "offset", "mask", "weight", "bias")
    args = [tensors[n] for n in names]

    def forward():
        with torch.no_grad():
            return fn(*args)

    def forward_backward():
        out = fn(*args)
        used = [a for a in args if a.requires_grad]
        return torch.autograd.grad(out, used, tensors["grad"], allow_unused=True)

    return forward, forward_backward


def peak_extra_mib(run) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = run()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def relative_errors(fn, tensors: dict, reference: tuple) -> tuple[float, float]:
    """(output error, largest gradient error) against the float64 results."""
    args = [tensors[n] for n in ("input", "offset", "mask", "weight", "bias")]
    out = fn(*args)
    grads = torch.autograd.grad(out, args, tensors["grad"])
    errors = [
        ((a.double() - b).norm() / b.norm()).item()
        for a, b in zip((out, *grads), reference, strict=True)
    ]
    return errors[0], max(errors[1:])


def float64_reference(tensors: dict) -> tuple:
    exact = {n: t.detach().double().requires_grad_(n != "grad") for n, t in tensors.items()}
    args = [exact[n] for n in ("input", "offset", "mask", "weight", "bias")]
    with deformconv.use_backend("torch"):
        out = deformconv_fn(*args)
        grads = torch.autograd.grad(out, args, exact["grad"])
    return tuple(t.detach() for t in (out, *grads))


def bench(run) -> float:
    from triton.testing import do_bench

    return do_bench(run, warmup=25, rep=100, return_mode="median")


def within(budget: float, step: str) -> bool:
    """Whether ``budget`` seconds have not all gone yet; logs that ``step`` is skipped if they
    have."""
    if time.perf_counter() - START <= budget:
        return True
    log(f"budget spent: skipping {step}")
    return False


def measure(shapes, dtypes, budget: float, with_errors: bool) -> list[dict]:
    impls = {"deformconv": deformconv_fn, "torchvision": torchvision_fn(), "cuDNN conv2d": conv_fn}
    rows = []
    for shape in shapes:
        base = make_inputs(shape)
        for dtype_name in dtypes:
            if not within(budget, f"{shape.label} {dtype_name}"):
                continue
            dtype = DTYPES[dtype_name]
            tf32 = dtype_name == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            tensors = cast(base, dtype)
            reference = float64_reference(tensors) if with_errors else None
            for impl, fn in impls.items():
                row = {"shape": shape.label, "dtype": dtype_name, "impl": impl}
                if fn is None or (impl == "torchvision" and dtype_name == "bf16"):
                    continue
                forward, forward_backward = runners(fn, tensors)
                try:
                    torch.cuda.synchronize()
                    tic = time.perf_counter()
                    forward_backward()
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - tic
                    row["fwd_ms"] = bench(forward)
                    row["fwd_bwd_ms"] = bench(forward_backward)
                    row["peak_mib"] = peak_extra_mib(forward_backward)
                    if reference is not None and impl != "cuDNN conv2d":
                        row["err_out"], row["err_grad"] = relative_errors(fn, tensors, reference)
                except Exception as error:  # report and go on: one failure must not hide others
                    row["error"] = f"{type(error).__name__}: {error}"[:200]
                rows.append(row)
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in row.items()))  # fmt: skip
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            del tensors, reference
            torch.cuda.empty_cache()
    return rows


def derivative_costs(shape: Shape, dtype_name: str) -> list[dict]:
    """Forward+backward against forward+backward with a gradient penalty on the input (the
    backward's own backward), ``torch.func.grad`` of every tensor and per-sample gradients
    (``vmap(grad)``, weight and bias shared), deformconv and cuDNN's convolution."""
    tensors = cast(make_inputs(shape), DTYPES[dtype_name])
    args = [tensors[n] for n in ("input", "offset", "mask", "weight", "bias")]
    plain = [a.detach() for a in args]
    in_dims = (0, 0, 0, None, None)
    batched = [a if d is None else a.unsqueeze(1) for a, d in zip(plain, in_dims, strict=True)]
    rows = []
    for impl, fn in (("deformconv", deformconv_fn), ("cuDNN conv2d", conv_fn)):
        _, forward_backward = runners(fn, tensors)

        def penalised(fn=fn):
            out = fn(*args)
            (grad,) = torch.autograd.grad(out, args[0], tensors["grad"], create_graph=True)
            loss = (out * tensors["grad"]).sum() + grad.float().square().sum()
            return torch.autograd.grad(loss, args, allow_unused=True)

        def loss(*values, fn=fn):
            return fn(*values).float().square().sum()

        gradients = torch.func.grad(loss, argnums=tuple(range(len(args))))
        per_sample = torch.func.vmap(gradients, in_dims=in_dims)
        row = {"shape": shape.label, "dtype": dtype_name, "impl": impl}
        try:
            row.update(fwd_bwd_ms=bench(forward_backward), penalty_ms=bench(penalised),
                       func_grad_ms=bench(lambda g=gradients: g(*plain)),
                       per_sample_ms=bench(lambda g=per_sample: g(*batched)))  # fmt: skip
        except Exception as error:  # report and go on
            row["error"] = f"{type(error).__name__}: {error}"[:200]
        log(f"derivatives: {row}")
        rows.append(row)
    return rows


def deterministic_cost(shape: Shape, dtype_name: str) -> dict:
    tensors = cast(make_inputs(shape), DTYPES[dtype_name])
    _, forward_backward = runners(deformconv_fn, tensors)
    default = bench(forward_backward)
    torch.use_deterministic_algorithms(True)
    try:
        first = forward_backward()
        second = forward_backward()
        identical = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        deterministic = bench(forward_backward)
    finally:
        torch.use_deterministic_algorithms(False)
    row = {"shape": shape.label, "dtype": dtype_name, "default_ms": default,
           "deterministic_ms": deterministic, "bit_identical": identical}  # fmt: skip
    log(f"deterministic: {row}")
    return row


@contextmanager
def overridden(settings: dict):
    """Run with ``settings`` (kernel → launch settings) replacing the kernels' defaults."""
    from deformconv.kernels import ops

    saved = {kernel: dict(ops.CONFIG_OVERRIDES[kernel]) for kernel in settings}
    for kernel, config in settings.items():
        ops.CONFIG_OVERRIDES[kernel] = config
    try:
        yield
    finally:
        ops.CONFIG_OVERRIDES.update(saved)


#: Register caps tried in the breakdown: fewer registers per thread let a multiprocessor hold
#: more blocks, at the price of spills (``tests/compile_kernels.py`` prints both: at the
#: benchmark's first shape in bfloat16, about 28 spill stores a thread for the input gradient
#: at 168, about 37 for the weight gradient at 128).
REGISTER_CAPS = {"backward_data": (168,), "backward_weight": (128,)}


def breakdown(shape: Shape, dtype_name: str) -> list[dict]:
    """Each kernel alone in ``dtype_name`` (``tf32``: TF32 products): forward, the three
    gradient groups, and their variants."""
    from deformconv.kernels import ops

    tensors = cast(make_inputs(shape), DTYPES[dtype_name])
    x, offset, mask, weight, bias = (
        tensors[n].detach() for n in ("input", "offset", "mask", "weight", "bias")
    )
    grad, conv = tensors["grad"], ([1, 1], [1, 1], [1, 1])
    precision = "tf32" if dtype_name == "tf32" else "ieee"

    def forward():
        return torch.ops.deformconv.triton_deform_conv2d(
            x, offset, mask, weight, bias, *conv, precision
        )

    def backward(needs, deterministic=False):
        return lambda: torch.ops.deformconv.triton_deform_conv2d_backward(
            grad, x, offset, mask, weight, *conv, needs, precision, deterministic
        )

    data = backward([True, True, True, False])  # one pass, as a training step runs it
    weights = backward([False, False, False, True])
    cases = [
        ("forward", forward, {}),
        ("grad input+offset+mask", data, {}),
        ("grad input", backward([True, False, False, False]), {}),
        ("grad offset+mask", backward([False, True, True, False]), {}),
        ("grad weight", weights, {}),
        ("grad input, deterministic", backward([True, False, False, False], True), {}),
        ("grad weight, deterministic", backward([False, False, False, True], True), {}),
    ]
    capped = {"backward_data": ("grad input+offset+mask", data),
              "backward_weight": ("grad weight", weights)}  # fmt: skip
    for kernel, caps in REGISTER_CAPS.items():
        name, run = capped[kernel]
        cases += [(f"{name}, ≤ {cap} registers", run, {kernel: {"maxnreg": cap}}) for cap in caps]
    rows = []
    for name, run, settings in cases:
        try:
            with overridden(settings):
                run()
                rows.append({"kernel": name, "dtype": dtype_name, "fwd_bwd_ms": bench(run)})
        except Exception as error:  # report and go on: one failure must not hide others
            rows.append({"kernel": name, "dtype": dtype_name,
                         "error": f"{type(error).__name__}: {error}"[:200]})  # fmt: skip
        log(f"breakdown {rows[-1]}")
    ops.ATOMIC_SEMANTICS = "acq_rel"
    try:
        run = backward([True, False, False, False])
        run()
        rows.append({"kernel": "grad input, acq_rel atomics", "dtype": dtype_name,
                     "fwd_bwd_ms": bench(run)})  # fmt: skip
        log(f"breakdown {rows[-1]}")
    finally:
        ops.ATOMIC_SEMANTICS = "relaxed"
    return rows


def _capped(config: dict, registers: int = 128) -> dict:
    """``config`` with at most ``registers`` registers per thread (see :data:`REGISTER_CAPS`)."""
    return {**config, "maxnreg": registers}


#: The input/offset/mask gradient's default tile at the benchmark's first shape.
_DATA_TILE = {"BLOCK_M": 64, "BLOCK_O": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}

TUNING = {
    "forward": [
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    ],
    "backward_data": [
        {"BLOCK_M": 128, "BLOCK_O": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_O": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_O": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_O": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
        _capped(_DATA_TILE, 168),
    ],
    "backward_weight": [
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
        _capped({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2}),
    ],
}


#: Tile configurations tried for float32 operands (exact or TF32); each kernel's first is its
#: narrower default of before 2026-11-28 (the forward's is still exact float32's).
TUNING_FP32 = {
    "forward": [
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    ],
    "backward_data": [
        _DATA_TILE,
        {"BLOCK_M": 128, "BLOCK_O": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
        _capped(_DATA_TILE, 168),
    ],
    "backward_weight": [
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 32, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2},
    ],
}


def tune(shape: Shape, dtype_name: str, budget: float) -> list[dict]:
    """Time each tile configuration of each kernel, the others at their defaults (``tf32``:
    with TF32 allowed)."""
    tensors = cast(make_inputs(shape), DTYPES[dtype_name])
    forward, forward_backward = runners(deformconv_fn, tensors)
    table = TUNING if dtype_name in ("bf16", "fp16") else TUNING_FP32
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    try:
        return _tune(forward, forward_backward, table, dtype_name, budget)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def _tune(forward, forward_backward, table: dict, dtype_name: str, budget: float) -> list[dict]:
    from deformconv.kernels import ops

    rows = []
    for kernel, configs in table.items():
        for config in configs:
            if time.perf_counter() - START > budget:
                log("tuning budget spent")
                return rows
            try:
                with overridden({kernel: config}):
                    forward_backward()
                    times = {"fwd_ms": bench(forward), "fwd_bwd_ms": bench(forward_backward)}
                row = {"kernel": kernel, "dtype": dtype_name, **config, **times}
            except Exception as error:
                row = {"kernel": kernel, "dtype": dtype_name, **config,
                       "error": f"{type(error).__name__}: {error}"}  # fmt: skip
            rows.append(row)
            log(f"tune {row}")
    ops.GATHER_CHANNELS_LAST = False
    try:
        rows.append({"kernel": "gather from NCHW", "dtype": dtype_name, "fwd_ms": bench(forward),
                     "fwd_bwd_ms": bench(forward_backward)})  # fmt: skip
        log(f"tune {rows[-1]}")
    finally:
        ops.GATHER_CHANNELS_LAST = True
    return rows


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value else f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict], det: list[dict], tuning: list[dict],
             derivatives: list[dict] = ()) -> str:  # fmt: skip
    props = torch.cuda.get_device_properties(0)
    import triton

    lines = [
        f"GPU: {props.name}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"triton {triton.__version__}; DCNv2 with mask, 3×3, padding 1, C→C. "
        "Times: median of triton.testing.do_bench. Peak: extra memory of one forward+backward "
        "beyond inputs and grad_output. Errors: ‖out − ref‖/‖ref‖ against float64 on the same "
        "rounded inputs (output; largest over the five gradients). First call: first "
        "forward+backward of the shape, compilation included.",
        "",
        "| shape | dtype | impl | fwd ms | fwd+bwd ms | peak MiB | err out | err grads "
        "| first call s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']} | failed: {r['error']} "
                         "| | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['impl']} | {fmt(r['fwd_ms'])} "
            f"| {fmt(r['fwd_bwd_ms'])} | {r['peak_mib']:.0f} | {fmt(r.get('err_out'), 2)} "
            f"| {fmt(r.get('err_grad'), 2)} | {r['first_call_s']:.1f} |"
        )
    if det:
        lines += ["", "| deterministic mode | dtype | default fwd+bwd ms | deterministic ms "
                  "| bit-identical |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {d['shape']} | {d['dtype']} | {d['default_ms']:.3f} | {d['deterministic_ms']:.3f}"
            f" | {d['bit_identical']} |"
            for d in det
        ]
    if derivatives:
        lines += ["", "| derivatives | dtype | impl | fwd+bwd ms | fwd+bwd+penalty ms "
                  "| torch.func.grad ms | vmap(grad) ms |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {p['shape']} | {p['dtype']} | {p['impl']} | {fmt(p.get('fwd_bwd_ms'))} "
                  f"| {fmt(p.get('penalty_ms'))} | {fmt(p.get('func_grad_ms'))} "
                  f"| {fmt(p.get('per_sample_ms'))} {p.get('error', '')} |"
                  for p in derivatives]  # fmt: skip
    if tuning:
        lines += ["", "| kernel | config | fwd ms | fwd+bwd (or kernel) ms |", "|---|---|---|---|"]
        for t in tuning:
            config = {k: v for k, v in t.items() if k not in ("kernel", "fwd_ms", "fwd_bwd_ms")}
            lines.append(f"| {t['kernel']} | {config} | {fmt(t.get('fwd_ms'))} "
                         f"| {fmt(t.get('fwd_bwd_ms'))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def dtype_list(text: str) -> list[str]:
    """``"bf16,tf32"`` → ``["bf16", "tf32"]``, each a key of :data:`DTYPES`.

    >>> dtype_list("bf16,tf32")
    ['bf16', 'tf32']
    """
    names = text.split(",")
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"expected dtypes among {', '.join(sorted(DTYPES))}, got {', '.join(unknown)}"
        )
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="deformconv bench --gpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="first shape, bf16 and fp16 only")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,tf32")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for everything")
    parser.add_argument("--tune", action="store_true", help="sweep tile sizes at the first shape")
    parser.add_argument("--tune-dtype", default="bf16", type=dtype_list,
                        help="the dtypes --tune and --breakdown use, comma-separated "
                             "(default bf16)")  # fmt: skip
    parser.add_argument(
        "--breakdown", action="store_true", help="time each kernel alone at the first shape"
    )
    parser.add_argument("--no-errors", action="store_true", help="skip the float64 comparison")
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--csv", help="write one row per measurement here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = STANDARD[:1] if args.quick else STANDARD
    dtypes = ["bf16", "fp16"] if args.quick else args.dtypes.split(",")
    log(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    tuning = []
    for index, dtype_name in enumerate(args.tune_dtype):
        tuning += breakdown(shapes[0], dtype_name) if args.breakdown else []
        # The sweeps share 40 % of the budget; each stops at its share's end.
        share = args.budget * 0.4 * (index + 1) / len(args.tune_dtype)
        tuning += tune(shapes[0], dtype_name, share) if args.tune else []
    rows = measure(shapes, dtypes, args.budget * 0.9, not args.no_errors)
    extra = [d for d in ("bf16", "fp32") if d in dtypes]
    det = [deterministic_cost(shapes[0], d) for d in extra if within(args.budget, "det " + d)]
    derivatives = [row for d in extra if within(args.budget, "derivatives " + d)
                   for row in derivative_costs(shapes[0], d)]  # fmt: skip
    table = markdown(rows, det, tuning, derivatives)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(rows)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
