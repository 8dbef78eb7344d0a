"""The system libraries zk0 needs beside its Python packages, checked before anything is installed.

Standard library only, so `make install` runs it with the system Python before the venv exists:

    python3 zk0lib/syslibs.py [--install]

It prints what is missing and the one command that installs it; with --install, as root on a machine with
apt-get, it installs the missing packages itself (as .ci/run does). Exit status 1 while something is missing.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Need:
    package: str  # the Debian/Ubuntu package that provides it
    why: str
    libraries: tuple[str, ...] = ()  # shared libraries, as ctypes.util.find_library names them
    programs: tuple[str, ...] = ()  # any one of these on PATH will do
    files: tuple[str, ...] = ()  # glob patterns, each must match a file


NEEDS = (
    Need("ffmpeg", "the FFmpeg libraries torchcodec decodes videos with", libraries=("avutil", "avcodec", "avformat")),
    Need("libegl1", "headless MuJoCo rendering for the simulated labs (MUJOCO_GL=egl)", libraries=("EGL",)),
    Need("libgl1-mesa-dri", "the Mesa driver EGL renders with on a CPU", files=("/usr/lib/*/dri/swrast_dri.so",)),
    Need("libosmesa6", "MuJoCo's software-rendering fallback (MUJOCO_GL=osmesa)", libraries=("OSMesa",)),
    Need("chromium", "the headless browser the report and results-app tests load pages in", programs=("chromium",)),
)


def missing(needs: tuple[Need, ...] | None = None) -> list[Need]:
    """The needs (default: all of zk0's) this machine does not meet."""
    out = []
    for need in NEEDS if needs is None else needs:
        libs_ok = all(ctypes.util.find_library(name) for name in need.libraries)
        progs_ok = not need.programs or any(shutil.which(p) for p in need.programs)
        files_ok = all(glob.glob(pattern) for pattern in need.files)
        if not (libs_ok and progs_ok and files_ok):
            out.append(need)
    return out


def install_command(needs: list[Need]) -> str:
    packages = " ".join(n.package for n in needs)
    prefix = "" if os.geteuid() == 0 else "sudo "
    return f"{prefix}apt-get update && {prefix}apt-get install -y --no-install-recommends {packages}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    lacking = missing()
    if not lacking:
        return 0
    for need in lacking:
        print(f"zk0: missing system package {need.package}: {need.why}", file=sys.stderr)
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if "--install" in args and can_install:
        packages = [n.package for n in lacking]
        print(f"zk0: installing {' '.join(packages)} (apt-get)", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True, env=env)
        still = missing(tuple(lacking))
        if not still:
            return 0
        lacking = still
    print(f"zk0: install them with:\n    {install_command(lacking)}\nthen run the command again.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
