"""A tiled matrix multiplication in Triton: C = A @ B, fp16/bf16 in, fp32 accumulate.

Each program computes one BLOCK_M x BLOCK_N tile of C by walking along K in steps of
BLOCK_K: load a tile of A and a tile of B, multiply-accumulate them on the tensor cores
(``tl.dot``), advance. Two ideas make it fast:

- **Grouped ordering.** Programs that run at the same time should share inputs. Launched
  row by row, neighbouring programs share a tile-row of A but each needs a different
  column of B, so B streams through L2 again and again. Grouping GROUP_M tile-rows and
  walking down columns inside a group reuses both A and B from L2.
- **Autotuned block sizes.** The best tile shape, pipeline depth (``num_stages``) and warp
  count depend on the GPU and the matrix shape; ``autotune`` times each candidate on the
  first call for a shape (median of repeats, like every timing in the kit) and keeps the
  fastest.

A second kernel, ``matmul_tma_kernel``, is what Hopper GPUs (H100, H200) need to come close
to cuBLAS on mid-sized matrices such as 4096^3, where there are only a few waves of tiles and
each tile's start-up and epilogue weigh more:

- **Persistent programs.** Launch one program per SM, not one per tile; each walks over tiles
  ``pid, pid + NUM_SMS, ...``. The next tile's loads overlap the current tile's epilogue
  (``tl.range(..., flatten=True)`` lets the compiler pipeline across tile boundaries).
- **Tensor descriptors (TMA).** The Tensor Memory Accelerator copies a whole 2-D tile from
  global to shared memory from one descriptor (base, shape, strides, block shape): no
  per-element address arithmetic in the registers, out-of-bounds rows filled with zeros by
  the hardware. It needs 16-byte aligned rows (K and N multiples of 8 in 16-bit dtypes).

``autotune`` measures both kernels' candidates side by side and keeps whichever is faster.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._args import check_int
from . import choose_backend, fastest, interpreting, tma_supported

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _kernels():
    """Build the kernel on first use, so that importing labkit never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def matmul_kernel(
        a_ptr, b_ptr, c_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        # which tile of C is ours: grouped ordering (see the module docstring)
        pid = tl.program_id(axis=0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        # pointers to the first K-tile of A (BLOCK_M x BLOCK_K) and B (BLOCK_K x BLOCK_N);
        # rows/columns past the edge wrap around (% M, % N): they are computed, never stored
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulator
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:  # K is a multiple of BLOCK_K: no mask, fewer instructions in the hot loop
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:  # mask the ragged last K-tile with zeros
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if UPCAST:  # only under the CPU interpreter, whose bf16 tl.dot is wrong (triton 3.9)
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        c = acc.to(c_ptr.dtype.element_ty)
        offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn
        tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))

    @triton.jit
    def matmul_tma_kernel(
        a_desc, b_desc, c_desc, M, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr, UPCAST: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    ):  # fmt: skip
        # persistent: this program handles tiles pid, pid + NUM_SMS, pid + 2*NUM_SMS, ...
        start_pid = tl.program_id(axis=0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(start_pid, num_pid_m * num_pid_n, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
            group_id = tile // num_pid_in_group  # the same grouped ordering as matmul_kernel
            first_pid_m = group_id * GROUP_M
            group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
            off_m = (first_pid_m + ((tile % num_pid_in_group) % group_size_m)) * BLOCK_M
            off_n = ((tile % num_pid_in_group) // group_size_m) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(k_tiles):
                # one TMA copy per operand tile; rows or columns past the edge arrive as zeros
                a = a_desc.load([off_m, k * BLOCK_K])
                b = b_desc.load([k * BLOCK_K, off_n])
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc)
            if EPILOGUE_SPLIT:  # store in two halves: fewer registers and shared memory live at once
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                left, right = tl.split(halves)
                c_desc.store([off_m, off_n], left.to(c_desc.dtype))
                c_desc.store([off_m, off_n + BLOCK_N // 2], right.to(c_desc.dtype))
            else:
                c_desc.store([off_m, off_n], acc.to(c_desc.dtype))

    return triton, matmul_kernel, matmul_tma_kernel


@dataclass(frozen=True)
class TileConfig:
    """One candidate launch: tile sizes, software-pipeline depth and warps per program."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    group_m: int = 8
    persistent: bool = False  # matmul_tma_kernel (Hopper: persistent programs fed by TMA)
    epilogue_split: bool = False  # persistent only: store C in two halves
    warp_specialize: bool = False  # persistent only: producer/consumer warps (Triton >= 3.4 decides per GPU)

    def __post_init__(self) -> None:
        check_launch_sizes(self, ("block_m", "block_n", "block_k"))
        check_int("group_m", self.group_m)


def check_launch_sizes(config, blocks: tuple[str, ...]) -> None:
    """A launch configuration Triton can compile: power-of-two blocks (tl.arange needs them), at least one
    pipeline stage, a power of two of warps up to 32. A ValueError naming the field otherwise."""
    name = type(config).__name__
    for field in blocks:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{name}.{field} must be a power of two >= 1 (tl.arange needs one), got {value!r}")
    check_int(f"{name}.num_stages", config.num_stages)
    warps = config.num_warps
    if isinstance(warps, bool) or not isinstance(warps, int) or warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{name}.num_warps must be one of 1, 2, 4, 8, 16, 32, got {warps!r}")


# Candidates for Ampere and Hopper tensor cores. On an H200 at 4096^3 bf16 the first one ran
# at 95% of cuBLAS and 128x256x128 tiles at 64% (benchmarks/RESULTS.md): the best tile depends
# on the chip and the shape, so autotune() measures them and keeps the fastest per shape.
CONFIGS = [
    TileConfig(128, 128, 64, 3, 8),
    TileConfig(128, 128, 64, 4, 4),
    TileConfig(128, 256, 64, 4, 8),
    TileConfig(256, 128, 64, 4, 8),
    TileConfig(128, 256, 64, 3, 8),
    TileConfig(256, 128, 64, 3, 8),
    TileConfig(128, 128, 32, 4, 4),
    TileConfig(64, 256, 32, 4, 4),
    TileConfig(128, 64, 32, 4, 4),
    TileConfig(64, 128, 32, 4, 4),
    TileConfig(64, 64, 32, 5, 2),
]
# The persistent TMA kernel's candidates (only where TMA exists: compute capability 9.0+).
TMA_CONFIGS = [
    TileConfig(128, 256, 64, 3, 8, persistent=True, epilogue_split=True),
    TileConfig(128, 256, 64, 4, 8, persistent=True, epilogue_split=True),
    TileConfig(128, 256, 64, 3, 8, persistent=True),
    TileConfig(128, 128, 64, 4, 8, persistent=True),
    TileConfig(128, 128, 64, 3, 4, persistent=True),
    TileConfig(128, 128, 128, 3, 8, persistent=True),
    TileConfig(256, 128, 64, 3, 8, persistent=True),
    TileConfig(128, 256, 64, 3, 8, persistent=True, epilogue_split=True, warp_specialize=True),
    TileConfig(128, 128, 64, 4, 4, persistent=True, warp_specialize=True),
]
INTERPRETER_CONFIG = TileConfig(32, 32, 32, 1, 1)  # the interpreter is slow: small tiles, no tuning


def tma_possible(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Can the TMA kernel take these operands? Row-major, 16-byte aligned rows and bases, and
    a GPU of compute capability 9.0 or newer (or the CPU interpreter, which emulates TMA)."""
    if not tma_supported(a):
        return False
    item = a.element_size()
    return all(
        t.stride(1) == 1 and (t.stride(0) * item) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, b)
    ) and (b.shape[1] * item) % 16 == 0


def _num_sms(device: torch.device) -> int:
    """SMs of a CUDA device (read once per GPU: kernel launches ask); elsewhere (the interpreter) 4."""
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
_tuned: dict[tuple, TileConfig] = {}  # (M, N, K, dtype, layouts, device) -> the fastest config
autotune_log: dict[tuple, list[tuple[TileConfig, float | None]]] = {}  # every timing, for the curious


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"matmul expects 2-D matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} (need a.shape[1] == b.shape[0])"
        )
    if a.dtype != b.dtype or a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtypes must match and be one of {SUPPORTED_DTYPES}, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device}, b on {b.device}: put both on one device")


def launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """Run the kernel once with ``cfg``, writing A @ B into ``c``."""
    triton, kernel, tma_kernel = _kernels()
    M, K = a.shape
    N = b.shape[1]
    upcast = interpreting() and not a.is_cuda
    if cfg.persistent:
        if not tma_possible(a, b):
            raise ValueError("the persistent TMA kernel needs row-major, 16-byte aligned operands on sm_90+")
        from triton.tools.tensor_descriptor import TensorDescriptor

        num_sms = _num_sms(a.device)
        n_half = cfg.block_n // 2 if cfg.epilogue_split else cfg.block_n
        grid = (min(num_sms, triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)),)  # one program per SM
        tma_kernel[grid](
            TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(b, [cfg.block_k, cfg.block_n]),
            TensorDescriptor.from_tensor(c, [cfg.block_m, n_half]),
            M, N, K, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            NUM_SMS=num_sms, UPCAST=upcast, EPILOGUE_SPLIT=cfg.epilogue_split,
            WARP_SPECIALIZE=cfg.warp_specialize, num_stages=cfg.num_stages, num_warps=cfg.num_warps,
        )  # fmt: skip
        return c
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)  # one program per tile of C
    kernel[grid](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        UPCAST=upcast, EVEN_K=K % cfg.block_k == 0,
        num_stages=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return c


def autotune(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, configs=None) -> TileConfig:
    """Time every candidate on these operands (median of repeats) and remember the fastest.

    Autotuning is nothing more than measuring: each config is a different program, and the
    only way to know which one this GPU runs fastest for this shape is to run them.
    """
    # whether TMA can feed these operands is part of the key: a misaligned view of a tuned shape must not be given
    # the persistent TMA config its aligned twin won
    key = (a.shape[0], b.shape[1], a.shape[1], a.dtype, a.stride(1) == 1, b.stride(1) == 1, a.device,
           tma_possible(a, b))  # fmt: skip
    if key not in _tuned:
        if configs is None:
            configs = CONFIGS + (TMA_CONFIGS if tma_possible(a, b) else [])
        _tuned[key], autotune_log[key] = fastest(configs, lambda cfg: launch(a, b, c, cfg), a.device)
    return _tuned[key]


def matmul_triton(a: torch.Tensor, b: torch.Tensor, config: TileConfig | None = None) -> torch.Tensor:
    """Launch the Triton kernel: with ``config``, or the autotuned best for this shape."""
    _check(a, b)
    c = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)
    if config is None:
        config = INTERPRETER_CONFIG if interpreting() and not a.is_cuda else autotune(a, b, c)
    return launch(a, b, c, config)


def matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The oracle and the CPU path: multiply in fp32, round the result to the input dtype."""
    _check(a, b)
    return (a.float() @ b.float()).to(a.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """C = A @ B for fp16/bf16 matrices (M, K) @ (K, N), accumulating in fp32.

    Runs the Triton kernel on CUDA (or under TRITON_INTERPRET=1), the PyTorch reference
    elsewhere; ``backend`` forces one ("triton", "reference").
    """
    _check(a, b)
    if choose_backend(backend, a, b) == "triton":
        return matmul_triton(a, b)
    return matmul_reference(a, b)


def tflops(m: int, n: int, k: int, seconds: float) -> float:
    return 2 * m * n * k / seconds / 1e12


def _register():
    from ..bench import compare, device_label, register_suite
    from ..device import get_device

    @register_suite("kernels")
    def kernels_suite(quick: bool = False) -> list[dict]:
        """Triton matmul vs cuBLAS (torch.matmul), bf16, square sizes; on CPU the reference path."""
        device = get_device()
        on_gpu = device.type == "cuda"
        sizes = ([1024, 2048] if quick else [1024, 2048, 4096, 8192]) if on_gpu else [256, 512]
        dtype = torch.bfloat16
        rows = []
        for n in sizes:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
            b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
            variants = {"torch.matmul": lambda: torch.matmul(a, b), "labkit.kernels.matmul": lambda: matmul(a, b)}
            print(f"{n}x{n}x{n} {dtype} on {device_label(device)}" + ("" if on_gpu else " (reference path)"))
            for row in compare(variants, warmup=3, repeat=10 if on_gpu else 3, suite="kernels"):
                row["name"] = f"{row['variant']} {n}^3 bf16"
                row["tflops"] = tflops(n, n, n, row["variant_s"])
                rows.append(row)
        return rows


_register()
