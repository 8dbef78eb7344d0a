"""The system-library check `make install` runs before anything is installed, and the torchcodec warning."""

import io
import sys

from zk0lib import env, syslibs


def test_a_missing_library_is_named_with_its_package_and_the_command(monkeypatch, capsys):
    ghost = syslibs.Need("zk0-ghost-package", "what zk0 would use it for", libraries=("zk0_no_such_library",))
    assert syslibs.missing((ghost,)) == [ghost]
    monkeypatch.setattr(syslibs, "NEEDS", (ghost, *syslibs.NEEDS))
    assert syslibs.main([]) == 1  # without --install nothing is installed
    err = capsys.readouterr().err
    assert "missing system package zk0-ghost-package: what zk0 would use it for" in err
    assert "apt-get install -y --no-install-recommends zk0-ghost-package" in err


def test_this_machine_has_what_zk0_needs():
    """make install / .ci/run put them here; a missing one is named (the line above is what a user sees)."""
    assert [n.package for n in syslibs.missing()] == []
    program = syslibs.Need("p", "w", programs=("zk0-no-such-program",))
    files = syslibs.Need("f", "w", files=("/nonexistent/zk0/*.so",))
    assert syslibs.missing((program, files)) == [program, files]


def test_torchcodec_warning_is_one_line_once(monkeypatch):
    monkeypatch.setattr(env, "_TORCHCODEC", {"problem": "OSError: Could not load this library: libtorchcodec_core4.so"})
    sink = io.StringIO()
    monkeypatch.setattr(sys, "stderr", sink)
    env.warn_if_no_torchcodec()
    env.warn_if_no_torchcodec()
    lines = sink.getvalue().splitlines()
    assert len(lines) == 1 and "PyAV" in lines[0] and "apt-get install ffmpeg" in lines[0]
    monkeypatch.setattr(env, "_TORCHCODEC", {})
    assert env.torchcodec_problem() is None  # here FFmpeg is installed: torchcodec loads


def _encode_av1(path) -> None:
    import av
    import numpy as np

    with env.native_stderr_to(path.with_suffix(".log")), av.open(str(path), "w") as container:
        stream = container.add_stream("libsvtav1", rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_encoding_av1_leaves_the_scheduling_policy_as_it_was(tmp_path):
    """SVT-AV1 puts the thread that encodes on SCHED_FIFO when it runs as root and may (this project's
    machines and CI: it does); keep_scheduling puts the policy back, whatever the encoder did inside it.
    Where the encoder cannot switch (not root, no CAP_SYS_NICE) this passes trivially."""
    import os

    before = (os.sched_getscheduler(0), os.sched_getparam(0))
    with env.keep_scheduling():
        _encode_av1(tmp_path / "encoded.mp4")
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == before
    assert (tmp_path / "encoded.mp4").stat().st_size > 0
