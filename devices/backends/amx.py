"""Keep XNNPACK off Intel AMX in this process (the LiteRT backend's ``xnnpack_amx: false``).

On Xeons with AMX (``amx_int8``), XNNPACK runs int8 convolutions with its AMX kernels, which
compute 16x64 output tiles. For narrow CNNs that is a loss: a cnn_xs (8-16-32 channels) INT8
.tflite took 93 us per image with them and 23 us with the AVX-512 VNNI kernels that XNNPACK
uses on CPUs without AMX; a cnn_l (32-64-128) gained from them (106 vs 146 us). XNNPACK has no
switch for it: it asks Linux for AMX once (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, through its own
``syscall`` instruction) and uses the VNNI kernels when that fails. So the only way is to make
that request fail: a seccomp filter that answers EPERM to that one call and allows every other.

Side effects, which is why it is opt-in: the filter is process-wide and permanent, it is
inherited by child processes, and it sets ``no_new_privs`` (children cannot gain privileges
through setuid programs such as ``sudo``). Other libraries of the process that ask for AMX
afterwards (oneDNN in PyTorch or OpenVINO) fall back to AVX-512 too. It must be installed
before the first LiteRT model is loaded: XNNPACK reads the CPU's features once per process.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
from functools import cache
from pathlib import Path

_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_EPERM = 1

_denied = False


@cache
def cpu_has_amx() -> bool:
    """Whether this is Linux on x86-64 with AMX int8 (the only case the filter changes)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return "amx_int8" in line.split()


def amx_denied() -> bool:
    """Whether :func:`deny_amx` installed its filter in this process."""
    return _denied


def _filter() -> bytes:
    """The classic BPF program: arch_prctl(ARCH_REQ_XCOMP_PERM, ...) -> EPERM, else allow."""
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, errno = 0x7FFF0000, 0x00050000 | _EPERM

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    return b"".join([
        op(ld, 4),                                  # seccomp_data.arch
        op(jeq, _AUDIT_ARCH_X86_64, 0, 5),          # another ABI: allow
        op(ld, 0),                                  # seccomp_data.nr
        op(jeq, _SYS_ARCH_PRCTL, 0, 3),
        op(ld, 16),                                 # args[0], low 32 bits
        op(jeq, _ARCH_REQ_XCOMP_PERM, 0, 1),
        op(ret, errno),
        op(ret, allow),
    ])


def deny_amx() -> bool:
    """Make this process's requests for AMX fail from now on; True if the filter is in place.

    A no-op (False) where the CPU has no AMX. Raises OSError when the kernel refuses the filter.
    """
    global _denied
    if _denied or not cpu_has_amx():
        return _denied
    prog = _filter()

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
            _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"the kernel refused the seccomp filter: {os.strerror(err)}")
    _denied = True
    return True


__all__ = ["amx_denied", "cpu_has_amx", "deny_amx"]
