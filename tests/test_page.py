"""The offline report page, finding runs at any depth, and the terminal progress of notebook batches."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest

from zk0lib import report
from zk0lib.batch import PrefixedLines
from zk0lib.config import load_config
from zk0lib.runs import RunRecord, find_runs, run_source


def _record(root: Path, run_id: str, kind: str = "federated", **overrides) -> RunRecord:
    cfg = load_config("smoke", {"output.runs_dir": str(root), "output.run_id": run_id, **overrides})
    run = RunRecord.create(cfg, kind=kind)
    run.update_summary(status="completed")
    return run


def test_find_runs_at_any_depth_and_blank_fields_for_baselines(tmp_path):
    reports = tmp_path / "reports"
    _record(reports / "demo" / "runs", "demo-1")
    _record(reports / "compare" / "c1" / "runs", "fedprox-s0")
    _record(reports / "compare" / "c1" / "runs", "centralized-s0", kind="centralized")
    _record(reports / "runs", "fedavg-1", **{"fl.strategy": "fedavg"})
    policy = reports / "runs" / "fedavg-1" / "checkpoints" / "final"  # a saved policy: config.json, no summary
    policy.mkdir(parents=True)
    (policy / "config.json").write_text("{}")
    (reports / "notebooks" / "01").mkdir(parents=True)  # folders without runs are passed over

    found = find_runs(reports)
    assert sorted(r.run_id for r in found) == ["centralized-s0", "demo-1", "fedavg-1", "fedprox-s0"]
    assert {r.run_id: run_source(r, reports) for r in found} == {
        "demo-1": "demo",
        "fedprox-s0": "compare/c1",
        "centralized-s0": "compare/c1",
        "fedavg-1": ".",
    }
    table = report.runs_table(reports, recursive=True).set_index("run_id")
    assert table.loc["centralized-s0", "strategy"] is None and pd.isna(table.loc["centralized-s0", "mu"])
    assert table.loc["fedprox-s0", "strategy"] == "fedprox" and table.loc["fedprox-s0", "mu"] == 0.01
    assert table.loc["fedavg-1", "mu"] == 0.0
    assert Path(table.loc["demo-1", "path"]) == reports / "demo" / "runs" / "demo-1"
    assert report.runs_table(reports / "runs").run_id.tolist() == ["fedavg-1"]  # not recursive: that folder only


def test_prefixed_lines_stream_whole_lines_as_they_come():
    sink = io.StringIO()
    lines = PrefixedLines("  02 | ", sink)
    lines.write("round 1/5, eval")
    assert sink.getvalue() == ""  # half a line waits for its end
    lines.write(" loss 0.18\nrecording lab-red: 5/20\r")
    lines.write("\n\nlast without newline")
    assert sink.getvalue() == "  02 | round 1/5, eval loss 0.18\n  02 | recording lab-red: 5/20\n"
    lines.close()
    assert sink.getvalue().endswith("  02 | last without newline\n")


def test_report_page_offline_in_chromium(smoke_run, home, tmp_path):
    """The page of a smoke run, with one real evaluation video, opened in headless Chromium with the
    network cut: nothing requested off the machine, every chart drawn, the video decodes."""
    from zk0lib import model, videos
    from zk0lib.appcheck import check_page
    from zk0lib.page import write_report

    assert smoke_run[0].returncode == 0, smoke_run[0].stderr[-2000:]
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("chromium missing: .ci/run installs it (apt-get install chromium)")
    reports = tmp_path / "reports"
    run_dir = reports / "runs" / "e2e-smoke"
    shutil.copytree(home / "reports" / "runs" / "e2e-smoke", run_dir, ignore=shutil.ignore_patterns("videos"))
    run = RunRecord(run_dir)
    bundle = model.load_policy(run.checkpoint("final"))
    made = videos.prediction_videos(run, bundle, episodes_per_client=1)
    assert made and all(p.stat().st_size > 0 for p in made)

    page = write_report(reports, title="smoke report")
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # no CDN, no links out
    result = check_page(page)
    assert result["title"] == "smoke report"
    assert result["refused_requests"] == []
    assert result["charts"] >= 4 and result["charts_drawn"] == result["charts"], result
    assert len(result["videos"]) == len(made)
    assert result["videos_playable"] == len(made), result["videos"]


def test_report_of_a_missing_folder_is_one_clear_line(tmp_path, capsys):
    from zk0lib.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "is not a folder" in err and "reports/demo" in err and "Traceback" not in err


@pytest.mark.parametrize("folder", ["reports/runs/fedavg-1", "reports/runs", "reports/compare/c1", "reports/demo"])
def test_report_of_a_run_a_runs_folder_a_compare_and_the_demo(tmp_path, folder):
    """`zk0 report` of one run's folder (what a user tries after `zk0 train`) writes a page as the
    folders above it do."""
    from zk0lib.cli import main

    reports = tmp_path / "reports"
    _record(reports / "runs", "fedavg-1", **{"fl.strategy": "fedavg"})
    _record(reports / "compare" / "c1" / "runs", "fedprox-s0")
    _record(reports / "compare" / "c1" / "runs", "centralized-s0", kind="centralized")
    _record(reports / "demo" / "runs", "demo-1")
    root = tmp_path / folder
    assert main(["report", str(root)]) == 0
    text = (root / "index.html").read_text()
    expected = {"reports/runs/fedavg-1": ["fedavg-1"], "reports/runs": ["fedavg-1"]}
    expected |= {"reports/compare/c1": ["fedprox-s0", "centralized-s0"], "reports/demo": ["demo-1"]}
    for run_id in expected[folder]:
        assert run_id in text
    assert f"{len(expected[folder])} runs" in text
