"""Building and loading the CPU C kernels: compiled with the machine's gcc at first use into
the cache dir (keyed by source, flags and machine), loaded through ctypes, or None where
they cannot build (no compiler): callers then run the torch references.

Why ctypes and not a torch extension: no torch headers or ninja, a ~1 s build. The
libraries share torch's OpenMP runtime (same libgomp soname), so no thread pools compete.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

# Compiled with -ffast-math but linked without it: linking with -ffast-math pulls in
# crtfastmath.o (GCC < 13 does so even for -shared), whose constructor turns on flush-to-zero
# and denormals-are-zero for the whole process when the library loads, and every float op in
# the server (torch, request validation: 5e-324 == 0.0) would change behaviour.
_COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]
_LINK = ["-shared", "-fopenmp"]
_FLAGS = _COMPILE + ["|"] + _LINK  # both go into the cache tag


class CLibrary:
    """One C source beside this file and the signatures of the functions it exports."""

    def __init__(self, source: str, signatures: Dict[str, List],
                 includes: Sequence[str] = ()) -> None:
        self.source = Path(__file__).with_name(source)
        # part of the cache tag
        self.includes = [Path(__file__).with_name(name) for name in includes]
        self.signatures = signatures  # name -> argtypes (every function returns void)
        self._lib: Optional[ctypes.CDLL] = None
        self._failed = False
        self._lock = threading.Lock()

    def build(self, out_dir: Path) -> Path:
        source = b"".join(p.read_bytes() for p in [self.source, *self.includes])
        tag = hashlib.sha256(source + " ".join(_FLAGS).encode()
                             + os.uname().machine.encode()).hexdigest()[:16]
        target = out_dir / f"{self.source.stem}-{tag}.so"
        if target.exists():
            return target
        from raylm.config import c_compiler

        cc = c_compiler() or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise RuntimeError("no C compiler (gcc/cc) on PATH")
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tmp_o, tmp_so = Path(tmp) / "kernel.o", Path(tmp) / target.name
            subprocess.run([cc, *_COMPILE, "-c", str(self.source), "-o", str(tmp_o)], check=True,
                           capture_output=True)
            subprocess.run([cc, *_LINK, str(tmp_o), "-o", str(tmp_so), "-lm"], check=True,
                           capture_output=True)
            os.replace(tmp_so, target)  # atomic: concurrent builders race harmlessly
        return target

    def load(self, out_dir: Optional[Path] = None) -> Optional[ctypes.CDLL]:
        """The compiled library, or None if it cannot be built here (logged once). Called on
        hot paths (per layer, per step): once settled, it answers without the lock."""
        if self._lib is not None or self._failed:
            return self._lib
        with self._lock:
            if self._lib is not None or self._failed:
                return self._lib
            try:
                from raylm.config import cache_dir

                lib = ctypes.CDLL(str(self.build(out_dir or cache_dir() / "kernels")))
                for name, argtypes in self.signatures.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, None
                self._lib = lib
            except Exception as exc:  # no compiler, odd platform: the torch path still works
                self._failed = True
                logger.warning("CPU kernels %s unavailable, using the torch path: %s",
                               self.source.name, exc)
            return self._lib
