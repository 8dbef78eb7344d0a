"""FedProx step, plain-training equivalence with lerobot, frozen weights, seeded evaluation, bad videos."""

import copy

import pytest
import torch

from zk0lib import data, evaluation, model, train


def _batch(dataset, n=4):
    return torch.utils.data.default_collate([dataset[i] for i in range(n)])


def _stream(dataset, cfg):
    return data.BatchStream(dataset, cfg.train.batch_size, cfg.train.num_workers)


def _fixed(policy, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = policy.config
    return torch.randn(n, c.chunk_size, c.max_action_dim, generator=g), torch.rand(n, generator=g) * 0.9 + 0.05


def test_fedprox_gradient_is_mu_times_drift(fresh_bundle, train_set):
    policy, mu = fresh_bundle.policy, 0.37
    params = [p for _, p in model.trainable_parameters(policy)]
    global_params = [p.detach().clone() for p in params]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    batch = fresh_bundle.preprocessor(_batch(train_set))
    noise, time_ = _fixed(policy, 4)

    def grads(mu_):
        policy.zero_grad(set_to_none=True)
        train.fedprox_backward(policy, copy.copy(batch), global_params, mu_, None, noise, time_)
        return [p.grad.detach().clone() for p in params]

    def traced_grads(mu_):  # the objective written out and differentiated by autograd
        policy.zero_grad(set_to_none=True)
        loss, _ = policy.forward(copy.copy(batch), noise=noise, time=time_)
        prox = sum(((p - w) ** 2).sum() for p, w in zip(params, global_params, strict=True))
        (loss + 0.5 * mu_ * prox).backward()
        return [p.grad.detach().clone() for p in params]

    with_prox, plain, traced = grads(mu), grads(0.0), traced_grads(mu)
    for g_prox, g_plain, g_traced, p, w in zip(with_prox, plain, traced, params, global_params, strict=True):
        torch.testing.assert_close(g_prox - g_plain, mu * (p.detach() - w), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_prox, g_traced, rtol=1e-5, atol=1e-7)
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_proximal_term_value(fresh_bundle, train_set):
    policy = fresh_bundle.policy
    params = [p for _, p in model.trainable_parameters(policy)]
    global_params = [p.detach().clone() - 0.01 for p in params]
    batch = fresh_bundle.preprocessor(_batch(train_set))
    noise, time_ = _fixed(policy, 4)
    policy.zero_grad(set_to_none=True)
    loss, prox = train.fedprox_backward(policy, copy.copy(batch), global_params, 2.0, None, noise, time_)
    n = sum(p.numel() for p in params)
    assert prox.item() == pytest.approx(n * 1e-4, rel=1e-3)
    assert loss.item() == pytest.approx(policy.forward(copy.copy(batch), noise=noise, time=time_)[0].item(), rel=1e-6)


def test_mu_zero_is_lerobot_plain_training(smoke_cfg, clients, stats, train_set):
    """train_round(mu=0) == lerobot's own update_policy on the same batches and RNG: the same weights."""
    from accelerate import Accelerator
    from lerobot.scripts.lerobot_train import update_policy
    from lerobot.utils.logging_utils import AverageMeter, MetricsTracker

    cfg = copy.deepcopy(smoke_cfg)
    cfg.train.local_steps = 3
    ours = model.build_policy(cfg, clients[0].meta, stats)
    theirs = model.build_policy(cfg, clients[0].meta, stats)
    metrics = train.train_round(ours, _stream(train_set, cfg), cfg, server_round=2, partition_id=0, mu=0.0)
    assert metrics["prox_term"] == 0.0 and metrics["steps"] == 3

    policy = theirs.policy
    optimizer, scheduler = train.make_optimizer(policy, cfg.fl.num_rounds * 3, start_step=3)
    seed = train.derive_seed(cfg.seed, 2, 0)
    torch.manual_seed(seed)
    stream = data.batch_stream(train_set, cfg.train.batch_size, 0, seed)
    tracker = MetricsTracker(
        cfg.train.batch_size,
        100,
        4,
        {
            "loss": AverageMeter("loss"),
            "grad_norm": AverageMeter("grdn"),
            "lr": AverageMeter("lr"),
            "update_s": AverageMeter("updt_s"),
        },
    )
    accelerator = Accelerator(cpu=True)
    policy.train()
    for _ in range(3):
        update_policy(
            tracker,
            policy,
            theirs.preprocessor(next(stream)),
            optimizer,
            policy.config.optimizer_grad_clip_norm,
            accelerator,
            scheduler,
        )
    for (name, a), (_, b) in zip(ours.policy.named_parameters(), policy.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert metrics["train_loss_last"] == pytest.approx(tracker.loss.val, rel=1e-6)


def test_round_changes_only_trainable_weights(fresh_bundle, smoke_cfg, train_set):
    before = {n: p.detach().clone() for n, p in fresh_bundle.policy.named_parameters()}
    trainable = dict(model.trainable_parameters(fresh_bundle.policy))
    fingerprint = model.frozen_fingerprint(fresh_bundle.policy)
    metrics = train.train_round(fresh_bundle, _stream(train_set, smoke_cfg), smoke_cfg, 1, 0, mu=0.01)
    changed = [n for n, p in fresh_bundle.policy.named_parameters() if not torch.equal(p, before[n])]
    assert changed and set(changed) <= set(trainable)
    assert model.frozen_fingerprint(fresh_bundle.policy) == fingerprint
    assert metrics["update_norm"] > 0 and metrics["samples"] == smoke_cfg.train.local_steps * smoke_cfg.train.batch_size
    for key in ("train_loss", "train_loss_std", "prox_term", "grad_norm", "lr", "steps", "seconds", "skipped_batches"):
        assert key in metrics


def test_evaluation_is_deterministic(fresh_bundle, smoke_cfg, train_set, heldout_set):
    first = evaluation.evaluate(fresh_bundle, heldout_set, smoke_cfg)
    second = evaluation.evaluate(fresh_bundle, heldout_set, smoke_cfg)
    assert first == second
    assert first["episodes"] == 2 and first["frames"] == smoke_cfg.eval.max_frames
    assert first["loss_ci"][0] <= first["loss"] <= first["loss_ci"][1]
    assert len(first["action_mae_joint"]) == 6
    train.train_round(fresh_bundle, _stream(train_set, smoke_cfg), smoke_cfg, 1, 0, mu=0.0)
    after = evaluation.evaluate(fresh_bundle, heldout_set, smoke_cfg)
    assert after["loss"] != first["loss"]


def test_bootstrap_interval():
    lo, hi = evaluation.bootstrap_ci([[1.0, 2.0, 3.0, 4.0]], 500, seed=0)
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert evaluation.bootstrap_ci([[5.0]], 100, 0) == [5.0, 5.0]
    lo, hi = evaluation.bootstrap_ci([[0.0, 0.0], [10.0, 10.0]], 200, 0)  # stratified: the mean of client means
    assert lo == hi == 5.0


def test_undecodable_batches_are_skipped_and_counted(fresh_bundle, smoke_cfg, corrupted_client, torchcodec):
    """With torchcodec (its error message is matched below)."""
    dataset = data.open_dataset(corrupted_client, corrupted_client.train_episodes, fresh_bundle.config, None)
    cfg = copy.deepcopy(smoke_cfg)
    cfg.train.local_steps, cfg.train.batch_size, cfg.train.max_skipped_fraction = 8, 2, 0.9
    metrics = train.train_round(fresh_bundle, _stream(dataset, cfg), cfg, 1, 0, mu=0.0, client_name="corrupt")
    assert metrics["steps"] == 8 and metrics["skipped_batches"] > 0

    cfg.train.max_skipped_fraction = 0.0
    with pytest.raises(
        RuntimeError,
        match=r"client corrupt in round 1: 1 of \d+ batches could not be read.*decodeAVFrame.*zk0 validate",
    ):
        train.train_round(fresh_bundle, _stream(dataset, cfg), cfg, 1, 0, mu=0.0, client_name="corrupt")


def test_an_explicit_warmup_is_the_warmup_used(fresh_bundle):
    """lerobot shrinks its preset warm-up to short runs (steps / 30,000); train.warmup_steps is kept as given."""
    _, given = train.make_optimizer(fresh_bundle.policy, total_steps=200, start_step=0, warmup_steps=50)
    ramp = [given.lr_lambdas[0](s) for s in (0, 25, 49)]
    assert ramp[0] < 0.05 and 0.4 < ramp[1] < 0.6 and 0.95 < ramp[2] < 1.0  # linear up to step 50
    _, preset = train.make_optimizer(fresh_bundle.policy, total_steps=200, start_step=0)
    assert preset.lr_lambdas[0](25) > 0.95  # the preset's 1,000 warm-up steps became int(1000 * 200 / 30000) = 6
    _, late = train.make_optimizer(fresh_bundle.policy, total_steps=200, start_step=100, warmup_steps=50)
    assert late.lr_lambdas[0](0) == pytest.approx(given.lr_lambdas[0](100))  # round 2 continues the schedule


def test_skipped_batches_are_counted_as_batches_with_their_items_named(fresh_bundle, smoke_cfg, train_set):
    cfg = copy.deepcopy(smoke_cfg)
    cfg.train.local_steps, cfg.train.max_skipped_fraction = 8, 0.125  # one skipped batch allowed
    cfg.train.progress_every_s = 0  # a progress line after every step

    def one_bad_batch_then(stream):
        yield {"__skipped__": ["item 3: bad", "item 4: bad", "item 5: bad"]}
        yield from stream

    stream = one_bad_batch_then(_stream(train_set, cfg).batches(0))
    lines = []  # a long round's progress lines (here one after every step but the last)
    opt = train.make_optimizer(fresh_bundle.policy, 8, 0)
    metrics = train.train_steps(fresh_bundle, stream, *opt, 8, cfg, label="r1", progress=lines.append)
    assert (metrics["steps"], metrics["skipped_batches"], metrics["skipped_items"]) == (8, 1, 3)
    assert [line.split(",")[0] for line in lines] == [f"r1: step {k}/8" for k in range(1, 8)]
    assert all("samples/s" in line and "min left" in line for line in lines)


def test_the_t_interval_keeps_its_coverage_where_a_percentile_bootstrap_does_not():
    """Two clients x 3 held-out episodes (the demo's split), known mean of client means: how often each
    95% interval covers it over 1,000 simulated evaluations."""
    import numpy as np

    rng = np.random.default_rng(0)
    truth, covered = 1.0, {"t": 0, "bootstrap": 0}
    for i in range(1000):
        groups = [list(rng.normal(mu, 0.3, size=3)) for mu in (0.8, 1.2)]
        for name, (lo, hi) in (
            ("t", evaluation.t_interval(groups)),
            ("bootstrap", evaluation.bootstrap_ci(groups, 200, i)),
        ):
            covered[name] += lo <= truth <= hi
    assert 930 <= covered["t"] <= 975, covered
    assert covered["bootstrap"] < 880, covered  # why the default is the t interval
    assert all(np.isfinite(evaluation.t_interval([[1.0, 2.0, 3.0], [5.0]])))  # one episode: the pooled variance
    assert all(np.isnan(evaluation.t_interval([[5.0]])))  # no variance to estimate: no interval


def test_a_nonnegative_metric_interval_stops_at_zero(smoke_cfg):
    import numpy as np

    wide = [[0.1, 3.0], [0.2, 0.1]]  # two clients, spread episodes: the t interval reaches below 0
    assert evaluation.t_interval(wide)[0] < 0
    lo, hi = evaluation.mean_ci(wide, smoke_cfg)
    assert lo == 0.0 and hi == evaluation.t_interval(wide)[1]
    assert all(np.isnan(evaluation.mean_ci([[5.0]], smoke_cfg)))  # no interval stays no interval


def test_best_round_is_chosen_on_validation_not_on_the_reported_test_loss(tmp_path, smoke_cfg, fresh_bundle):
    """Round 1 has the lower test loss, round 2 the lower validation loss: best is round 2, and says so."""
    from zk0lib.book import RoundBook, eval_record
    from zk0lib.runs import RunRecord

    cfg = copy.deepcopy(smoke_cfg)
    cfg.output.run_id, cfg.output.runs_dir = "best-choice", str(tmp_path / "runs")
    book = RoundBook(cfg, RunRecord.create(cfg))

    def judged(test: float, val: float) -> dict:
        result = {"loss": test, "loss_ci": [test, test], "episodes": 2, "frames": 10, "episode_loss": {"0": test}}
        return eval_record(cfg, {"synth-0": result}, {}, {"synth-0": {"loss": val, "episodes": 1}})

    book.checkpoint(1, judged(test=0.5, val=0.9), fresh_bundle)
    book.checkpoint(2, judged(test=0.7, val=0.4), fresh_bundle)
    assert book.best["round"] == 2 and book.best["selected_on"] == "validation"
    assert book.best["selection_loss"] == 0.4 and book.best["loss"] == 0.7  # reported: the test loss
    no_val = eval_record(cfg, {"synth-0": judged(0.1, 0.0)["clients"]["synth-0"]}, {})
    book.checkpoint(3, no_val, fresh_bundle)  # without validation episodes the test loss chooses
    assert book.best["round"] == 3 and book.best["selected_on"] == "test"
    assert (tmp_path / "runs" / "best-choice" / "checkpoints" / "best" / "model.safetensors").exists()


class _DecoderCacheSize(torch.utils.data.Dataset):
    """Decodes one frame of `dataset`, then says how many video decoders the process had open before."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        from lerobot.datasets import video_utils

        before = video_utils._default_decoder_cache.size()
        self.dataset[i]
        return before


def test_loader_workers_do_not_share_the_parents_open_video_files(train_set, torchcodec):
    """Forked workers that read through the parent's cached decoders share its file offsets: random
    'Could not push packet to decoder' errors. Each worker starts with a decoder cache of its own."""
    from lerobot.datasets import video_utils

    train_set[0]  # the parent decodes: its cache now holds the dataset's open video files
    assert video_utils._default_decoder_cache.size() >= 1
    probe = _DecoderCacheSize(train_set)
    loader = torch.utils.data.DataLoader(probe, batch_size=1, num_workers=1, worker_init_fn=data._one_thread_worker)
    seen = [int(b) for b in loader]
    assert seen[0] == 0  # the worker's first read found no inherited decoder
    assert seen[1] >= 1  # and its own cache serves the next one


def test_normalization_comes_from_the_training_episodes_only(clients, tmp_path):
    """The pooled stats are lerobot's merge of the training episodes' own stats: they equal the moments of
    the training frames, not of every frame (stats.json's), and a dataset without per-episode stats is refused."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    from lerobot.datasets.utils import EPISODES_DIR

    client = clients[0]
    assert client.heldout_episodes and client.train_episodes
    frames = pd.concat(pd.read_parquet(f) for f in sorted((client.root / "data").glob("*/*.parquet")))
    train = np.stack(frames[frames.episode_index.isin(client.train_episodes)]["action"].to_numpy())
    every = np.stack(frames["action"].to_numpy())
    stats = data.train_stats(client)
    np.testing.assert_allclose(stats["action"]["mean"], train.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["action"]["std"], train.std(0), rtol=1e-4, atol=1e-5)
    assert int(stats["action"]["count"][0]) == len(train) < len(every)
    assert not np.allclose(stats["action"]["mean"], every.mean(0), atol=1e-4)  # held-out frames would move it
    np.testing.assert_allclose(client.meta.stats["action"]["mean"], every.mean(0), rtol=1e-5, atol=1e-5)
    for camera in client.meta.camera_keys:  # image stats in the shapes lerobot's normalizer reads
        assert stats[camera]["mean"].shape == client.meta.stats[camera]["mean"].shape == (3, 1, 1)
    pooled = data.pooled_train_stats(clients)
    assert int(pooled["action"]["count"][0]) == sum(c.train_frames for c in clients)

    # a dataset whose meta/episodes has no stats columns: refused by name, with the fix
    path = next((client.root / EPISODES_DIR).glob("*/*.parquet"))
    table = pq.read_table(path)
    target = tmp_path / EPISODES_DIR / path.parent.name / path.name
    target.parent.mkdir(parents=True)
    pq.write_table(table.select([c for c in table.column_names if not c.startswith("stats/")]), target)
    stripped = type("Meta", (), {"root": tmp_path, "repo_id": client.repo_id})()
    with pytest.raises(data.MissingEpisodeStatsError, match=f"{client.name}.*no per-episode stats"):
        data.episode_stats(stripped, client.train_episodes, client.name)
