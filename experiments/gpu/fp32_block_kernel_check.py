"""GPU check of the scale-mode-fp32 kernel (fp4/kernels/fp32_block_quant.py): byte equality with the
torch reference (fp4.quantize, backend="torch", same GPU, same generator seed for SR) over a set of
cases, compiled Triton and real GPU division; then bandwidth for one 8192 x 4096 bfloat16 operand.

Usage (device machine, repo root; needs only torch + triton):
    python3 experiments/gpu/fp32_block_kernel_check.py            # check + timing (< 60 s)
    python3 experiments/gpu/fp32_block_kernel_check.py --sweep    # also time tile configs
    (--no-check skips the byte-equality cases: timing / sweep only)
Prints PASS / FAIL per case and a summary line; exits 1 on any mismatch.

Cases: randn with a power of two per row spanning 2^+-20 plus planted 16-blocks (all zero, all -0,
subnormal amax, amax 2^-149 where s underflows to 0, s exactly 2^-127, tiny quotients next to a
1.0, grid ties, near-FLT_MAX, NaN / +-Inf), for every element (e1m2, int4, e2m1), both axes,
nearest and stochastic, bf16 / fp32 (fp16 for e1m2); fused Hadamard-16 (exact-sum inputs, random
signs) on both axes; the timing tensor itself, both axes, nearest and SR. Nearest cases are also
compared with the reference run on the CPU (the contract; must agree as well). The kernel's PTX is
scanned for `.ftz` / approximate-division instructions (informational).
"""
from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import triton  # noqa: E402

from fp4.formats import MX_ELEMENTS  # noqa: E402
from fp4.kernels import triton_quantize_operand  # noqa: E402
from fp4.kernels import fp32_block_quant as K  # noqa: E402
from fp4.quantize import quantize_operand, use_triton  # noqa: E402

DEV = "cuda"
FMTS = ("e1m2", "int4", "e2m1")
T0 = time.time()
results = []


def special_rows(fmt: str, dtype) -> torch.Tensor:
    """[n, 16] hard blocks (float32 values, cast to dtype by the caller's write)."""
    M = MX_ELEMENTS[fmt].max
    grid = MX_ELEMENTS[fmt].grid.float()
    mids = (grid[1:] + grid[:-1]) / 2
    u = torch.rand(16, generator=torch.Generator().manual_seed(2))
    fmax = float(torch.finfo(dtype).max)
    sub = 2.0 ** -149

    def block(*vals, fill=None):
        b = torch.zeros(16) if fill is None else fill.clone()
        b[:len(vals)] = torch.tensor(vals, dtype=torch.float32)
        return b

    rows = [torch.zeros(16), -torch.zeros(16), u * 2.0 ** -140, block(sub), block(3 * sub, -sub, sub),
            block(2.0 ** -126, fill=u * 2.0 ** -126), block(M * 2.0 ** -127, fill=-u * 2.0 ** -127),
            block(1.0, 2.0 ** -130, -2.0 ** -140, 1e-38, -1e-30, 2.0 ** -100, fill=u * 0.01),
            block(M, *mids.tolist(), *(-mids[:1]).tolist()), block(M, *(grid[1:] * (1 + 2 ** -22)).tolist()),
            block(fmax, fill=u * fmax), block(-fmax, fmax, fill=-u * 1e38),
            block(float("nan"), fill=u), block(1.0, float("inf"), fill=u), block(-1.0, float("-inf"), fill=-u)]
    return torch.stack(rows)


def planted(shape, dtype, axis, fmt, seed=0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    R, C = shape
    x = torch.randn(shape, generator=g, device=DEV)
    x = x * torch.exp2(torch.randint(-20, 20, (R, 1), generator=g, device=DEV).float())
    sp = special_rows(fmt, dtype).to(DEV)
    n = sp.shape[0]
    for i in range(0, 8 * n):  # each hard block several times, spread over the tensor
        r = (i * 7919) % (R if axis == -1 else C)
        j = (i * 104729) % ((C if axis == -1 else R) // 16)
        if axis == -1:
            x[r, 16 * j:16 * j + 16] = sp[i % n]
        else:
            x[16 * j:16 * j + 16, r] = sp[i % n]
    return x.to(dtype)


def exact_hadamard_input(shape, axis, seed=1):
    g = torch.Generator().manual_seed(seed)
    R, C = shape if axis == -1 else shape[::-1]
    k = torch.randint(-255, 256, (R, C), generator=g).float()
    x = k * torch.exp2(torch.randint(-4, 1, (R, C), generator=g).float())
    x = x * torch.exp2(torch.randint(-30, 30, (R, 1), generator=g).float())
    x = x if axis == -1 else x.t().contiguous()
    return x.to(torch.bfloat16).to(DEV)


def nbad(a, b) -> int:
    return int((a.contiguous().view(torch.int32) != b.contiguous().view(torch.int32)).sum())


def run_case(name, x, fmt, axis, rounding, seed=0, cpu_ref=None, **kw):
    gen = (lambda: torch.Generator(device=DEV).manual_seed(seed)) if rounding == "stochastic" else (lambda: None)
    out, ts = triton_quantize_operand(x, fmt, axis, rounding=rounding, scale_mode="fp32", generator=gen(), **kw)
    ref, _ = quantize_operand(x, fmt, axis, rounding=rounding, scale_mode="fp32", generator=gen(),
                              backend="torch", **kw)
    bad = nbad(out, ref) + int(ts is not None)
    extra = ""
    if cpu_ref is None:
        cpu_ref = rounding == "nearest"
    if cpu_ref:
        kw_cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        ref_cpu, _ = quantize_operand(x.cpu(), fmt, axis, rounding=rounding, scale_mode="fp32",
                                      backend="torch", **kw_cpu)
        b_cpu = nbad(out.cpu(), ref_cpu)
        bad += b_cpu
        extra = f", vs CPU ref {b_cpu}"
    results.append((name, bad))
    print(f"{'PASS' if bad == 0 else 'FAIL'} {name}: mismatches {bad} (vs GPU ref {nbad(out, ref)}{extra})",
          flush=True)
    return out


def checks():
    for fmt in FMTS:
        dtypes = (torch.bfloat16, torch.float32) + ((torch.float16,) if fmt == "e1m2" else ())
        for dtype in dtypes:
            for axis in (-1, 0):
                shape = (1024, 1536) if axis == -1 else (1536, 1024)
                x = planted(shape, dtype, axis, fmt, seed=hash((fmt, str(dtype), axis)) % 1000)
                for rounding in ("nearest", "stochastic"):
                    run_case(f"{fmt} {str(dtype)[6:]} axis={axis} {rounding} planted{shape}", x, fmt, axis,
                             rounding, seed=11)
        # Odd sizes (partial tiles / blocks) and a 3-D operand.
        x = planted((1000, 1000), torch.bfloat16, -1, fmt, seed=3)[:999, :1000 - 7]
        run_case(f"{fmt} bf16 axis=-1 nearest odd{tuple(x.shape)}", x.contiguous(), fmt, -1, "nearest")
        run_case(f"{fmt} bf16 axis=0 stochastic odd{tuple(x.shape)}", x.contiguous(), fmt, 0, "stochastic", seed=5)
        x3 = torch.randn(4, 333, 96, device=DEV).to(torch.bfloat16)
        run_case(f"{fmt} bf16 axis=1 stochastic 3-D(4,333,96)", x3, fmt, 1, "stochastic", seed=6)
    # Fused Hadamard-16 with random signs (the ufp4 recipe's RHT), both axes.
    signs = (torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(4)) * 2 - 1).float().to(DEV)
    for axis in (-1, 0):
        x = exact_hadamard_input((1024, 768), axis)
        for fmt, rounding in (("e1m2", "nearest"), ("int4", "stochastic"), ("e2m1", "stochastic")):
            run_case(f"{fmt} h16 axis={axis} {rounding}", x, fmt, axis, rounding, seed=7,
                     hadamard_block=16, hadamard_signs=signs)
    # Routing: backend auto on CUDA takes the kernel.
    ok = use_triton(torch.zeros(1, device=DEV), "auto", "e1m2", "fp32")
    results.append(("route auto -> kernel", 0 if ok else 1))
    print(f"{'PASS' if ok else 'FAIL'} route: use_triton(cuda, 'auto', 'e1m2', 'fp32') = {ok}")


def sweep_configs(x, axis, rounding, gen, nbytes, hb=None):
    """Time launch configs (TR, TC, num_warps) of fp32_block_quantize on x (2-D) along axis."""
    kaxis = 1 if axis == -1 else 0
    R, C = x.shape
    x3 = x.view(1, R, C)
    ushape = (R, C // 16, 16) if kaxis == 1 else (C, R // 16, 16)
    configs = ([(4, 256, 4), (2, 512, 4), (4, 512, 8), (8, 128, 4), (4, 128, 2), (16, 128, 4), (1, 1024, 4)]
               if kaxis == 1 else
               [(16, 64, 2), (16, 32, 1), (16, 64, 1), (16, 128, 2), (16, 128, 4), (16, 256, 4), (32, 64, 2)])
    signs = torch.ones(hb, device=DEV) if hb else None
    for cfg in configs:
        if not K._fits(cfg, kaxis, hb or 1):
            continue
        t = ms(lambda: K.fp32_block_quantize(x3, "e1m2", kaxis, rounding, gen, ushape, hb, signs, config=cfg))
        print(f"    tile {cfg}: {t * 1e3:7.1f} us = {nbytes / t / 1e6:5.0f} GB/s", flush=True)


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=80)


def timing(sweep: bool):
    x = torch.randn(8192, 4096, device=DEV).to(torch.bfloat16)
    n = x.numel()
    t_copy = ms(lambda: x.clone())
    copy_gbs = 4 * n / t_copy / 1e6
    print(f"\ntiming 8192x4096 bf16: torch copy {t_copy * 1e3:.1f} us = {copy_gbs:.0f} GB/s (2 B read + 2 B write)")
    for axis in (-1, 0):
        for rounding in ("nearest", "stochastic"):
            gen = torch.Generator(device=DEV).manual_seed(0)
            kw = dict(rounding=rounding, scale_mode="fp32", generator=gen)
            run_case(f"e1m2 bf16 axis={axis} {rounding} timing-tensor", x, "e1m2", axis, rounding, seed=1,
                     cpu_ref=False)
            t_k = ms(lambda: triton_quantize_operand(x, "e1m2", axis, **kw))
            t_r = ms(lambda: quantize_operand(x, "e1m2", axis, backend="torch", **kw))
            # Bytes the kernel moves: x (2 B) + x_dq (4 B); SR adds the uniforms (4 B written by
            # torch.rand + 4 B read), all counted in the timed call.
            b = n * (6 + (8 if rounding == "stochastic" else 0))
            print(f"  axis={axis:>2} {rounding:<10} kernel {t_k * 1e3:7.1f} us = {b / t_k / 1e6:5.0f} GB/s "
                  f"({100 * b / t_k / 1e6 / copy_gbs:4.1f}% of copy BW; {t_k / t_copy:4.2f}x copy time) | "
                  f"torch ref {t_r * 1e3:8.1f} us ({t_r / t_k:5.1f}x slower)", flush=True)
            if sweep:
                sweep_configs(x, axis, rounding, gen, b)
    xh = exact_hadamard_input((8192, 4096), -1)
    signs = torch.ones(16, device=DEV)
    for axis in (-1, 0):
        xa = xh if axis == -1 else xh.t().contiguous()
        t_k = ms(lambda: triton_quantize_operand(xa, "e1m2", axis, scale_mode="fp32", hadamard_block=16,
                                                 hadamard_signs=signs))
        t_r = ms(lambda: quantize_operand(xa, "e1m2", axis, scale_mode="fp32", hadamard_block=16,
                                          hadamard_signs=signs, backend="torch"))
        b = 6 * n
        print(f"  axis={axis:>2} h16 nearest  kernel {t_k * 1e3:7.1f} us = {b / t_k / 1e6:5.0f} GB/s "
              f"({100 * b / t_k / 1e6 / copy_gbs:4.1f}% of copy BW) | torch ref {t_r * 1e3:8.1f} us "
              f"({t_r / t_k:5.1f}x slower)", flush=True)
        if sweep:
            sweep_configs(xa, axis, "nearest", None, b, hb=16)


def ptx_scan():
    """Count .ftz / approximate division in the compiled variants' PTX (informational)."""
    try:
        found = 0
        for cache in K.fp32_block_kernel.device_caches.values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for ck in kernels.values():
                ptx = ck.asm.get("ptx", "")
                found += 1
                print(f"  ptx variant: {ptx.count('.ftz')} '.ftz', {ptx.count('div.full.f32') + ptx.count('div.approx')}"
                      f" approx div, {ptx.count('div.rn.f64')} div.rn.f64, {ptx.count('div.rn.ftz.f32')} div.rn.ftz.f32")
                if found >= 6:
                    return
    except Exception as err:  # the cache layout differs between Triton versions
        print(f"  (ptx scan unavailable: {type(err).__name__}: {err})")


def main():
    sweep = "--sweep" in sys.argv
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
    if "--no-check" not in sys.argv:
        checks()
    print(f"checks done in {time.time() - T0:.1f} s", flush=True)
    timing(sweep)
    ptx_scan()
    bad = [name for name, n in results if n]
    print(f"\nSUMMARY fp32 block kernel: {len(results) - len(bad)}/{len(results)} cases PASS, "
          f"{len(bad)} FAIL{': ' + '; '.join(bad) if bad else ''} ({time.time() - T0:.1f} s)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
