"""Build script: declares the Cython extensions and picks the OpenMP flags.

Everything else (metadata, extras, pytest settings) lives in pyproject.toml.

Environment switches:
  CEMBED_FAIL_NO_OPENMP=1  fail the build instead of falling back to a serial build
  CEMBED_DISABLE_OPENMP=1  build serial kernels on purpose
  CEMBED_BOUNDSCHECK=1     compile the kernels with bounds and wraparound checks (debugging)
  CEMBED_OPT_LEVEL=g       optimisation level of the kernels (default 3, i.e. -O3); the sanitizer
                           build uses g (an -O in $CFLAGS would be overridden by ours, which comes later)

The usual CFLAGS / CPPFLAGS / LDFLAGS apply to the kernels and to the OpenMP probe alike (a
sanitizer build is `CFLAGS="-fsanitize=address,undefined" LDFLAGS="-fsanitize=address,undefined"`;
see .ci/sanitize).
"""
import glob
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    r"""
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\n", n);
        return n > 0 ? 0 : 1;
    }
    """
)


def _flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def openmp_flags():
    """Compile and link flags that enable OpenMP (GCC or Clang)."""
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def base_flags():
    """Optimisation flags (-O3 unless CEMBED_OPT_LEVEL says otherwise). No -march=native and no -ffast-math: results must be portable and
    IEEE-exact (NaN semantics, torch-parity rounding); -ffp-contract=off keeps the compiler from
    fusing a*b+c on its own, so the kernels round exactly where they say they do."""
    level = os.environ.get("CEMBED_OPT_LEVEL", "") or "3"
    if level not in ("0", "1", "2", "3", "s", "g"):
        raise ValueError(f"cembed: CEMBED_OPT_LEVEL must be one of 0 1 2 3 s g, got {level!r}")
    return [f"-O{level}", "-fno-math-errno", "-ffp-contract=off"]


def environment_compile_flags():
    """$CFLAGS $CPPFLAGS from the environment (setuptools puts them in the compiler command)."""
    return shlex.split(os.environ.get("CFLAGS", "")) + shlex.split(os.environ.get("CPPFLAGS", ""))


def environment_link_flags():
    """The flags setuptools appends from the environment when it links an extension:
    $LDFLAGS $CFLAGS $CPPFLAGS, in that order (its `linker_exe`, used for executables, gets none)."""
    flags = []
    for name in ("LDFLAGS", "CFLAGS", "CPPFLAGS"):
        flags += shlex.split(os.environ.get(name, ""))
    return flags


def _build_jobs():
    """Parallel jobs of a build: one per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        # `pip install` passes no -j: compile the extensions in parallel anyway, one job per core (at
        # most 4). An explicit --parallel / -j wins.
        if not self.parallel:
            self.parallel = _build_jobs()

    def run(self):
        # setuptools clears self.inplace while it builds, then copies the extensions back
        self._source_copy = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def _probe_openmp(self, cflags, ldflags):
        """Compile, link and run a small OpenMP program with the flags the extensions get:
        `compile` uses the same compiler command as the extensions (with $CFLAGS and $CPPFLAGS),
        and the link adds $LDFLAGS $CFLAGS $CPPFLAGS as the extensions' link does, so e.g. a
        sanitizer build probes a sanitized program instead of failing to link one."""
        self._probe_error = ""
        tmp = tempfile.mkdtemp(prefix="cembed-omp-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as fh:
                fh.write(OPENMP_PROBE)
            objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            exe = os.path.join(tmp, "probe")
            self.compiler.link_executable(
                objs, exe, extra_preargs=environment_link_flags(), extra_postargs=ldflags
            )
            out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and int(out.stdout.strip() or 0) >= 1:
                return True
            self._probe_error = f"probe exited {out.returncode}: {out.stdout.strip()} {out.stderr.strip()}"
            return False
        except Exception as exc:  # noqa: BLE001 - any failure means "no usable OpenMP"
            self._probe_error = repr(exc)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            raise RuntimeError(
                f"cembed: the {ctype!r} compiler cannot build cembed; its kernels need GCC or Clang "
                "(the pooling header _bag_pooling.h uses GCC/Clang vector extensions). Build with "
                "GCC or Clang, e.g. MinGW-w64 on Windows."
            )
        cflags = base_flags()
        ldflags = []
        use_openmp = False
        if not _flag("CEMBED_DISABLE_OPENMP"):
            omp_c, omp_l = openmp_flags()
            if self._probe_openmp(cflags + omp_c, omp_l):
                cflags += omp_c
                ldflags += omp_l
                use_openmp = True
            elif _flag("CEMBED_FAIL_NO_OPENMP"):
                raise RuntimeError(
                    "cembed: OpenMP probe failed and CEMBED_FAIL_NO_OPENMP is set "
                    f"(compiler {ctype!r}, flags {omp_c} {omp_l}) {self._probe_error}"
                )
            else:
                msg = (
                    "cembed: could not compile and run an OpenMP program; building SERIAL "
                    "kernels (set CEMBED_FAIL_NO_OPENMP=1 to make this an error): "
                    + self._probe_error
                )
                warnings.warn(msg)
                print("*" * 78 + "\n" + msg + "\n" + "*" * 78, file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = list(cflags)
            ext.extra_link_args = list(ldflags)
        self._write_build_config(ctype, cflags, ldflags)
        super().build_extensions()

    def _write_build_config(self, ctype, cflags, ldflags):
        """cembed/_build_config.py, read by show_config(): next to the built extensions, and in
        the source tree too for an in-place build. The flags include those taken from the
        environment ($CFLAGS, $LDFLAGS, ...), so a sanitizer build says so. (Whether OpenMP is on
        is asked of the compiled kernels at run time, not recorded here.)"""
        compiler = getattr(self.compiler, "compiler_so", None) or [ctype]
        text = (
            "# Generated by setup.py at build time.\n"
            f"COMPILER = {str(compiler[0])!r}\n"
            f"COMPILER_TYPE = {ctype!r}\n"
            f"COMPILE_ARGS = {environment_compile_flags() + cflags!r}\n"
            f"LINK_ARGS = {environment_link_flags() + ldflags!r}\n"
            f"BOUNDSCHECK = {_flag('CEMBED_BOUNDSCHECK')!r}\n"
        )
        targets = {os.path.join(self.build_lib, "cembed")}
        if getattr(self, "_source_copy", False):
            targets.add(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cembed"))
        for target_dir in targets:
            os.makedirs(target_dir, exist_ok=True)
            with open(os.path.join(target_dir, "_build_config.py"), "w") as fh:
                fh.write(text)


def extensions():
    # Typed memoryviews need no NumPy headers: no .pyx cimports numpy, so no np.get_include().
    sources = sorted(glob.glob(os.path.join("cembed", "_*.pyx")))
    # every shared header / declaration file is a dependency: changing _half.h rebuilds its users
    shared = sorted(glob.glob(os.path.join("cembed", "*.h")) + glob.glob(os.path.join("cembed", "*.pxd")))
    exts = [
        Extension("cembed." + os.path.splitext(os.path.basename(src))[0], [src], include_dirs=["cembed"],
                  depends=shared)
        for src in sources
    ]
    checks = _flag("CEMBED_BOUNDSCHECK")
    directives = {
        "language_level": 3,
        "boundscheck": checks,
        "wraparound": checks,
        "initializedcheck": checks,
        "cdivision": True,
        "embedsignature": True,
    }
    # Cython translates the modules in parallel too (one process per core, at most 4), as build_ext compiles
    # them — where processes are forked: a pool that spawns its workers (macOS, Windows, forkserver) would
    # run this script again in each of them
    forked = multiprocessing.get_start_method() == "fork"
    return cythonize(exts, compiler_directives=directives, include_path=["cembed"],
                     nthreads=_build_jobs() if forked else 0)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
