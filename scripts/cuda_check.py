"""Compile the GPU decoder's kernels (``ctxstream/codec/_ctxgpu.cu``) without a GPU: NVRTC to PTX for
every kernel the host code launches, then ``ptxas`` to SASS with its register and spill report.

This catches what a CUDA change can break before a device is lent: syntax and type errors, template
instantiations, register pressure and spills. It does not run anything: bit-exactness and speed are
the device's tests (``tests/test_gpu_decoder.py``) and benchmarks (``bench/gpu.py``).

NVRTC and ptxas come from NVIDIA's PyPI wheels, unpacked into a folder (no CUDA install needed)::

    pip download --no-deps -d /tmp/cu nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12
    (cd /tmp/cu && for w in *.whl; do unzip -qo "$w" -d x; done)
    python scripts/cuda_check.py --nvidia /tmp/cu/x/nvidia [--arch 90]

The host part of the file (launches through the CUDA runtime) is left out under ``__CUDACC_RTC__``.
Exit status 0 when everything compiles; the ptxas report is printed per kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "ctxstream" / "codec" / "_ctxgpu.cu"

# Every template instance the host code launches (pick_decode, ctx_esc_fix, ctx_finish).
KERNELS = (
    [f"rans_decode_kernel<{m}, {s}, {t}>" for m in (0, 1, 2) for s in ("false", "true") for t in ("false", "true")]
    + [f"esc_fix_kernel<{m}>" for m in (1, 2)]
    + [f"{k}<{i}, {o}>" for k in ("finish_kernel", "finish8_kernel")
       for i in ("float", "__nv_bfloat16") for o in ("float", "__nv_bfloat16", "__half")]
    + ["realign_kernel"]
)


def _check(lib, rc: int, prog, what: str) -> None:
    if rc == 0:
        return
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    raise SystemExit(f"{what} failed (nvrtc {rc}):\n{log.value.decode(errors='replace')}")


def compile_ptx(nvidia: Path, arch: int) -> str:
    lib = ctypes.CDLL(str(next((nvidia / "cuda_nvrtc" / "lib").glob("libnvrtc.so*"))))
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), SOURCE.name.encode(), 0, None, None),
           prog, "nvrtcCreateProgram")
    for k in KERNELS:
        _check(lib, lib.nvrtcAddNameExpression(prog, k.encode()), prog, f"instantiating {k}")
    opts = [f"--gpu-architecture=compute_{arch}", "-std=c++17", "-default-device",
            f"-I{nvidia / 'cuda_runtime' / 'include'}"]
    arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    _check(lib, lib.nvrtcCompileProgram(prog, len(opts), arr), prog, f"compiling {SOURCE.name}")
    n = ctypes.c_size_t()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvidia", type=Path, required=True,
                    help="folder with cuda_nvrtc/, cuda_runtime/ and (for ptxas) cuda_nvcc/ of NVIDIA's wheels")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    args = ap.parse_args(argv)
    ptx = compile_ptx(args.nvidia, args.arch)
    print(f"{SOURCE.name}: {len(KERNELS)} kernels compiled to PTX for compute_{args.arch}")
    ptxas = args.nvidia / "cuda_nvcc" / "bin" / "ptxas"
    if not ptxas.is_file():
        print("ptxas not found: no register / spill report")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([str(ptxas), f"-arch=sm_{args.arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return 1
    name, spill = None, ""
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name, spill = m.group(1), ""
        elif "spill" in line and "0 bytes spill stores, 0 bytes spill loads" not in line:
            spill = "; " + line.strip()
        elif "Used" in line and name:
            print(f"{name}: {line.split(':', 1)[1].strip()}{spill}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
