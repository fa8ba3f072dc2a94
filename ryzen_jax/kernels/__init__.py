"""Our own CPU kernels for the decode step, and when to use them.

A decode step multiplies a few rows of activations (the batch) by every weight of the
model and reads every row's KV cache; on a CPU both are reads of memory, and XLA:CPU's
kernels for these shapes read slower than the machine can (README, Benchmarks). So
while tracing for a one-device CPU mesh (``for_mesh``), in float32 or bfloat16:

* ``linear`` computes ``x · wᵀ`` with at most ``MAX_ROWS`` rows of ``x`` by
  ``skinny_matmul.cc``, which reads each weight row once, front to back (from two
  rows of ``x`` up in 512-bit registers where the CPU has AVX-512, and in bfloat16 by
  AVX512_BF16's dot-product instruction where it has that; a bfloat16 weight is half
  the bytes to read);
* ``decode_attention`` (one query per row, no score bias) by ``decode_attention.cc``,
  which reads only the cache positions each row holds;
* ``write_cache`` and ``put_row`` (a step's keys and values, or a prefilled request's
  whole row, into a bfloat16 KV cache) by ``write_cache.cc``, in place;
* ``greedy`` (each row's argmax of the logits) by ``greedy.cc``, in one pass;
* ``take_rows`` (a bfloat16 embedding lookup) by ``take_rows.cc``, rows copied as they lie.

All are XLA FFI custom calls, the first three split over the process's cores
(``parallel.h``). Everything else (a prefill's products and attention, GPUs,
tensor-parallel meshes, whose partitioner must see a dot to split it) stays on XLA's
own operations.

The kernels are compiled at first use with the system's C++ compiler (``$CXX``, else
``g++``; one compiler process per source, side by side) into
``$RYZEN_JAX_KERNEL_DIR`` (default ``$RYZEN_JAX_CACHE/kernels``,
``~/.cache/ryzen_jax/kernels``) and registered with XLA. Where they cannot be (no compiler, a CPU without AVX2 and FMA) a
warning says why and XLA's operations are used; ``RYZEN_JAX_CPU_KERNELS=0`` turns them
off.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from ryzen_jax.runtime import cache_root

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("skinny_matmul.cc", "decode_attention.cc", "greedy.cc",
                                                              "take_rows.cc", "write_cache.cc"))
HEADERS = (Path(__file__).with_name("parallel.h"),)
TARGET = "ryzen_jax_skinny_matmul"
BF16_TARGET = "ryzen_jax_skinny_matmul_bf16"
ATTENTION_TARGET = "ryzen_jax_decode_attention"
GREEDY_TARGET = "ryzen_jax_greedy"
TAKE_ROWS_TARGET = "ryzen_jax_take_rows"
WRITE_CACHE_TARGET = "ryzen_jax_write_cache"
PUT_ROW_TARGET = "ryzen_jax_put_row"
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-pthread", "-fPIC", "-w")  # each source's; the link adds -shared
ENV_SWITCH = "RYZEN_JAX_CPU_KERNELS"
#: where the built library goes, if not ``$RYZEN_JAX_CACHE/kernels``: one directory that
#: many caches share (a cluster's jobs, a test session's) builds once
ENV_DIR = "RYZEN_JAX_KERNEL_DIR"

_active: contextvars.ContextVar[bool] = contextvars.ContextVar("ryzen_jax_cpu_kernels", default=False)


class KernelUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here; the message says why."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: the matmul kernel's loops for two rows of x or more, by its ``loop`` attribute: 256-bit
#: registers, 512-bit ones, and (bfloat16 only) AVX512_BF16's dot-product instruction
LOOPS = {"avx2": 0, "avx512": 1, "avx512_bf16": 2}


@functools.cache
def loops() -> tuple[str, ...]:
    """The matmul kernel's loops this CPU runs, the fastest last."""
    flags = _cpu_flags()
    have = {"avx2": True, "avx512": "avx512f" in flags, "avx512_bf16": {"avx512f", "avx512_bf16"} <= flags}
    return tuple(name for name in LOOPS if have[name])


#: rows of x up to which the kernel beats XLA:CPU's dot (the benchmark's small shape, its
#: matmuls alone): on AVX2, 1.3x at batch 1, 1.6-1.9x at batch 2-8, level at 16; with
#: AVX-512, 2x at batch 8, 1.3x at 16, 0.6x at 32
MAX_ROWS = 16 if "avx512" in loops() else 8


def kernel_dir() -> Path:
    """Where the built library is kept: ``$RYZEN_JAX_KERNEL_DIR``, else ``$RYZEN_JAX_CACHE/kernels``."""
    return Path(os.environ.get(ENV_DIR) or os.path.join(cache_root(), "kernels"))


def build() -> Path:
    """The compiled library, built once per source, jaxlib and flags; written to a
    temporary name and renamed, so concurrent processes never load half a file. Each
    source compiles in its own compiler process, all at once (most of each one's time is
    XLA's FFI headers; side by side they take the longest one's time, not the sum), and
    one more links them."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= _cpu_flags():
        raise KernelUnavailable("this CPU lacks AVX2 and FMA (x86-64 only)")
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise KernelUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'g++')!r} not on PATH); "
                                "install g++ or set CXX")
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    tag = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = kernel_dir() / f"ryzen_jax_cpu-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as work:
        objects = [os.path.join(work, src.stem + ".o") for src in SOURCES]
        log.info("building the CPU kernels (%d sources at once): %s %s -I%s -c", len(SOURCES), cxx,
                 " ".join(FLAGS), jax.ffi.include_dir())
        _run_all([[cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(src), "-o", obj]
                  for src, obj in zip(SOURCES, objects)], cxx)
        tmp = os.path.join(work, out.name)
        _run_all([[cxx, "-shared", "-pthread", *objects, "-o", tmp]], cxx)
        os.replace(tmp, out)
    return out


def _run_all(commands: list[list[str]], cxx: str) -> None:
    """Run ``commands`` side by side; KernelUnavailable with the compiler's words if one fails."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    failed = None
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            err = f"timed out after 300 s; {err}"
        if p.returncode != 0 and failed is None:
            failed = f"exit status {p.returncode}: {err.strip()[-2000:]}"
    if failed is not None:
        raise KernelUnavailable(f"{cxx} failed to compile the kernels ({failed})")


@functools.cache
def load() -> bool:
    """Whether the decode step may use the kernels: not switched off (``ENV_SWITCH``)
    and :func:`register` succeeds; False (said once) otherwise, and the callers use
    XLA's operations."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("%s=0: the decode step uses XLA's operations, not our CPU kernels", ENV_SWITCH)
        return False
    return register()


@functools.cache
def register() -> bool:
    """Build and register the kernels once per process, whatever ``ENV_SWITCH`` says (the
    benchmark's bandwidth probe uses them either way); False, warned once, where they
    cannot be."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.RyzenSkinnyMatmul), platform="cpu")
        jax.ffi.register_ffi_target(BF16_TARGET, jax.ffi.pycapsule(lib.RyzenSkinnyMatmulBf16), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.RyzenDecodeAttention), platform="cpu")
        jax.ffi.register_ffi_target(GREEDY_TARGET, jax.ffi.pycapsule(lib.RyzenGreedy), platform="cpu")
        jax.ffi.register_ffi_target(TAKE_ROWS_TARGET, jax.ffi.pycapsule(lib.RyzenTakeRows), platform="cpu")
        jax.ffi.register_ffi_target(WRITE_CACHE_TARGET, jax.ffi.pycapsule(lib.RyzenWriteCache), platform="cpu")
        jax.ffi.register_ffi_target(PUT_ROW_TARGET, jax.ffi.pycapsule(lib.RyzenPutRow), platform="cpu")
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
        log.warning("the CPU kernels are unavailable (%s); using XLA's operations, which are slower at decode "
                    "(set %s=0 to silence this)", e, ENV_SWITCH)
        return False
    return True


def widens_bfloat16(platform: str, devices: int) -> bool:
    """Whether a bfloat16 model on a mesh of ``devices`` on ``platform`` runs its products
    on XLA:CPU's dot, which widens each bfloat16 weight to a float32 copy; a decode loop
    hoists those copies, so they stay held beside the weights (twice the weights' bytes:
    the "1B" shape at tp 4 held 1,133 MB of temporaries per device beside 550 MB of
    weights, its step 10x tp 1's). Our kernels, which read bfloat16 as it lies, serve one
    CPU device only (``usable_on``)."""
    return platform == "cpu" and (devices > 1 or not load())


def usable_on(mesh) -> bool:
    """One CPU device, and the kernels build here: XLA's partitioner cannot split a
    custom call across devices, so a larger mesh keeps XLA's operations."""
    devices = mesh.devices.flat
    return mesh.devices.size == 1 and devices[0].platform == "cpu" and load()


@contextlib.contextmanager
def for_mesh(mesh) -> Iterator[None]:
    """Trace programs for ``mesh`` inside this: ``linear`` and ``decode_attention`` then
    use the kernels where they serve."""
    token = _active.set(usable_on(mesh))
    try:
        yield
    finally:
        _active.reset(token)


def active() -> bool:
    """Whether the program being traced may use the kernels (see ``for_mesh``)."""
    return _active.get()


#: what the kernels compute in (and the dtypes of the KV cache the attention reads)
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def skinny_matmul(x: jax.Array, w: jax.Array, *, loop: str | None = None) -> jax.Array:
    """``x · wᵀ`` for x (m, in) and w (out, in), both float32 or both bfloat16 (float32
    sums, the result in their dtype), by the kernel (``load`` first). ``loop``: one of
    ``LOOPS`` for two rows of x or more (default: the fastest of ``loops()``; a loop the
    CPU lacks, or ``avx512_bf16`` for float32, runs as the one below it). One row, a
    read of memory, is always the AVX2 loop but for ``avx512_bf16``, which reads bfloat16
    faster."""
    loop = loops()[-1] if loop is None else loop
    if loop not in LOOPS:
        raise ValueError(f"loop {loop!r}: expected one of {sorted(LOOPS)}")
    target = TARGET if x.dtype == jnp.float32 else BF16_TARGET
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), x.dtype))(
        x, w, loop=np.int64(LOOPS[loop]))


def dot_precision(*operands: jax.Array) -> jax.lax.Precision | None:
    """The precision to ask of XLA's dot for these operands: ``HIGHEST`` when any is
    float32, since XLA's default on NVIDIA GPUs from Ampere on (A100, H100, H200) is
    TensorFloat-32, ten mantissa bits, and a float32 model must compute in float32 to
    give its float32 reference's tokens (PyTorch keeps float32 matmuls float32 by
    default); ``None`` (the default) for 16-bit operands. XLA:CPU computes float32 in
    float32 either way."""
    return jax.lax.Precision.HIGHEST if any(o.dtype == jnp.float32 for o in operands) else None


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x · wᵀ`` over x's last axis, for w stored (out, in): the kernel when tracing
    for a mesh it serves, x has at most ``MAX_ROWS`` rows and both are float32 or both
    bfloat16; else XLA's dot."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    if active() and 0 < rows <= MAX_ROWS and x.dtype == w.dtype and x.dtype in KERNEL_DTYPES and w.ndim == 2:
        return skinny_matmul(x.reshape(rows, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
    if active() and x.dtype == w.dtype == jnp.bfloat16:
        # XLA:CPU's bfloat16 dot is 2-5x faster asked for float32 sums (a prefill's products)
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum("...i,oi->...o", x, w, precision=dot_precision(x, w))


def decode_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, own_k: jax.Array, own_v: jax.Array,
                     positions: jax.Array, scale: float, window: int | None) -> jax.Array | None:
    """One decode step's attention by the kernel, or None where it does not serve (not
    tracing for a mesh it serves, a cache or queries neither float32 nor bfloat16, keys
    and values of different dtypes, a head size not a multiple of 8). Bfloat16 queries and
    own keys and values are widened to float32 and the result rounded back.

    q (B, 1, H, D); the cache (B, KV, S, D) before this step's write; the step's own key
    and value (B, KV, 1, D); ``positions`` (B,): each row's query position, so it sees
    cache positions below it (and above ``positions - window`` with a sliding window).
    Returns (B, 1, H, D), as ``ryzen_jax.layers.attention`` would."""
    b, t, h, d = q.shape
    kv = cache_k.shape[1]
    if (not active() or t != 1 or d % 8 or h % kv or cache_k.dtype not in KERNEL_DTYPES or cache_v.dtype != cache_k.dtype
            or q.dtype not in KERNEL_DTYPES or any(a.dtype != q.dtype for a in (own_k, own_v))):
        return None
    dtype = q.dtype
    q, own_k, own_v = (a.astype(jnp.float32) for a in (q, own_k, own_v))
    out = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct((b, kv, h // kv, d), jnp.float32))(
        q.reshape(b, kv, h // kv, d), cache_k, cache_v, own_k, own_v, positions.astype(jnp.int32),
        scale=np.float32(scale), window=np.int64(window or 0))
    return out.reshape(b, 1, h, d).astype(dtype)


def greedy(logits: jax.Array) -> jax.Array | None:
    """Each row's index of its largest logit (the first on ties, the first NaN if any),
    by the kernel, for float32 logits (rows, vocab); None where it does not serve."""
    if not active() or logits.ndim != 2 or logits.dtype != jnp.float32 or logits.shape[1] == 0:
        return None
    return jax.ffi.ffi_call(GREEDY_TARGET, jax.ShapeDtypeStruct(logits.shape[:1], jnp.int32))(logits)


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array | None:
    """``table[ids]`` for a bfloat16 table (rows, dim) and integer ids of any shape, by
    the kernel (a negative id counted from the end, one outside the table a row of NaN, as
    ``jnp.take``); None where it does not serve."""
    if not active() or table.ndim != 2 or table.dtype != jnp.bfloat16:
        return None
    flat = ids.reshape(-1).astype(jnp.int32)
    out = jax.ffi.ffi_call(TAKE_ROWS_TARGET, jax.ShapeDtypeStruct((flat.shape[0], table.shape[1]), table.dtype))(
        table, flat)
    return out.reshape(*ids.shape, table.shape[1])


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array | None:
    """``new`` (B, KV, T, D) written into ``cache`` (B, KV, S, D) at per-row offsets
    ``start`` (B,), in place, by the kernel, for a bfloat16 cache (XLA:CPU's own write
    converts the whole cache to float32 and back); None where it does not serve."""
    if not active() or cache.ndim != 4 or cache.dtype != jnp.bfloat16 or new.shape[2] > cache.shape[2]:
        return None
    return jax.ffi.ffi_call(WRITE_CACHE_TARGET, jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                            input_output_aliases={0: 0})(cache, new.astype(cache.dtype), start.astype(jnp.int32))


def put_row(big: jax.Array, small: jax.Array, row: jax.Array) -> jax.Array | None:
    """Row 0 of ``small`` (N, ...) written into row ``row`` of ``big`` (B, ...), the same
    trailing shape, in place, by the kernel, for a bfloat16 ``big`` (XLA:CPU's own write
    converts all of it to float32 and back); None where it does not serve."""
    if not active() or big.ndim < 1 or big.dtype != jnp.bfloat16 or small.shape[1:] != big.shape[1:] or not small.shape[0]:
        return None
    return jax.ffi.ffi_call(PUT_ROW_TARGET, jax.ShapeDtypeStruct(big.shape, big.dtype), input_output_aliases={0: 0})(
        big, small.astype(big.dtype), jnp.reshape(row, (1,)).astype(jnp.int32))
