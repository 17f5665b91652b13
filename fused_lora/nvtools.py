"""The NVIDIA tools Triton compiles with, and assembling PTX exactly as Triton does — for reading compiled
kernels without a GPU (:mod:`fused_lora.compile_check`).

    ptxas(90)                       # Tool(path=.../ptxas-blackwell, version="13.4", source=...) under triton 3.9
    nvdisasm()                      # the disassembler Triton bundles
    with ptxas_report() as log:     # ptxas -v's report of what triton.compile assembles (a cache miss)
        compiled = triton.compile(src, target=..., options=options)
    log, cubin = assemble(ptx, 90, options)   # or: assemble the PTX again, as Triton does

Which ptxas assembles a kernel depends on the Triton version: 3.6 and 3.8 use ``bin/ptxas`` below sm_100
and ``bin/ptxas-blackwell`` from it; 3.9 uses ``ptxas-blackwell`` from sm_90 on (its Hopper PTX is
``.version 9.4``, which the older binary refuses). So the binary is Triton's own choice,
``triton.backends.nvidia.compiler.get_ptxas(arch)`` (which also honours ``TRITON_PTXAS_PATH`` /
``TRITON_PTXAS_BLACKWELL_PATH``), and the assembly is Triton's own ``make_cubin`` — the same flags too
(3.9 adds ``--regAllocOptLevel=2``, which changes register allocation and spills) — with ``ptxas -v``'s
report captured through Triton's ``TRITON_DUMP_PTXAS_LOG`` knob. Where a future Triton renames either,
the fallbacks are: the bundled binaries tried oldest first (the first that accepts the PTX's
``.version``), and a direct ``ptxas -lineinfo -v`` call; :func:`describe` says which route was taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
import tempfile


@dataclasses.dataclass(frozen=True)
class Tool:
    path: str
    version: str  # CUDA release, e.g. "12.9"; "" when unknown
    source: str  # how it was found: "triton get_ptxas", "triton knobs", "bundled", "PATH"


def _bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else ""


def _bundled_ptxas() -> list[Tool]:
    """The ptxas binaries Triton ships, oldest CUDA release first."""
    tools = []
    for name in ("ptxas", "ptxas-blackwell"):
        path = os.path.join(_bin_dir(), name)
        if os.access(path, os.X_OK):
            tools.append(Tool(path, _version(path), "bundled"))
    return sorted(tools, key=lambda t: tuple(int(x) for x in t.version.split(".")) if t.version else (0,))


def ptxas(arch: int) -> Tool | None:
    """The ptxas Triton assembles sm_<arch> code with, or None when Triton no longer says (then
    :func:`assemble` tries the bundled ones)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(arch)
        return Tool(tool.path, tool.version, "triton get_ptxas")
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return None


def nvdisasm() -> Tool:
    """The nvdisasm Triton uses (``triton.knobs.nvidia.nvdisasm``, ``TRITON_NVDISASM_PATH``), else the bundled
    one, else one on PATH."""
    try:
        from triton import knobs

        tool = knobs.nvidia.nvdisasm
        if tool is not None:
            return Tool(tool.path, tool.version, "triton knobs")
    except (ImportError, AttributeError, RuntimeError):
        pass
    path = os.path.join(_bin_dir(), "nvdisasm")
    if os.access(path, os.X_OK):
        return Tool(path, _version(path), "bundled")
    found = shutil.which("nvdisasm")
    if found:
        return Tool(found, _version(found), "PATH")
    raise FileNotFoundError("no nvdisasm: neither Triton's knobs, nor its bin/ folder, nor PATH has one")


def _gpu_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def _run_ptxas(path: str, ptx: str, arch: int) -> tuple[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        src, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([path, "-lineinfo", "-v", f"--gpu-name={_gpu_name(arch)}", src, "-o", cubin],
                             capture_output=True, text=True)  # fmt: skip
        log = out.stdout + out.stderr
        if out.returncode:
            raise RuntimeError(f"{os.path.basename(path)}: {ptxas_message(log)}")
        with open(cubin, "rb") as f:
            return log, f.read()


def ptxas_message(text: str) -> str:
    """ptxas's own complaint, one line: its fatal/error lines (not Triton's reproducer or the PTX)."""
    lines = [line.strip() for line in text.splitlines() if re.search(r"ptxas.*(fatal|error)|^error", line.strip())]
    return " | ".join(dict.fromkeys(lines))[:400] or text.strip()[-400:]


@contextlib.contextmanager
def ptxas_report():
    """Capture the ``ptxas -v`` report of every assembly Triton runs inside the block (``triton.compile``
    on a cache miss) into the yielded StringIO; empty where Triton took the kernel from its cache."""
    from triton import knobs

    out = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        yield out


def _triton_make_cubin(ptx: str, arch: int, options: dict) -> tuple[str, bytes]:
    """Triton's own assembly step, its ptxas -v report captured (raises AttributeError/TypeError when this
    Triton has no such step)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    opt = backend.parse_options(dict(options))
    with ptxas_report() as out:
        cubin = backend.make_cubin(ptx, {}, opt, arch)
    return out.getvalue(), cubin


def assemble(ptx: str, arch: int, options: dict) -> tuple[str, bytes]:
    """(ptxas -v's report, cubin) for PTX that Triton generated for sm_<arch> with these compile options,
    assembled by the binary and with the flags Triton uses; RuntimeError with ptxas's message on failure."""
    try:
        from triton.runtime.errors import PTXASError
    except ImportError:  # a Triton without it: its failure is reported as it comes
        PTXASError = RuntimeError
    try:
        return _triton_make_cubin(ptx, arch, options)
    except (ImportError, AttributeError, TypeError, KeyError):
        pass  # a Triton whose backend lost make_cubin / the knob / this signature: call ptxas ourselves
    except PTXASError as e:
        raise RuntimeError(ptxas_message(str(e))) from None
    tool = ptxas(arch)
    candidates = [tool] if tool else _bundled_ptxas()
    errors = []
    for candidate in candidates:
        try:
            return _run_ptxas(candidate.path, ptx, arch)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError("; ".join(errors) or "no ptxas found in Triton's bin/ folder")


def describe(archs: tuple[int, ...]) -> str:
    """One line per tool: which binary (version, how it was found) serves each architecture."""
    import triton

    lines = []
    for arch in archs:
        tool = ptxas(arch)
        how = "Triton's own ptxas call and flags (make_cubin)" if _has_make_cubin() else "a direct ptxas -v call"
        if tool is None:
            names = ", ".join(f"{os.path.basename(t.path)} {t.version}" for t in _bundled_ptxas())
            lines.append(f"{_gpu_name(arch)}: Triton names no ptxas; bundled tried oldest first ({names}), {how}")
        else:
            lines.append(f"{_gpu_name(arch)}: ptxas {tool.version} ({_short(tool.path)}, via {tool.source}), {how}")
    dis = nvdisasm()
    lines.append(f"SASS: nvdisasm {dis.version} ({_short(dis.path)}, via {dis.source})")
    return f"triton {triton.__version__}\n" + "\n".join("  " + line for line in lines)


def _short(path: str) -> str:
    """A bundled binary as triton/backends/nvidia/bin/<name>; any other path in full."""
    return f"bundled {os.path.basename(path)}" if os.path.dirname(path) == _bin_dir() else path


def _has_make_cubin() -> bool:
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import CUDABackend

        return hasattr(CUDABackend, "make_cubin") and hasattr(knobs.nvidia, "dump_ptxas_log")
    except ImportError:
        return False
