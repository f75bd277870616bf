"""A chunked row arena whose rows never move, and the kernels' view of it.

Rows live in fixed-size chunks (`CHUNK_ROWS` rows of `width` float32 each). Adding a
chunk never moves an existing row, so a row handle taken by one thread stays valid
while another thread grows the table, and growth never needs twice the memory.

Kernels reach a row through a directory of chunk base addresses (an int64 array), so
one compiled kernel reads rows of any chunk of any shard at the speed of a flat array::

    directory[shard, chunk] ──► chunk base address
    row handle  = local_row << SHARD_BITS | shard
    local_row   = chunk << CHUNK_SHIFT | offset
    row address = directory[shard, chunk] + offset * width * 4

A chunk of 2 MiB or more is a fresh anonymous mapping, asking the kernel for huge
pages, whose rows start on a 2 MiB boundary: rows read at random then cost far fewer
TLB misses, and a new chunk faults in two pages instead of a thousand. The
mapping's slack around the aligned rows is never written, so it takes no memory (a
2 MiB-padded heap buffer could land on pages already written, and once held up to
twice the rows' memory for narrow tables). Smaller chunks, which no huge page fits,
come from the heap aligned to a cache line.

The `Arena` owns the chunk arrays; the directory only borrows their addresses, so an
arena must outlive every kernel call that reads it (the table holds it for good).
"""

from __future__ import annotations

import mmap
import platform
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["Arena", "CHUNK_ROWS", "CHUNK_SHIFT", "SHARD_BITS", "float_row", "prefetch", "prefetch_row", "row_in", "row_of",
           "store_fence", "stream"]

CHUNK_SHIFT = 14
CHUNK_ROWS = 1 << CHUNK_SHIFT  # 16384 rows: 4 MiB at dim 64 without optimizer state
SHARD_BITS = 6  # up to 64 shards per table


@intrinsic
def _float_pointer(typingctx, address):  # type: ignore[no-untyped-def]
    """Reinterpret an int64 address as a float32 pointer (inside compiled code only)."""
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

    return sig, codegen


@intrinsic
def _prefetch(typingctx, address):  # type: ignore[no-untyped-def]
    """Ask the CPU to start loading the cache line at an int64 address (llvm.prefetch)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32, pointer = ir.IntType(32), ir.IntType(8).as_pointer()
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer, i32, i32, i32]), "llvm.prefetch.p0")
        read, keep_in_all_levels, data = ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)
        builder.call(function, [builder.inttoptr(args[0], pointer), read, keep_in_all_levels, data])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _stream_line(typingctx, destination, source):  # type: ignore[no-untyped-def]
    """Copy 64 bytes from `source` to the 64-byte aligned `destination` with a
    non-temporal store (int64 addresses)."""
    sig = types.void(types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        line = ir.VectorType(ir.FloatType(), 16).as_pointer()
        values = builder.load(builder.inttoptr(args[1], line), align=4)
        store = builder.store(values, builder.inttoptr(args[0], line), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def store_fence(typingctx):  # type: ignore[no-untyped-def]
    """Order every earlier store, non-temporal ones included, before any later one:
    `sfence` on x86 (the fence its non-temporal stores need), a full fence elsewhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        if _X86:
            sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


_LINE = 64


@numba.njit(nogil=True, inline="always")
def prefetch(address: np.int64, size: np.int64) -> None:
    """Start loading the `size` bytes at `address` that a loop will read a little later:
    data spread over memory then arrives side by side instead of one piece after the
    other."""
    for offset in range(0, size, _LINE):
        _prefetch(address + offset)


@numba.njit(nogil=True, inline="always")
def stream(destination: np.int64, source: np.int64, size: np.int64) -> None:
    """Copy `size` bytes (a multiple of 64) to a 64-byte aligned `destination` with
    non-temporal stores: the lines go to memory without first being read into the
    cache, about half the traffic of plain stores to a buffer larger than the cache.
    End the kernel with `store_fence` before another thread reads the copy."""
    for offset in range(0, size, _LINE):
        _stream_line(destination + offset, source + offset)


@numba.njit(nogil=True, inline="always")
def prefetch_row(directory: np.ndarray, handle: np.int64, width: np.int64, columns: np.int64) -> None:
    """`prefetch` the first `columns` floats of a row; a handle of -1 is ignored."""
    if handle >= 0:
        prefetch(_row_address(directory, handle, width), columns * 4)


@numba.njit(nogil=True, inline="always")
def row_of(directory: np.ndarray, handle: np.int64, width: np.int64) -> np.ndarray:
    """The float32 row (values then optimizer state) of a row handle, as a view."""
    return float_row(_row_address(directory, handle, width), 0, width)


@numba.njit(nogil=True, inline="always")
def _row_address(directory: np.ndarray, handle: np.int64, width: np.int64) -> np.int64:
    shard = handle & ((1 << SHARD_BITS) - 1)
    local = handle >> SHARD_BITS
    return directory[shard, local >> CHUNK_SHIFT] + (local & (CHUNK_ROWS - 1)) * width * 4


@numba.njit(nogil=True, inline="always")
def row_in(directories: np.ndarray, table: np.int64, handle: np.int64, width: np.int64) -> np.ndarray:
    """`row_of` for table `table` of stacked directories `[T, shards, chunks]`."""
    shard = handle & ((1 << SHARD_BITS) - 1)
    local = handle >> SHARD_BITS
    return _row(directories[table, shard, local >> CHUNK_SHIFT], local, width)


@numba.njit(nogil=True, inline="always")
def _row(chunk_base: np.int64, local: np.int64, width: np.int64) -> np.ndarray:
    return float_row(chunk_base, local & (CHUNK_ROWS - 1), width)


@numba.njit(nogil=True, inline="always")
def float_row(base: np.int64, index: np.int64, width: np.int64) -> np.ndarray:
    """Row `index` of a C-contiguous float32 `[*, width]` buffer at address `base`.

    A view without a memory owner: no reference counting in hot loops, and loops over
    two such rows vectorize. The caller keeps the buffer alive.
    """
    return numba.carray(_float_pointer(base + index * width * 4), (width,))


class Arena:
    """The chunks of every shard of one table, plus their address directory.

    `directory` is `[num_shards, max_chunks]` int64; it is replaced (never written in
    place for an existing entry) when it must grow, so a kernel holding the old one
    still reads valid addresses.
    """

    def __init__(self, num_shards: int, width: int) -> None:
        self.width = width
        self.chunks: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        self.directory = np.zeros((num_shards, 4), dtype=np.int64)
        self._lock = threading.Lock()  # shards grow the shared directory one at a time

    def rows_capacity(self, shard: int) -> int:
        return len(self.chunks[shard]) * CHUNK_ROWS

    def add_chunk(self, shard: int, *, touch_rows: int = 0) -> None:
        """Give `shard` one more chunk of rows (contents undefined until written).

        The pages of its first `touch_rows` rows are written now: rows created there
        later then cost no page fault, which is the dearest part of creating a row where
        the kernel (or a hypervisor under it) must find and zero a fresh page. The
        others take memory only once rows are created in them.
        """
        chunk = _aligned_empty(CHUNK_ROWS * self.width).reshape(CHUNK_ROWS, self.width)
        chunk[:touch_rows].fill(0.0)
        with self._lock:
            self._publish(shard, chunk)

    def _publish(self, shard: int, chunk: np.ndarray) -> None:
        index = len(self.chunks[shard])
        if index == self.directory.shape[1]:
            grown = np.zeros((self.directory.shape[0], 2 * index), dtype=np.int64)
            grown[:, :index] = self.directory
            self.directory = grown
        self.chunks[shard].append(chunk)
        self.directory[shard, index] = chunk.ctypes.data

    def allocated_bytes(self) -> int:
        return sum(len(c) for c in self.chunks) * CHUNK_ROWS * self.width * 4


_HUGE_PAGE = 2 << 20
_LINE = 64


def _aligned_empty(count: int) -> np.ndarray:
    """An uninitialized float32 array of `count` values: on a 2 MiB boundary of a fresh
    mapping that asks for huge pages when it is that large (see the module docstring),
    else on a cache-line boundary."""
    size = count * 4
    mapping = _huge_page_mapping(size + _HUGE_PAGE) if size >= _HUGE_PAGE else None
    if mapping is None:
        raw = np.empty(size + _LINE, dtype=np.uint8)
        start = -raw.ctypes.data % _LINE
    else:
        raw = np.frombuffer(mapping, dtype=np.uint8)  # keeps the mapping alive
        start = -raw.ctypes.data % _HUGE_PAGE
    return raw[start : start + size].view(np.float32)


def _huge_page_mapping(size: int) -> mmap.mmap | None:
    """A fresh private anonymous mapping of `size` bytes asking for huge pages, or None
    where there is none to be had (no such mappings here, or the process's limit of
    mappings reached). The advice covers it whole: the kernel then merges neighbouring
    chunks' mappings into one, where advice on a part would split each in three and a
    large table would run out of mappings (Linux allows 65,530 by default)."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):
        return None
    try:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return None
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping
