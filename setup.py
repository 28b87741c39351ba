"""Build augkd and its extension `augkd._C`.

The C++ CPU kernels are always built. The CUDA kernels are built when nvcc and a CUDA-enabled torch
are present, also with no GPU visible (we cross-compile for a fixed arch list). Environment knobs:

  AUGKD_BUILD_CUDA=1|0     force the CUDA part on (error if impossible) or off; unset = auto
  TORCH_CUDA_ARCH_LIST     CUDA archs; default "8.0;9.0+PTX" when unset (no GPU is queried)
  AUGKD_CPU_ISA=auto|avx512|avx2|generic   vector ISA of the CPU kernels; auto = best of the build machine
  AUGKD_DEBUG=1            -O0 -g
  MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _set_cuda_home() -> None:
    """torch.utils.cpp_extension reads CUDA_HOME when imported: point it at nvcc's toolkit root first."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc_path = Path(nvcc).resolve()
        candidates.append(nvcc_path.parent.parent)
        # nvcc on PATH may be a wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`): follow it
        try:
            text = nvcc_path.read_text(errors="ignore")[:4096] if nvcc_path.stat().st_size < 4096 else ""
        except OSError:
            text = ""
        for word in text.split():
            word = word.strip("'\"")
            if word.startswith("/") and word.endswith("/bin/nvcc"):
                candidates.insert(0, Path(word).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(root)
            return


_set_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda() -> bool:
    forced = os.environ.get("AUGKD_BUILD_CUDA")
    possible = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if forced == "0":
        return False
    if forced == "1":
        if not possible:
            sys.exit(
                "AUGKD_BUILD_CUDA=1 but the CUDA part cannot be built: "
                f"CUDA_HOME={cpp_extension.CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r} "
                "(install nvcc and a CUDA build of torch)"
            )
        return True
    if forced not in (None, "", "auto"):
        sys.exit(f"AUGKD_BUILD_CUDA must be 0, 1 or auto, got {forced!r}")
    return possible


def _cuda_library_includes() -> list[str]:
    """The toolkit on disk may lack library headers (cublas, cusparse) that torch's headers include;
    the CUDA torch wheel ships them under site-packages/nvidia/cu13/include (cu12 layouts too)."""
    found = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if not base.is_dir():
            continue
        found += sorted(str(p) for p in base.glob("cu*/include") if p.is_dir())
        found += sorted(str(p) for p in base.glob("*/include") if (p / "cublas_v2.h").exists())
    return list(dict.fromkeys(found))


def _cpu_isa_flags() -> list[str]:
    """Vector ISA for at::vec::Vectorized: it picks its implementation from CPU_CAPABILITY_* macros at
    compile time, so the kernels are compiled for the best ISA of the build machine (we build from source
    where we run). AUGKD_CPU_ISA overrides."""
    isa = os.environ.get("AUGKD_CPU_ISA", "auto").lower()
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    cpu_flags = set()
    if isa == "auto":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    cpu_flags = set(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
        has_avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags
        isa = "avx512" if has_avx512 else ("avx2" if {"avx2", "fma"} <= cpu_flags else "generic")
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if isa == "generic":
        return []
    sys.exit(f"AUGKD_CPU_ISA must be auto, avx512, avx2 or generic, got {isa!r}")


def _extension():
    debug = os.environ.get("AUGKD_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [str(ROOT / "csrc"), str(ROOT / "kernels")]
    cxx = opt + ["-std=c++20", "-fopenmp", "-Wno-unknown-pragmas"] + _cpu_isa_flags()
    define_macros = []
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # no GPU to ask: cross-compile for Ampere and Hopper (+PTX for later archs)
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _cuda_library_includes()
        define_macros.append(("AUGKD_WITH_CUDA", None))
        nvcc = opt + ["-std=c++20", "--use_fast_math", "-lineinfo", "--threads", "4",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        return cpp_extension.CUDAExtension(
            "augkd._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "augkd._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
    )


# Metadata, dependencies and extras are in pyproject.toml; this file adds the extension.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
