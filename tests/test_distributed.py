"""``autocompress.compress`` over ``torch.distributed`` (issue 14): 2 gloo processes on loopback, started with
torchrun's environment (tests/distributed_worker.py is one process). End to end under 2 ranks, the same search
decisions with 1 and 2 processes, parameters / masks / Z / U identical on every rank, resume after a rank was
killed with SIGKILL, refusals (settings that differ between ranks, a world larger than the data) on one line
without a hang; and the single-process fallbacks of :mod:`autocompress.distributed`."""
from __future__ import annotations

import copy
import importlib.util
import json
import multiprocessing
import os
import socket
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from autocompress import distributed
from autocompress.annealing import AnnealingConfig, simulated_annealing

WORKER = Path(__file__).with_name("distributed_worker.py")
CONFIG = {"target": "params=2x", "rounds": 1, "admm": {"epochs": 1, "update_interval": 2}, "retrain": {"epochs": 1},
          "search": {"max_evaluations": 5, "candidates_per_step": 2},
          "quick_eval": {"bn_batches": 2, "val_batches": 2, "finetune_steps": 5}, "latency_runs": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rank(rank: int, ranks: int, port: int, spec_file: Path, log: Path) -> None:
    """One forked process: torchrun's environment, stderr to ``log``, the worker, its exit status."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if ranks > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115 - the process ends with os._exit
    os.dup2(sys.stderr.fileno(), 2)
    status = 1
    try:
        status = _load_worker().main(str(spec_file))
    except BaseException:  # noqa: BLE001 - os._exit below would end the process before Python printed it
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(status)


def launch(tmp: Path, ranks: int, *, run_dir: Path | None = None, **spec) -> list[SimpleNamespace]:
    """Run ``ranks`` worker processes (1: no process group), forked from this one (no second import of torch),
    and return ``returncode``, ``stderr`` and ``results`` (the rank files) in rank order."""
    out = tmp / f"out-{len(list(tmp.glob('out-*')))}"
    out.mkdir()
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps({"out": str(out), "config": CONFIG, "run_dir": run_dir and str(run_dir),
                                     **spec}))
    port, fork = _free_port(), multiprocessing.get_context("fork")
    procs = [fork.Process(target=_rank, args=(rank, ranks, port, spec_file, out / f"stderr{rank}"))
             for rank in range(ranks)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    results = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists() else None
               for r in range(ranks)]
    return [SimpleNamespace(returncode=proc.exitcode, stderr=(out / f"stderr{rank}").read_text(), results=results)
            for rank, proc in enumerate(procs)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    procs = launch(tmp, 2, run_dir=tmp / "run")
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    return tmp, procs[0].results


def test_two_ranks_end_to_end(two_ranks):
    """A compress run under 2 ranks meets the target; parameters and masks at the end of every phase (before
    any broadcast: DDP averaged the gradients), Z and U after every ADMM update and the final model are the
    same on both ranks; only rank 0 wrote the run folder (one metrics record per phase)."""
    tmp, (rank0, rank1) = two_ranks
    assert rank0["compression"] >= 2.0 * 0.99
    assert len(rank0["phases"]) == 4 and len(rank0["zu"]) >= 2  # admm, purify, retrain, compact
    for key in ("phases", "zu", "model", "trajectory", "rates"):
        assert rank0[key] == rank1[key], key
    run = tmp / "run"
    assert (run / "model.pt").is_file() and (run / "report.html").is_file()
    phases = [json.loads(line)["phase"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "phase"]
    assert phases == ["search", "admm", "purify", "retrain", "compact"]
    assert json.loads((run / "state.json").read_text())["done"][-1] == ["final", "final"]
    assert "train_loader: sharded with a DistributedSampler; each optimiser step averages 2 x 8 = 16 items " \
        "(the loader's batch on each of 2 processes; the learning rate is the caller's to scale)" in rank0["log"]
    assert rank1["log"] == []  # rank 0 speaks for the run


def test_one_and_two_processes_make_the_same_search_decisions(two_ranks, tmp_path):
    """2 candidates per step: with 2 ranks each scores one, with 1 process it scores both; the same seed
    gives the same candidates, scores, acceptances and rates."""
    _, (rank0, _) = two_ranks
    (single,) = launch(tmp_path, 1)
    assert single.returncode == 0, single.stderr[-2000:]
    alone = single.results[0]
    assert len(alone["trajectory"]) == CONFIG["search"]["max_evaluations"]
    assert alone["trajectory"] == rank0["trajectory"] and alone["rates"] == rank0["rates"]


def test_resume_after_a_rank_was_killed(two_ranks, tmp_path):
    """Rank 1 is killed (SIGKILL) when masked retraining starts: rank 0 ends with a one-line error instead of
    hanging; started again, the run continues after the purify phase and ends with the uninterrupted run's
    model."""
    _, (uninterrupted, _) = two_ranks
    run = tmp_path / "run"
    killed = launch(tmp_path, 2, run_dir=run, kill_rank_at=[1, "retrain"])
    assert killed[1].returncode == -9
    assert killed[0].returncode == 2 and "another process of the run stopped" in killed[0].stderr
    assert killed[0].stderr.strip().startswith("error: rank 0:") and killed[0].stderr.count("\n") == 1
    done = json.loads((run / "state.json").read_text())["done"]
    assert [1, "purify"] in done and [1, "retrain"] not in done
    resumed = launch(tmp_path, 2, run_dir=run)
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stderr[-2000:]
    rank0 = resumed[0].results[0]
    assert len(rank0["phases"]) == 2  # retrain and compact ran; search, admm and purify were restored
    assert rank0["model"] == uninterrupted["model"] == resumed[0].results[1]["model"]


def test_resume_inside_a_training_phase_loads_rank_0s_epoch_checkpoint_on_every_rank(two_ranks, tmp_path):
    """Both ranks are killed right after the epoch checkpoint of retraining's epoch 1 (of 1) is saved (rank 0
    wrote it); started again, every rank continues from rank 0's state without training that epoch again, and
    the run ends with the uninterrupted run's model."""
    _, (uninterrupted, _) = two_ranks
    run = tmp_path / "run"
    killed = launch(tmp_path, 2, run_dir=run, kill_after_epoch=["round 1 retraining", 1])
    assert [p.returncode for p in killed] == [-9, -9]
    assert (run / "round1" / "retrain.epoch.pt").is_file()
    resumed = launch(tmp_path, 2, run_dir=run)
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stderr[-2000:]
    rank0, rank1 = resumed[0].results
    assert rank0["epochs"] == rank1["epochs"] == []  # main restarted the phase: ["retrain epoch 1/1"]
    assert rank0["model"] == uninterrupted["model"] == rank1["model"]
    assert not (run / "round1" / "retrain.epoch.pt").exists()


@pytest.mark.parametrize("spec, message", [
    ({"rank_config": {"1": {"admm": {"epochs": 1, "update_interval": 2, "lr": 0.02}}}},
     "admm.lr differs between the processes of the run (rank 1 has another value than rank 0)"),
    ({"items": 1}, "train_loader's dataset has 1 item(s), fewer than the 2 processes"),
    ({"run_dir": "a-file/run"}, "cannot write the run folder"),
])
def test_bad_input_is_one_line_on_every_rank(tmp_path, spec, message):
    """Settings that differ between ranks, a world larger than the data, a run folder rank 0 cannot write (its
    parent is a file): the same one-line error on every rank, nothing written, no hang."""
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / spec.pop("run_dir", "run")
    procs = launch(tmp_path, 2, run_dir=run_dir, **spec)
    for proc in procs:
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1
    assert not run_dir.exists()


def test_one_process_costs_nothing():
    """Without a process group: rank 0 of 1, collectives give their input back, loaders and models are used
    as they are."""
    here = distributed.world()
    assert (here.rank, here.size, here.is_main, here.active) == (0, 1, True, False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_object(3) == [3]
    assert distributed.parallel_map(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert distributed.on_main(lambda: 7) == 7
    distributed.check_same({"a": 1})
    loader = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)
    assert distributed.shard_loader(loader) is loader
    model = torch.nn.Linear(2, 2)
    with distributed.data_parallel(model) as runner:
        assert runner is model


@pytest.mark.parametrize("n_train, batch_size, size", [(200, 16, 2), (203, 16, 3), (201, 10, 2), (193, 64, 4)])
def test_cli_loader_shards_split_every_global_batch(n_train, batch_size, size):
    """The CLI's training loader under N processes: every rank steps the same number of times, and the ranks'
    slices of each step, put together in rank order, are exactly the one-process batch of that step (same seed),
    so N processes take the same optimizer steps as one. A last batch smaller than N is left out."""
    from autocompress.cli.workload import ReseededLoader
    from autocompress.data import get_dataset

    splits = get_dataset("fashion-mnist", val_size=100, max_train=n_train, max_test=10)
    whole = ReseededLoader(splits, batch_size)
    steps = -(-n_train // batch_size)
    assert len(whole) == steps
    torch.manual_seed(5)
    expected = list(whole)
    if 0 < n_train % batch_size < size:
        expected, steps = expected[:-1], steps - 1
    shards = []
    for rank in range(size):
        torch.manual_seed(5)
        shards.append(list(whole.shard(rank, size)))
        assert len(shards[-1]) == len(whole.shard(rank, size)) == steps
    for step, (images, labels) in enumerate(expected):
        assert torch.equal(torch.cat([shard[step][0] for shard in shards]), images)
        assert torch.equal(torch.cat([shard[step][1] for shard in shards]), labels)
        assert min(len(shard[step][1]) for shard in shards) >= 1


def test_sync_batchnorm_view_shares_the_model():
    """The SyncBatchNorm view (distributed.sync_batchnorm) holds the model's own parameter and buffer tensors, so
    training it trains the model; the model keeps its BatchNorm classes. In one process SyncBatchNorm computes
    plain BatchNorm: the outputs and the running statistics equal the model's own, step for step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    twin = copy.deepcopy(model)
    view = distributed._sync_batchnorm_view(model)
    assert isinstance(view[1], torch.nn.SyncBatchNorm) and type(model[1]) is torch.nn.BatchNorm2d
    assert view[1].weight is model[1].weight and view[1].running_mean is model[1].running_mean
    x = torch.randn(3, 2, 6, 6)
    assert torch.equal(view.train()(x), twin.train()(x))
    assert torch.equal(model[1].running_mean, twin[1].running_mean) and model[1].num_batches_tracked == 1


def test_candidates_per_step_judges_the_best_of_each_step():
    """K = 3 candidates per step on a known score (minus the distance to a fixed action): every step's best
    candidate is the one judged (only it can be accepted), the bound on evaluations holds, and the decisions do
    not depend on how the scores are computed (a map_fn that scores in reverse order gives the same)."""
    goal = np.array([0.3, 0.6])

    def score(action):
        return -float(np.abs(action - goal).sum())

    def perturb(action, magnitude, rng):
        return np.clip(action + magnitude * rng.standard_normal(action.shape), 0.0, 0.9)

    config = AnnealingConfig(max_evaluations=10, candidates_per_step=3, seed=4)
    plain = simulated_annealing(np.array([0.5, 0.5]), score, perturb, config)
    reverse = simulated_annealing(np.array([0.5, 0.5]), score, perturb, config,
                                  map_fn=lambda fn, items: [fn(x) for x in items[::-1]][::-1])
    assert plain.trajectory == reverse.trajectory
    steps = plain.trajectory[1:]
    assert [len(steps[i:i + 3]) for i in range(0, len(steps), 3)] == [3, 3, 3]  # 1 + 3 + 3 + 3 = 10
    for i in range(0, len(steps), 3):
        group = steps[i:i + 3]
        best = max(range(3), key=lambda j: (group[j]["candidate_score"], -j))
        assert all(not step["accepted"] for j, step in enumerate(group) if j != best)
        assert all(step["candidate_score"] == pytest.approx(score(np.array(step["action"]))) for step in group)
    assert plain.best_score == max(step["candidate_score"] for step in plain.trajectory)


@pytest.mark.skipif(not os.environ.get("AUTOCOMPRESS_TORCHRUN_TEST"),
                    reason="~1 min: set AUTOCOMPRESS_TORCHRUN_TEST=1 (real torchrun, the CLI, Fashion-MNIST)")
def test_cli_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 -m autocompress compress`` on the committed base checkpoint: rank 0 prints
    the final table once, the run folder holds the model at the target."""
    import subprocess

    import yaml

    repo = Path(__file__).resolve().parents[1]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**{k: v for k, v in CONFIG.items() if k != "target"}, "target": "params=3x",
                                      "val_size": 500, "max_train": 1000, "max_test": 500, "batch_size": 64}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "autocompress", "compress", str(repo / "assets/fmnist_cnn_base.pt"),
                           "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1
    final = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()][-1]
    base, compressed = final["rows"]
    assert base["params"] / compressed["params"] >= 3.0 * 0.99


def test_shard_loader_logs_what_one_step_averages(monkeypatch):
    """Under 2 processes the log says how train_loader was sharded and the items one optimiser step averages
    (a user's own DataLoader keeps PyTorch's per-process batch: the global batch is 2 x its batch)."""
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2))
    monkeypatch.setattr(distributed, "all_gather_object", lambda value: [value, value])
    data = TensorDataset(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    lines: list[str] = []
    distributed.shard_loader(DataLoader(data, batch_size=4, shuffle=True), log=lines.append)
    own = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    assert distributed.shard_loader(own, log=lines.append).loader is own  # set to a new epoch every pass (below)
    assert "DistributedSampler; each optimiser step averages 2 x 4 = 8 items" in lines[0]
    assert "sharded by the caller; each optimiser step averages 2 processes' batches (2 x 4 = 8 items" in lines[1]


@pytest.mark.parametrize("size", [1, 2])
def test_a_callers_distributed_sampler_gets_a_new_epoch_every_pass(monkeypatch, size):
    """A fresh user's own DistributedSampler replayed one order in every epoch (nobody called set_epoch): the
    default loop's loader sets a new epoch before each pass, drawn from the global generator, so two passes
    differ, every rank (the same seed) agrees on the permutation it shards, and a reseeded phase replays it.
    The orders are checked against the sampler's own permutation for the drawn epoch, computed here."""
    if size == 2:
        monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2))
        monkeypatch.setattr(distributed, "all_gather_object", lambda value: [value, value])
    data = TensorDataset(torch.arange(40.0)[:, None], torch.zeros(40, dtype=torch.long))

    def orders(rank: int) -> list[list[int]]:
        own = DataLoader(data, batch_size=5, sampler=DistributedSampler(data, num_replicas=2, rank=rank, seed=3))
        torch.manual_seed(11)
        loader = distributed.shard_loader(own)
        assert len(loader) == 4 and loader.dataset is data
        return [[int(x) for batch, _ in loader for x in batch[:, 0]] for _ in range(2)]

    first, second = orders(0)
    assert first != second and orders(0) == [first, second]
    other_first, _ = orders(1)
    assert sorted(first + other_first) == list(range(40))  # the two ranks split one permutation
    torch.manual_seed(11)
    epoch = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
    assert first == permutation[0::2]


def test_ranks_given_another_budget_are_told_budget_not_what_it_derives(monkeypatch):
    """A fresh user gave rank 1 another ``budget`` and was told ``final_retrain_epochs`` differs (the first
    derived setting in the config's order): the target and the budget are compared first. The ranks' hashes are
    simulated (rank 1's budget and what it derives differ); only rank 0 speaks before the check."""
    from autocompress.compress import Compression
    from autocompress.config import SettingError

    gathered = []

    def gather(hashes):
        other = {key: ("x" if key in ("budget", "final_retrain_epochs") else value) for key, value in hashes.items()}
        gathered.append(hashes)
        return [hashes, other]

    monkeypatch.setattr(distributed, "world", lambda: distributed.World(1, 2))
    monkeypatch.setattr(distributed, "all_gather_object", gather)
    data = TensorDataset(torch.randn(32, 1, 6, 6), torch.arange(32) % 2)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    lines: list[str] = []
    with pytest.raises(SettingError, match=r"^budget differs between the processes of the run") as info:
        Compression(model, torch.randn(1, 1, 6, 6), "params=2x", task_args=dict(
            train_loader=DataLoader(data, batch_size=8), val_loader=DataLoader(data, batch_size=8)),
            config={"budget": 2}, device="cpu", progress=False, log=lines.append)
    assert info.value.setting == "budget" and list(gathered[0])[:2] == ["target", "budget"]
    assert lines == []  # rank 1 logs nothing, not even the budget's schedule
