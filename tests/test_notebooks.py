"""The notebooks: committed clean, parameterized for papermill, and batch runs (sweeps) that record."""

import json
from pathlib import Path

import nbformat
import pytest

from zk0lib.batch import parse_grid, point_id
from zk0lib.workbook import NOTEBOOKS, notebooks_dir

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean_and_parameterized(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name} is committed with outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and code[0] is tagged[0], "one `parameters` cell, the first code cell"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert notebooks_dir() == NB_DIR


def test_grid_points():
    points = parse_grid(["fl.proximal_mu=0,0.01", "fl.strategy=fedavg,fedprox"])
    assert points == [
        {"fl.proximal_mu": "0", "fl.strategy": "fedavg"},
        {"fl.proximal_mu": "0", "fl.strategy": "fedprox"},
        {"fl.proximal_mu": "0.01", "fl.strategy": "fedavg"},
        {"fl.proximal_mu": "0.01", "fl.strategy": "fedprox"},
    ]
    assert point_id(points[3]) == "proximal_mu-0.01_strategy-fedprox"
    with pytest.raises(ValueError, match="expected key=v1,v2"):
        parse_grid(["fl.strategy"])


def _summary_output(executed: Path) -> dict:
    nb = nbformat.read(executed, as_version=4)
    [cell] = [c for c in nb.cells if "summary" in c.metadata.get("tags", [])]
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    return json.loads(text)


def test_sweep_streams_the_notebooks_progress_to_the_terminal(sweep_cli):
    out = sweep_cli[1]
    lines = out.stdout.splitlines()
    # notebook 02's own progress lines, as its cells print them, behind the notebook's number
    for expected in ("  02 | round 0/1", "  02 | round 1/1", "  04 | "):
        assert any(line.startswith(expected) for line in lines), (expected, out.stdout[-3000:])
    assert "without encryption" not in out.stdout + out.stderr  # kernels over IPC: no Jupyter TCP warning


def test_two_point_sweep_runs_papermill_and_tabulates(sweep_dir):
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == ["completed", "completed"]
    runs = sorted(p.name for p in (sweep_dir / "runs").iterdir())
    assert runs == ["00-strategy-fedavg", "01-strategy-fedprox"]
    table = (sweep_dir / "runs.csv").read_text().strip().splitlines()
    assert len(table) == 3 and "fedavg" in table[1] + table[2] and "fedprox" in table[1] + table[2]
    assert (sweep_dir / "runs.md").read_text().count("\n| 0") == 2

    # What the papermill-run notebook displays is what its run folder records.
    executed = nbformat.read(sweep_dir / "00-strategy-fedavg" / "02_federated_training.ipynb", as_version=4)
    outputs = [o.get("data", {}) for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/svg+xml" in d for d in outputs) >= 2  # charts drawn to SVG: they render with no network
    assert not any("cdn.jsdelivr" in str(d.get("text/html", "")) for d in outputs)  # nothing loads from a CDN
    shown = _summary_output(sweep_dir / "00-strategy-fedavg" / "02_federated_training.ipynb")
    summary = json.loads((sweep_dir / "runs" / "00-strategy-fedavg" / "summary.json").read_text())
    rounds = [
        json.loads(x) for x in (sweep_dir / "runs" / "00-strategy-fedavg" / "metrics.jsonl").read_text().splitlines()
    ]
    assert shown["strategy"] == "fedavg" and shown["rounds"] == "1/1" and shown["local_steps"] == 2
    assert shown["final_loss"] == pytest.approx(summary["final"]["loss"], rel=1e-12)
    assert shown["final_loss"] == pytest.approx(rounds[-1]["eval"]["mean"]["loss"], rel=1e-12)
    assert shown["action_mae"] == pytest.approx(rounds[-1]["eval"]["mean"]["action_mae"], rel=1e-12)
    chart = json.loads((sweep_dir / "runs" / "00-strategy-fedavg" / "charts" / "train.vl.json").read_text())
    values = next(iter(chart["datasets"].values()))
    plotted = {(v["client"], v["metric"]): v["value"] for v in values}
    for client, m in rounds[1]["train"]["clients"].items():
        assert plotted[(client, "train_loss")] == pytest.approx(m["train_loss"], rel=1e-12)
        assert m["proximal_mu"] == 0  # fedavg runs without FedProx's term
    fedprox = [json.loads(x) for x in (sweep_dir / "runs" / "01-strategy-fedprox" / "metrics.jsonl").open()]
    assert all(m["proximal_mu"] == 0.01 for m in fedprox[1]["train"]["clients"].values())
    assert fedprox[-1]["eval"]["mean"]["loss"] != rounds[-1]["eval"]["mean"]["loss"]  # two different runs


def test_sweep_records_failed_points_and_goes_on(home, zk0_cli):
    out = zk0_cli("sweep", "--preset", "smoke", "--sweep-id", "t-fail", "--grid", "fl.client_num_cpus=999,998")
    assert out.returncode == 1 and "0 completed, 2 failed" in out.stdout
    sweep_dir = home / "reports" / "sweeps" / "t-fail"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == ["failed", "failed"]
    assert "fl.client_num_cpus=999 but this machine has" in record["points"][0]["error"]
    summary = json.loads((sweep_dir / "runs" / "00-client_num_cpus-999" / "summary.json").read_text())
    assert summary["status"] == "failed" and "client_num_cpus" in summary["error"]
    table = (sweep_dir / "runs.csv").read_text()
    assert table.count("failed") == 2  # the results notebook ran after the failures


def test_results_app_loads_in_headless_chromium(sweep_dir, home):
    from zk0lib.appcheck import check_app

    shot = home / "reports" / "app-check.png"
    result = check_app(sweep_dir / "runs", shot, expect="01-strategy-fedprox")
    assert result["title"] == "zk0 results"
    assert shot.stat().st_size > 10_000  # a real picture of the page


def test_publish_dry_run_loads_with_lerobot_and_states_the_numbers(sweep_dir, zk0_cli, tmp_path):
    import subprocess
    import sys

    run_dir = sweep_dir / "runs" / "01-strategy-fedprox"
    out = zk0_cli(
        "publish", str(run_dir), "--repo-id", "someone/zk0-smoke", "--dry-run", "--out", str(tmp_path / "pub")
    )
    assert out.returncode == 0, out.stderr[-2000:]
    card = (tmp_path / "pub" / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"held-out loss {summary['final']['loss']:.4f}" in card
    assert "fedprox (proximal mu 0.01)" in card and "license: apache-2.0" in card and "## How to load it" in card
    assert (tmp_path / "pub" / "zk0_run" / "metrics.jsonl").exists()
    load = (
        "from zk0lib.model import ensure_tiny_vlm; ensure_tiny_vlm();"
        "from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy;"
        f"p = SmolVLAPolicy.from_pretrained({str(tmp_path / 'pub')!r}); print(type(p).__name__)"
    )
    loaded = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and "SmolVLAPolicy" in loaded.stdout, loaded.stderr[-2000:]

    offline = zk0_cli("publish", str(run_dir), "--repo-id", "someone/zk0-smoke", "--out", str(tmp_path / "pub2"))
    assert offline.returncode == 1 and "HF_HUB_OFFLINE is set: not uploading" in offline.stderr
