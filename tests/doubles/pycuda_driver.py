"""A small, faithful double of exactly the ``pycuda.driver`` calls the TensorRT engine makes.

Mirrors the pycuda reference (doc/source/driver.rst, inducer/pycuda): ``init``,
``Device(n).compute_capability() -> (major, minor)``, ``Device.name()``,
``Device.retain_primary_context()``, ``Context.push()/pop()/detach()``,
``mem_alloc(bytes) -> DeviceAllocation`` (castable to ``int``, ``free()``),
``pagelocked_empty(shape, dtype, order="C", mem_flags=0) -> numpy.ndarray`` whose ``.base`` is a
``PagelockedHostAllocation`` (``free()``, ``get_flags()``, ``get_device_pointer()``),
``host_alloc_flags.{PORTABLE,DEVICEMAP,WRITECOMBINED}``, ``Stream(flags=0)`` with ``.handle`` (an
``int``), ``synchronize()``, ``is_done()``, ``Event(flags=0)`` with ``record(stream=None) ->
self``, ``synchronize() -> self``, ``query() -> bool``, ``memcpy_htod_async(dest, src,
stream=None)``, ``memcpy_dtoh_async(dest, src, stream=None)``, the synchronous ``memcpy_htod``
and ``memcpy_dtoh``, and the error classes ``Error``, ``LogicError``, ``MemoryError``,
``RuntimeError``.

Device memory is host RAM behind fake 256-byte aligned addresses. Work queued on a stream runs
only when the host waits for it (``Stream.synchronize``, ``Event.synchronize``/``query``, or a
synchronous copy, which like the legacy default stream waits for every stream): code that reads a
result before waiting reads stale memory, as it would on a GPU. Every call that needs a current
CUDA context checks that the calling thread pushed one (real CUDA fails with "invalid device
context"). ``make_driver()`` returns a fresh module; ``module.state`` (not part of pycuda) lets
tests inspect the call log and the live allocations.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DriverState", "make_driver"]


class Error(Exception):
    """pycuda.driver.Error."""


class LogicError(Error):
    """pycuda.driver.LogicError: a programming mistake (bad argument, no context)."""


class MemoryError(Error):  # pycuda's own name
    """pycuda.driver.MemoryError: an allocation failed."""


class RuntimeError(Error):  # pycuda's own name
    """pycuda.driver.RuntimeError."""


class host_alloc_flags:  # noqa: N801 - pycuda's own name
    PORTABLE = 1
    DEVICEMAP = 2
    WRITECOMBINED = 4


@dataclass
class DriverState:
    """What a test can inspect: the call log, live/freed memory, contexts."""

    compute_capability: tuple[int, int] = (8, 7)
    name: str = "Orin (double)"
    initialized: bool = False
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    memory: dict[int, np.ndarray] = field(default_factory=dict)
    device_allocations: dict[int, int] = field(default_factory=dict)
    freed_device: list[int] = field(default_factory=list)
    host_allocations: list[Any] = field(default_factory=list)
    streams: dict[int, Any] = field(default_factory=dict)
    retained: int = 0
    detached: int = 0
    next_address: int = 0x7F00_0000_0000
    next_handle: int = 0x5000
    local: threading.local = field(default_factory=threading.local)

    def stack(self) -> list[Any]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        stack: list[Any] = self.local.stack
        return stack

    def require_context(self, what: str) -> None:
        if not self.initialized:
            msg = f"{what} failed: initialization error (cuInit was not called)"
            raise LogicError(msg)
        if not self.stack():
            msg = f"{what} failed: invalid device context"
            raise LogicError(msg)

    def new_address(self, nbytes: int) -> int:
        address = self.next_address
        self.next_address += max(256, (nbytes + 255) // 256 * 256)
        return address

    def resolve(self, address: int, nbytes: int) -> np.ndarray:
        """The bytes [address, address + nbytes) of device (or mapped) memory."""
        for base, buffer in self.memory.items():
            if base <= address and address + nbytes <= base + buffer.nbytes:
                return buffer[address - base : address - base + nbytes]
        msg = f"invalid argument: {nbytes} bytes at {address:#x} are not in an allocation"
        raise LogicError(msg)

    def flush(self) -> None:
        """Run everything queued on every stream (what the legacy default stream waits for)."""
        for stream in list(self.streams.values()):
            stream.run_until(stream.enqueued)

    def live_device_bytes(self) -> int:
        return sum(self.device_allocations.values())

    def live_host_allocations(self) -> list[Any]:
        return [alloc for alloc in self.host_allocations if not alloc.freed]


def _as_address(pointer: Any) -> int:
    return int(pointer)


def _host_bytes(array: Any) -> np.ndarray:
    host = np.asarray(array)
    if not host.flags.c_contiguous:
        msg = "invalid argument: host buffer is not contiguous"
        raise LogicError(msg)
    return host.reshape(-1).view(np.uint8)


def make_driver(
    compute_capability: tuple[int, int] = (8, 7), name: str = "Orin (double)"
) -> types.ModuleType:
    """A fresh ``pycuda.driver`` double with its own device memory and call log."""
    state = DriverState(compute_capability=compute_capability, name=name)

    def init(flags: int = 0) -> None:
        state.initialized = True

    class Context:
        def push(self) -> None:
            state.stack().append(self)

        @staticmethod
        def pop() -> None:
            stack = state.stack()
            if not stack:
                msg = "cuCtxPopCurrent failed: invalid device context"
                raise LogicError(msg)
            stack.pop()

        def detach(self) -> None:
            state.detached += 1

        @staticmethod
        def synchronize() -> None:
            state.require_context("cuCtxSynchronize")
            state.flush()

    class Device:
        def __init__(self, number: int) -> None:
            if not state.initialized:
                msg = "cuDeviceGet failed: initialization error"
                raise LogicError(msg)
            if number != 0:
                msg = f"cuDeviceGet failed: invalid device ordinal {number}"
                raise LogicError(msg)
            self.number = number

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return state.name

        def compute_capability(self) -> tuple[int, int]:
            return state.compute_capability

        def retain_primary_context(self) -> Context:
            state.retained += 1
            return Context()

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            self.address = state.new_address(nbytes)
            self.nbytes = nbytes
            self.freed = False
            state.memory[self.address] = np.zeros(nbytes, dtype=np.uint8)
            state.device_allocations[self.address] = nbytes

        def __int__(self) -> int:
            return self.address

        def __index__(self) -> int:
            return self.address

        def free(self) -> None:
            if self.freed:
                return
            state.require_context("cuMemFree")
            self.freed = True
            state.memory.pop(self.address, None)
            state.device_allocations.pop(self.address, None)
            state.freed_device.append(self.address)

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        state.require_context("cuMemAlloc")
        state.calls.append(("mem_alloc", int(nbytes)))
        return DeviceAllocation(int(nbytes))

    class PagelockedHostAllocation:
        def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any], flags: int) -> None:
            self.shape = shape
            self.dtype = dtype
            self.flags = flags
            self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self.backing = np.zeros(max(self.nbytes, 1), dtype=np.uint8)
            self.freed = False
            self.mapped_address: int | None = None
            if flags & host_alloc_flags.DEVICEMAP:
                self.mapped_address = state.new_address(self.nbytes)
                state.memory[self.mapped_address] = self.backing

        @property
        def __array_interface__(self) -> dict[str, Any]:
            return {
                "shape": self.shape,
                "typestr": self.dtype.str,
                "data": (self.backing.ctypes.data, False),
                "version": 3,
            }

        def get_flags(self) -> int:
            return self.flags

        def get_device_pointer(self) -> int:
            if self.mapped_address is None:
                msg = "cuMemHostGetDevicePointer failed: invalid value (not DEVICEMAP memory)"
                raise LogicError(msg)
            return self.mapped_address

        def free(self) -> None:
            if self.freed:
                return
            self.freed = True
            if self.mapped_address is not None:
                state.memory.pop(self.mapped_address, None)

        def contains(self, pointer: int, nbytes: int) -> bool:
            start = self.backing.ctypes.data
            return start <= pointer and pointer + nbytes <= start + self.backing.nbytes

    def pagelocked_empty(
        shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0
    ) -> np.ndarray:
        state.require_context("cuMemHostAlloc")
        if order != "C":
            msg = "this double supports order='C' only"
            raise LogicError(msg)
        dims = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
        allocation = PagelockedHostAllocation(dims, np.dtype(dtype), int(mem_flags))
        state.host_allocations.append(allocation)
        state.calls.append(("pagelocked_empty", dims, np.dtype(dtype).str, int(mem_flags)))
        return np.asarray(allocation)

    def _pagelocked(host: np.ndarray) -> bool:
        pointer = host.ctypes.data
        return any(
            not alloc.freed and alloc.contains(pointer, host.nbytes)
            for alloc in state.host_allocations
        )

    class Stream:
        def __init__(self, flags: int = 0) -> None:
            state.require_context("cuStreamCreate")
            self.handle = state.next_handle
            state.next_handle += 16
            self.ops: list[Callable[[], None]] = []
            self.enqueued = 0
            self.executed = 0
            state.streams[self.handle] = self

        def enqueue(self, op: Callable[[], None]) -> int:
            self.ops.append(op)
            self.enqueued += 1
            return self.enqueued

        def run_until(self, position: int) -> None:
            while self.executed < position:
                self.ops.pop(0)()
                self.executed += 1

        def synchronize(self) -> None:
            state.require_context("cuStreamSynchronize")
            state.calls.append(("stream.synchronize", self.handle))
            self.run_until(self.enqueued)

        def is_done(self) -> bool:
            return self.executed == self.enqueued

    class Event:
        def __init__(self, flags: int = 0) -> None:
            state.require_context("cuEventCreate")
            self.stream: Stream | None = None
            self.position = 0

        def record(self, stream: Stream | None = None) -> Event:
            state.require_context("cuEventRecord")
            if stream is None:
                state.flush()
            else:
                self.position = stream.enqueued
            self.stream = stream
            state.calls.append(("event.record", stream.handle if stream else 0, id(self)))
            return self

        def synchronize(self) -> Event:
            state.require_context("cuEventSynchronize")
            state.calls.append(("event.synchronize", id(self)))
            if self.stream is not None:
                self.stream.run_until(self.position)
            return self

        def query(self) -> bool:
            state.require_context("cuEventQuery")
            state.calls.append(("event.query", id(self)))
            if self.stream is not None:
                self.stream.run_until(self.position)
            return True

    def _enqueue_or_run(stream: Stream | None, op: Callable[[], None]) -> None:
        if stream is None:
            state.flush()
            op()
        else:
            stream.enqueue(op)

    def memcpy_htod_async(dest: Any, src: Any, stream: Stream | None = None) -> None:
        state.require_context("cuMemcpyHtoDAsync")
        host = _host_bytes(src)
        target = state.resolve(_as_address(dest), host.nbytes)
        state.calls.append(
            ("memcpy_htod_async", stream.handle if stream else 0, int(dest), host.nbytes,
             _pagelocked(np.asarray(src)))
        )  # fmt: skip

        def copy() -> None:
            target[...] = host

        _enqueue_or_run(stream, copy)

    def memcpy_dtoh_async(dest: Any, src: Any, stream: Stream | None = None) -> None:
        state.require_context("cuMemcpyDtoHAsync")
        host = _host_bytes(dest)
        source = state.resolve(_as_address(src), host.nbytes)
        state.calls.append(
            ("memcpy_dtoh_async", stream.handle if stream else 0, int(src), host.nbytes,
             _pagelocked(np.asarray(dest)))
        )  # fmt: skip

        def copy() -> None:
            host[...] = source

        _enqueue_or_run(stream, copy)

    def memcpy_htod(dest: Any, src: Any) -> None:
        state.require_context("cuMemcpyHtoD")
        host = _host_bytes(src)
        target = state.resolve(_as_address(dest), host.nbytes)
        state.calls.append(("memcpy_htod", 0, int(dest), host.nbytes, _pagelocked(host)))
        state.flush()
        target[...] = host

    def memcpy_dtoh(dest: Any, src: Any) -> None:
        state.require_context("cuMemcpyDtoH")
        host = _host_bytes(dest)
        source = state.resolve(_as_address(src), host.nbytes)
        state.calls.append(("memcpy_dtoh", 0, int(src), host.nbytes, _pagelocked(host)))
        state.flush()
        host[...] = source

    module = types.ModuleType("pycuda.driver", "pycuda.driver double (tests/doubles)")
    for name_, value in {
        "init": init,
        "Device": Device,
        "Context": Context,
        "DeviceAllocation": DeviceAllocation,
        "PagelockedHostAllocation": PagelockedHostAllocation,
        "mem_alloc": mem_alloc,
        "pagelocked_empty": pagelocked_empty,
        "host_alloc_flags": host_alloc_flags,
        "Stream": Stream,
        "Event": Event,
        "memcpy_htod_async": memcpy_htod_async,
        "memcpy_dtoh_async": memcpy_dtoh_async,
        "memcpy_htod": memcpy_htod,
        "memcpy_dtoh": memcpy_dtoh,
        "Error": Error,
        "LogicError": LogicError,
        "MemoryError": MemoryError,
        "RuntimeError": RuntimeError,
        "state": state,
    }.items():
        setattr(module, name_, value)
    return module
