"""Membership inference (`zk0 audit`): the stratified AUC by hand, and the audit of a real Flower run's policy."""

import json
import shutil

import numpy as np
import pytest

from zk0lib import membership
from zk0lib.config import ConfigError
from zk0lib.runs import RunRecord


def test_stratified_auc_compares_members_only_with_non_members_of_their_own_client():
    # client a is hard (high losses), b easy; within each, members score higher (lower loss) than non-members
    a = (np.array([-1.0, -1.1]), np.array([-1.5, -1.6]))
    b = (np.array([-0.1, -0.2]), np.array([-0.3]))
    assert membership.stratified_auc([a, b]) == 1.0
    pooled = (np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    assert membership.stratified_auc([pooled]) == pytest.approx(10 / 12)  # b's non-member beats a's members
    assert membership.stratified_auc([(np.zeros(3), np.zeros(2))]) == 0.5  # ties count half
    assert membership.stratified_auc([(np.array([0.0, 2.0]), np.array([1.0]))]) == 0.5
    assert np.isnan(membership.stratified_auc([(np.array([1.0]), np.array([]))]))
    rng = np.random.default_rng(0)
    few = [(rng.normal(1, 1, 5), rng.normal(0, 1, 5))]
    many = [(rng.normal(1, 1, 200), rng.normal(0, 1, 200))]
    lo_few, hi_few = membership.auc_interval(few, 500, 1)
    lo, hi = membership.auc_interval(many, 500, 1)
    assert lo < membership.stratified_auc(many) < hi and hi - lo < hi_few - lo_few
    assert 0.66 < lo < hi < 0.86  # two unit normals one apart: AUC = Phi(1 / sqrt 2) = 0.76


def test_audit_of_the_smoke_run_scores_members_and_non_members_on_the_same_frames(smoke_run, home, tmp_path):
    out = smoke_run[0]
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "e2e-smoke"
    shutil.copytree(home / "reports" / "runs" / "e2e-smoke", run_dir)
    final = run_dir / "checkpoints" / "final"
    lines = []
    # the policy as its own reference: calibration must then cancel exactly, episode by episode
    result = membership.audit(
        run_dir, members_per_client=3, frames_per_episode=4, reference=str(final), progress=lines.append
    )
    cfg = RunRecord(run_dir).config()
    assert result["members"] == 3 * len(cfg.data.clients)
    assert result["non_members"] == sum(len(row["non_members"]) for row in result["clients"].values()) >= 2
    assert 0.0 <= result["auc"] <= 1.0 and result["auc_ci"][0] <= result["auc"] <= result["auc_ci"][1]
    assert result["auc_calibrated"] == 0.5 and result["auc_calibrated_ci"] == [0.5, 0.5]
    for row in result["clients"].values():
        assert not set(row["members"]) & set(row["non_members"])
        assert row["reference_episode_loss"] == row["episode_loss"]
        assert all(np.isfinite(v) and v > 0 for v in row["episode_loss"]["members"].values())
    saved = json.loads((run_dir / "membership.json").read_text())
    assert saved["auc"] == result["auc"]
    assert RunRecord(run_dir).summary()["membership"]["auc_ci"] == result["auc_ci"]
    assert any("non-members" in line for line in lines)
    text = "\n".join(membership.describe(result))
    assert "loss attack: AUC" in text and "calibrated by" in text
    # the results table, notebook 04 and the app read it from the summary
    from zk0lib import report

    assert report.runs_table(tmp_path).set_index("run_id").loc["e2e-smoke", "membership_auc"] == result["auc"]
    frame = report.privacy_frame([RunRecord(run_dir)])
    assert frame.loc[0, "budget"] == "no DP" and frame.loc[0, "membership_lo"] == result["auc_ci"][0]
    assert "membership_auc" in report.privacy_chart(frame, "membership_auc").to_json()
    # no reference that is a saved policy (the smoke run starts from random weights): the plain attack only
    plain = membership.audit(run_dir, members_per_client=1, frames_per_episode=2)
    assert plain["members"] == len(cfg.data.clients) and "auc_calibrated" not in plain and "reference_note" in plain


def test_audit_refuses_what_it_cannot_audit(smoke_run, home, tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        membership.audit(tmp_path)
    run_dir = tmp_path / "unfinished"
    shutil.copytree(home / "reports" / "runs" / "e2e-smoke", run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(ConfigError, match="did not finish"):
        membership.audit(run_dir)
    local = tmp_path / "local"
    shutil.copytree(home / "reports" / "runs" / "e2e-smoke", local)
    RunRecord(local).update_summary(kind="local-only")  # as `zk0 baseline local-only` records it
    with pytest.raises(ConfigError, match="local-only run has one model per owner"):
        membership.audit(local)
