"""Builds the CUDA emulator: every CUDA source of csrc/ compiled as C++ that runs its kernels' threads on the CPU
(prelude.h says what is and is not modelled), registered as the CPU kernels of the operators torch.ops.epamx_emu.*,
which take epamx's schemas. tests/ops/test_cuda_emulated.py compares them with epamx's CPU kernels, so the CUDA code
is exercised (indexing, launch geometry, grid-stride loops, warp teams, block reductions, barriers) on a machine
without a GPU. It is a rehearsal, not the proof: tools/gpu_check.sh runs the real kernels on a GPU.

    python tools/cuda_emu/emulator.py     builds (into build/cuda_emu/) and lists the emulated operators

Each .cu file is copied with these changes only: comments blanked (line numbers kept, for the compiler's messages),
each launch `k<<<grid, block, smem, stream>>>(args)` rewritten as a call of the emulator's launch, a line at the top
of each __global__ body recording that the kernel ran (and with which index type), the choices of int32 offsets made
to also ask EPAMX_CUDA_EMU_INDEX, a call after each __shared__ declaration filling it with NaN once per block (the
state a block must not rely on), and pinned host memory made pageable (a CPU build of torch has no pinned allocator).
They are compiled with multiply-adds fused where the CPU can (nvcc's default). selftest.cu, kernels with known faults,
is built beside them: the tests check that the emulator catches each fault.
"""
import os
import platform
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "cuda_emu"
# The grid's largest size in blocks (csrc/common/cuda_utils.cuh, EPAMX_CUDA_MAX_BLOCKS): small, so that tests of a
# few thousand elements already take the kernels' grid-stride loops past their first round.
MAX_BLOCKS = 3
# Sources with no kernel to run (build facts of the CUDA toolkit).
SKIPPED = {"cuda_info.cu"}
# EPAMX_CUDA_EMU_SANITIZE=address builds the kernels with AddressSanitizer (into build/cuda_emu_asan/): a read or
# write outside any tensor's memory stops the process with a report naming the kernel's source line, as
# compute-sanitizer's memcheck does on a GPU. Python must start with ASan's runtime loaded, and libstdc++ beside it
# (else ASan finds no C++ throw to wrap, and the first exception aborts): asan_environment() sets that.
ASAN_COMMAND = ('LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" '
                "ASAN_OPTIONS=detect_leaks=0 EPAMX_CUDA_EMU_SANITIZE=address")


def asan_environment(env=None):
    """env (default: this process's) with what a Python process needs to load the AddressSanitizer build; None where
    gcc has no ASan runtime."""
    import subprocess

    libs = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(lib) for lib in libs):
        return None
    return dict(os.environ if env is None else env, LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0",
                EPAMX_CUDA_EMU_SANITIZE="address")


_LIBRARY = None


def _contraction_flags():
    """Multiply-adds fused as nvcc fuses them by default (--fmad=true), where this CPU has FMA instructions: the
    emulated kernels round as the GPU's would, more nearly than unfused code (the places the compilers fuse differ)."""
    flags = ["-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            cpu = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpu = ""
        if re.search(r"^flags\s*:.*\bfma\b", cpu, re.M):
            flags.append("-mfma")
    return flags


def cuda_sources():
    return sorted(p for p in CSRC.rglob("*.cu") if p.name not in SKIPPED)


def _blank_comments(text):
    """text with every comment replaced by spaces (newlines kept); string literals left alone."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _matching(text, i):
    """The index just past the parenthesis that closes text[i] (an opening one)."""
    depth = 0
    for j in range(i, len(text)):
        depth += (text[j] == "(") - (text[j] == ")")
        if depth == 0:
            return j + 1
    raise ValueError(f"unbalanced ( at offset {i}")


def _rewrite_launches(text, name):
    """Every `kernel<<<config>>>(` as `::epamx_emu::launch(kernel, ::epamx_emu::Config(config), "name:line")(`."""
    out, pos = [], 0
    for m in re.finditer(r"<<<", text):
        if m.start() < pos:
            raise ValueError(f"{name}: nested launch at offset {m.start()}")
        end = text.find(">>>", m.end())
        start = max(text.rfind(c, 0, m.start()) for c in ";{}") + 1  # the statement's start
        kernel, config = text[start:m.start()], text[m.end():end]
        if not kernel.strip() or end < 0 or not text[end + 3:].lstrip().startswith("("):
            raise ValueError(f"{name}: cannot read the launch at line {text.count(chr(10), 0, m.start()) + 1}")
        line = text.count("\n", 0, m.start()) + 1
        lead = kernel[:len(kernel) - len(kernel.lstrip())]
        out.append(text[pos:start])
        # (the kernel's and the config's newlines move into the call: line numbers are kept)
        out.append(f'{lead}::epamx_emu::launch({kernel.lstrip()}, ::epamx_emu::Config({config}), "{name}:{line}")')
        pos = end + 3
    out.append(text[pos:])
    return "".join(out)


def _mark_kernels(text):
    """A line at the top of every __global__ function's body recording its name (the first time it runs)."""
    out, pos, names = [], 0, []
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text):
        body = text.index("{", _matching(text, m.end() - 1))
        names.append(m.group(1))
        out.append(text[pos:body + 1])
        out.append(f' static const bool epamx_emu_ran = ::epamx_emu::mark_kernel("{m.group(1)}", __PRETTY_FUNCTION__); '
                   "(void)epamx_emu_ran;")
        pos = body + 1
    out.append(text[pos:])
    return "".join(out), names


def _poison_shared(text):
    """After each __shared__ declaration, a call that fills each declared array with 0xFF bytes (NaN as a float) the
    first time a thread of the block passes it: as on a GPU, a block starts with shared memory it has not written."""
    out, pos = [], 0
    for m in re.finditer(r"__shared__\b[^;]*;", text):
        names = re.findall(r"(\w+)\s*\[", m.group(0))
        if not names:
            raise ValueError(f"cannot read the __shared__ declaration {m.group(0)!r}")
        out.append(text[pos:m.end()])
        out.append("".join(f" ::epamx_emu::poison_shared({n}, sizeof({n}));" for n in names))
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


# Where the CUDA sources choose int32 or int64 offsets by the tensors' sizes: rewritten to choose int64 whenever
# EPAMX_CUDA_EMU_INDEX=int64, so the int64 kernels run on small tensors too.
_WIDE_INDEX = [
    # dispatch_index_type({tensors}, body): one more tensor, too large for int32 under int64 (index_probe).
    (re.compile(r"\bdispatch_index_type\(\{"), "dispatch_index_type({::epamx_emu::index_probe(), "),
    # render_heatmaps' own limit.
    (re.compile(r"\bconstexpr int64_t kInt32Limit = "),
     "const int64_t kInt32Limit = !::epamx_emu::narrow_index() ? 0 : "),
]


def _widen_index(text):
    """text with each choice of int32 offsets also asking ::epamx_emu::narrow_index(); the number of choices."""
    choices = 0
    for pattern, replacement in _WIDE_INDEX:
        text, n = pattern.subn(replacement, text)
        choices += n
    out, pos = [], 0
    for m in re.finditer(r"\bfits_int32\(", text):  # fits_int32(t) -> (::epamx_emu::narrow_index() && fits_int32(t))
        end = _matching(text, m.end() - 1)
        out += [text[pos:m.start()], "(::epamx_emu::narrow_index() && ", text[m.start():end], ")"]
        pos = end
        choices += 1
    return "".join(out) + text[pos:], choices


def translate(path):
    """The C++ text of the .cu file at path, the names of its __global__ functions, and how many choices of int32 or
    int64 offsets it makes."""
    rel = path.relative_to(ROOT).as_posix()  # for the compiler's messages
    text = _blank_comments(path.read_text())
    text = _rewrite_launches(text, path.name)
    text, choices = _widen_index(text)
    text, names = _mark_kernels(_poison_shared(text))
    text = text.replace(".pinned_memory(true)", ".pinned_memory(false)")
    return f'#line 1 "{rel}"\n{text}', names, choices


def kernel_names(wide_index=False):
    """Every __global__ function of the emulated sources; with wide_index, those of the sources that choose int64
    offsets for large tensors (which EPAMX_CUDA_EMU_INDEX=int64 runs with int64 offsets)."""
    names = []
    for p in cuda_sources():
        _, kernels, choices = translate(p)
        if choices or not wide_index:
            names += kernels
    return sorted(names)


def op_names():
    """The epamx operators the CUDA sources register kernels for."""
    names = []
    for p in cuda_sources():
        names += re.findall(r'm\.impl\("(\w+)"', p.read_text())
    return sorted(set(names))


def load(verbose=False):
    """Builds (once; ninja rebuilds what changed) and loads the emulator: afterwards torch.ops.epamx_emu.<op> runs
    the CUDA kernels of torch.ops.epamx.<op> on CPU tensors. Returns torch.ops.epamx_emu."""
    global _LIBRARY
    import torch
    import torch.utils.cpp_extension as ext

    import epamx  # noqa: F401  (registers the schemas copied below)

    if _LIBRARY is None:
        sanitize = os.environ.get("EPAMX_CUDA_EMU_SANITIZE", "")
        if sanitize not in ("", "address"):
            raise ValueError(f"EPAMX_CUDA_EMU_SANITIZE must be 'address' or unset, got {sanitize!r}")
        if sanitize and "libasan" not in Path("/proc/self/maps").read_text():
            raise RuntimeError("EPAMX_CUDA_EMU_SANITIZE=address needs AddressSanitizer's runtime loaded before "
                               f"Python starts: run it as {ASAN_COMMAND} python ...")
        build = BUILD.with_name(BUILD.name + "_asan") if sanitize else BUILD
        src = build / "src"
        src.mkdir(parents=True, exist_ok=True)
        sources = [str(HERE / "runtime.cpp")]
        for p in [*cuda_sources(), HERE / "selftest.cu"]:
            out = src / (p.stem + ".cpp")
            text = translate(p)[0]
            if not out.exists() or out.read_text() != text:  # untouched files keep their timestamps for ninja
                out.write_text(text)
            sources.append(str(out))
        library = torch.library.Library("epamx_emu", "DEF")
        for name in op_names():
            schema = str(getattr(torch.ops.epamx, name).default._schema)
            library.define(schema.split("::", 1)[1])
        asan = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"] if sanitize else []
        if shutil.which("ninja") is None:  # torch builds with ninja: the one pip put beside this Python, if any
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        ext.load(name="epamx_cuda_emu" + ("_asan" if sanitize else ""), sources=sources, build_directory=str(build),
                 is_python_module=False, extra_include_paths=[str(HERE / "include"), str(CSRC)],
                 extra_cflags=["-O1", "-std=c++20", "-include", str(HERE / "prelude.h"),
                               f"-DEPAMX_CUDA_MAX_BLOCKS={MAX_BLOCKS}", "-Wno-unused-parameter",
                               *_contraction_flags(), *asan],
                 extra_ldflags=asan[:1], verbose=verbose)
        _LIBRARY = library
    return torch.ops.epamx_emu


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    ops = load(verbose="-v" in sys.argv)
    print("emulated operators:", ", ".join(f"epamx_emu.{n}" for n in op_names()))
    print("kernels:", ", ".join(kernel_names()))
