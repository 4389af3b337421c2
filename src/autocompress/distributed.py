"""Several processes, one run: ``torch.distributed`` as the pipeline sees it (launched by ``torchrun``, or a
process group the caller initialised).

Everything here degrades to one process at no cost when ``torch.distributed`` is not initialised (or has
one process): :func:`world` says rank 0 of 1, collectives return their input, :func:`data_parallel` yields
the model itself.

* **World**: :func:`world` (rank, size, local rank, ``is_main``), :func:`init_from_env` (what the CLI does
  under ``torchrun``: ``env://`` rendezvous, gloo on the CPU, NCCL on CUDA, device ``cuda:LOCAL_RANK``).
* **Collectives** (:func:`broadcast_object`, :func:`broadcast_tensors`, :func:`all_gather_object`): they
  run under the process group's timeout (:func:`init_from_env` sets ``timeout_s``); a process that died or
  timed out ends every other one with a :class:`~autocompress.errors.UserError` saying so
  (:func:`lost_process`), never a hang.
* **Rank 0 decides** (:func:`on_main`): a function runs on rank 0 only (files, the final table) and its
  result, or its error, reaches every rank.
* **Same inputs everywhere**: :func:`check_same` (hashes of every setting, one line naming the first that
  differs) and :func:`check_data` (a world larger than the data, loaders of unequal length).
* **Data-parallel training**: :func:`shard_loader` (a ``DistributedSampler`` over the caller's map-style
  dataset), :func:`data_parallel` (``DistributedDataParallel``, optionally ``SyncBatchNorm``),
  :func:`sync_tensors` (rank 0's values on every rank, where float sums could drift apart), and
  :func:`parallel_map` (items scored by their owner rank, results gathered on every rank).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import distributed as dist
from torch import nn

from .errors import SettingError, UserError

#: default timeout of the process group :func:`init_from_env` creates (seconds)
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistributedConfig:
    """Settings of a run over several processes (ignored in a single process).

    Attributes:
        shard_data: True: a ``torch.utils.data.DataLoader`` over a map-style dataset with the default
            sampler (shuffled or not) is re-built per rank with a ``DistributedSampler`` for the training
            phases (per-rank batch = the loader's batch size). False: the training loader is used as given:
            the caller's loader is already sharded per rank (same number of batches on every rank). A loader
            whose sampler is already a ``DistributedSampler`` is always used as given; a loader with a
            ``shard(rank, size)`` method is asked for each rank's share.
        sync_batchnorm: train with ``SyncBatchNorm`` (BatchNorm statistics over the global batch); otherwise
            each rank normalises its own batch and rank 0's running statistics are kept after each phase.
    """

    shard_data: bool = True
    sync_batchnorm: bool = False

    def __post_init__(self):
        for name in ("shard_data", "sync_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name}={getattr(self, name)!r} must be true or false", f"write {name}: true")


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` in ``[0, size)``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.size > 1


def world() -> World:
    """The current world: from ``torch.distributed`` when it is initialised, else rank 0 of 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local)


def launched() -> bool:
    """Whether this process was started as one of several by a launcher (``WORLD_SIZE`` > 1, as torchrun
    sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str = "auto", timeout_s: float | None = None) -> bool:
    """Join the process group a launcher (``torchrun``) describes in the environment (``env://``: RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless one exists or ``WORLD_SIZE`` <= 1. Backend: NCCL when
    ``device`` is CUDA (or ``"auto"`` with CUDA available; the process then uses ``cuda:LOCAL_RANK``), gloo
    otherwise. ``timeout_s`` (default env ``AUTOCOMPRESS_DIST_TIMEOUT_S`` or 1800) bounds every collective.

    Returns True when this call created the group (the caller destroys it with :func:`finish`).

    Raises:
        UserError: the rendezvous fails (another process did not come, a wrong address).
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    timeout = float(timeout_s or os.environ.get("AUTOCOMPRESS_DIST_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"cannot join the process group ({_first_line(exc)})",
                        "start every process with the same torchrun rendezvous (--rdzv-endpoint / "
                        "MASTER_ADDR and MASTER_PORT)") from None
    return True


def finish() -> None:
    """Destroy the process group (after :func:`init_from_env` created it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str | torch.device) -> str | torch.device:
    """The device of this rank: ``"auto"`` or ``"cuda"`` become ``cuda:LOCAL_RANK`` when several processes
    share CUDA devices; anything else is returned as given."""
    here = world()
    if here.active and str(device) in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{here.local_rank % torch.cuda.device_count()}"
    return device


# --- collectives -------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def lost_process(exc: BaseException) -> UserError:
    """The error every surviving rank raises when a collective fails (a process died, was killed or did not
    reach the collective within the timeout)."""
    return UserError(f"rank {world().rank}: another process of the run stopped or timed out "
                     f"({_first_line(exc)})", "see the other processes' output for the cause; with a run_dir, "
                     "start the same command again to continue from the last finished phase")


#: words of the RuntimeError messages gloo and NCCL raise when a peer is gone or a collective timed out
_BACKEND_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")


@contextlib.contextmanager
def collective(only_backend_errors: bool = False) -> Iterator[None]:
    """Turn the failure of a collective (``RuntimeError`` from gloo / NCCL) into :func:`lost_process`;
    ``only_backend_errors``: only errors the backend raised (for a body that also runs the caller's code)."""
    try:
        yield
    except UserError:
        raise
    except RuntimeError as exc:
        backend = isinstance(exc, getattr(dist, "DistError", ())) \
            or any(word in str(exc).lower() for word in _BACKEND_WORDS)
        if only_backend_errors and not backend:
            raise
        raise lost_process(exc) from None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself in one process."""
    if not world().active:
        return obj
    box = [obj]
    with collective():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process."""
    if not world().active:
        return [obj]
    gathered: list = [None] * world().size
    with collective():
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (in place; any dtype, on the backend's device) with rank ``src``'s values."""
    if not world().active:
        return
    with collective(), torch.no_grad():
        for tensor in tensors:
            if tensor.dtype == torch.bool:  # NCCL has no bool type: through uint8
                staged = tensor.to(torch.uint8)
                dist.broadcast(staged, src=src)
                tensor.copy_(staged.bool())
            else:
                dist.broadcast(tensor, src=src)


def sync_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank (ADMM's Z and U, masks, parameters after training:
    float sums on different data or in a different order could make them drift apart by rounding)."""
    broadcast_tensors([t for t in tensors if isinstance(t, torch.Tensor)], src=0)


def sync_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers in ``model`` on every rank."""
    sync_tensors(list(model.state_dict().values()))


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the bytes of ``tensors`` (to compare them across ranks)."""
    sha = hashlib.sha256()
    for tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        sha.update(str((tuple(data.shape), data.dtype)).encode())
        sha.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return sha.hexdigest()


def on_main(fn: Callable[[], Any], *, share: bool = True) -> Any:
    """``fn()`` on rank 0 only; its result (``share``; else None on the other ranks) or its error reaches
    every rank: a UserError is raised as the same UserError everywhere, any other exception on rank 0 as a
    RuntimeError naming it on the others. In one process: ``fn()``."""
    here = world()
    if not here.active:
        return fn()
    outcome, error = None, None
    if here.is_main:
        try:
            outcome = fn()
        except BaseException as exc:  # noqa: BLE001 - every rank must hear of it, then rank 0 re-raises
            error = exc
        message = None if error is None else (isinstance(error, UserError), str(error) or type(error).__name__)
        broadcast_object((message, outcome if share and error is None else None))
        if error is not None:
            raise error
        return outcome
    message, outcome = broadcast_object(None)
    if message is not None:
        user, text = message
        raise UserError(text) if user else RuntimeError(f"rank 0 failed: {text}")
    return outcome


def parallel_map(fn: Callable[[Any], Any], items: Sequence) -> list:
    """``[fn(item) for item in items]``, with item ``i`` computed by rank ``i % size`` and the results
    gathered on every rank (each result must be picklable). In one process: the plain list."""
    here = world()
    if not here.active:
        return [fn(item) for item in items]
    mine = {index: fn(items[index]) for index in range(here.rank, len(items), here.size)}
    merged: dict = {}
    for part in all_gather_object(mine):
        merged.update(part)
    return [merged[index] for index in range(len(items))]


# --- same inputs on every rank ---------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def check_same(settings: dict) -> None:
    """UserError (a :class:`SettingError` naming the first differing setting, in the order of rank 0's
    settings) unless ``settings`` (nested plain data: the config, a model digest, ...) are equal on every
    rank. Only hashes travel. No-op in one process."""
    here = world()
    if not here.active:
        return
    hashes = {key: hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()
              for key, value in _flatten(settings).items()}
    gathered = all_gather_object(hashes)
    for key in list(gathered[0]) + sorted(set().union(*gathered) - set(gathered[0])):
        ranks = [rank for rank, theirs in enumerate(gathered) if theirs.get(key) != gathered[0].get(key)]
        if ranks:
            raise SettingError(key, f"{key} differs between the processes of the run (rank {ranks[0]} has "
                               "another value than rank 0)", "give every process the same settings, model and data")


def check_data(loader: Iterable, name: str = "train_loader") -> None:
    """UserError unless ``loader`` can feed every rank: a dataset with at least one item per process, and
    the same number of batches on every rank (data-parallel training steps in lockstep). No-op in one
    process."""
    here = world()
    if not here.active:
        return
    dataset = getattr(loader, "dataset", None)
    items = length(dataset)
    if items is not None and items < here.size:
        raise UserError(f"{name}'s dataset has {items} item(s), fewer than the {here.size} processes",
                        "use fewer processes or more data")
    batches = all_gather_object(length(loader))
    if len(set(batches)) > 1:
        raise UserError(f"{name} yields a different number of batches per process ({batches})",
                        "give every process the same number of batches (e.g. a DistributedSampler), "
                        "or let autocompress shard a plain DataLoader (distributed.shard_data)")


def length(obj: Any) -> int | None:
    """``len(obj)`` (a loader's batches per pass, a dataset's items), or None when it has no length."""
    try:
        return len(obj)
    except TypeError:
        return None


# --- data-parallel training -------------------------------------------------------------------------------
class _PhaseSampler(torch.utils.data.DistributedSampler):
    """A ``DistributedSampler`` whose shuffle seed comes from its own generator, drawn once per pass
    (``generator``: seeded identically on every rank, so the ranks agree on the permutation and each takes its
    share; no ``set_epoch`` calls needed)."""

    def __init__(self, dataset, *, shuffle: bool, generator: torch.Generator):
        here = world()
        super().__init__(dataset, num_replicas=here.size, rank=here.rank, shuffle=shuffle)
        self.generator = generator

    def __iter__(self):
        self.epoch = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=self.generator))
        return super().__iter__()


class _EpochedLoader:
    """A caller's loader whose ``DistributedSampler`` gets ``set_epoch`` before every pass, as a training loop of
    one's own would call it: without it the sampler replays one order in every epoch (a fresh user's 2-process
    run did). The epoch number is drawn from the global generator, which each phase seeds alike on every rank and
    an epoch checkpoint saves, so the ranks agree and a resumed epoch replays its order. Everything else is the
    loader's (``len``, attributes)."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __iter__(self):
        self.loader.sampler.set_epoch(int(torch.randint(0, 2 ** 31 - 1, (1,))))
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)


def _epoched(loader: Iterable) -> Iterable:
    """``loader``, as an :class:`_EpochedLoader` when its sampler is a caller's ``DistributedSampler``."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler) and not isinstance(sampler, _PhaseSampler):
        return _EpochedLoader(loader)
    return loader


def shard_loader(loader: Iterable, *, shard_data: bool = True, name: str = "train_loader",
                 log: Callable[[str], None] | None = None) -> Iterable:
    """The training loader of this rank.

    In one process, with ``shard_data=False`` or a loader already sharded (its sampler is a
    ``DistributedSampler``): ``loader`` itself (a caller's ``DistributedSampler`` set to a new epoch before every
    pass: :class:`_EpochedLoader`). A loader with a ``shard(rank, size)`` method: what it returns
    (a loader of its own kind knows how to split itself). Otherwise a ``DataLoader`` over the same map-style dataset,
    batch size, collate function and workers with a ``DistributedSampler`` (shuffled when ``loader``
    shuffled; the shuffle seed drawn from the global generator now, identical on every rank when the phase
    is seeded). Checked with :func:`check_data`.

    ``log`` is told how the loader was sharded and what one optimiser step averages (the global batch).

    Raises:
        UserError: ``loader`` cannot be sharded (not a DataLoader, an iterable-style dataset, a custom sampler
            or batch sampler), or the data is too small for the processes.
    """
    here = world()
    if not here.active:
        return _epoched(loader)
    data = torch.utils.data
    sampler = getattr(loader, "sampler", None)
    log = log or (lambda _line: None)
    batch = getattr(loader, "batch_size", None)
    per_step = f"{here.size} x {batch} = {here.size * batch}" if isinstance(batch, int) else f"{here.size} batches"
    if shard_data and callable(getattr(loader, "shard", None)):
        loader = loader.shard(here.rank, here.size)
        log(f"{name}: split across {here.size} processes by its own shard(rank, size)")
    elif not shard_data or isinstance(sampler, data.DistributedSampler):
        loader = _epoched(loader)
        log(f"{name}: sharded by the caller; each optimiser step averages {here.size} processes' batches "
            f"({per_step} items; the learning rate is the caller's to scale)")
    else:
        plain = isinstance(loader, data.DataLoader) and not isinstance(loader.dataset, data.IterableDataset) \
            and isinstance(sampler, (data.RandomSampler, data.SequentialSampler)) \
            and loader.batch_size is not None and type(loader.batch_sampler) is data.BatchSampler
        if not plain:
            raise UserError(f"{name} cannot be sharded across processes (only a DataLoader over a map-style "
                            "dataset with the default sampler, or a loader with shard(rank, size), can)",
                            f"shard {name} per rank yourself and set distributed.shard_data: false")
        if length(loader.dataset) is not None and len(loader.dataset) < here.size:
            check_data(loader, name)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
        sampler = _PhaseSampler(loader.dataset, shuffle=isinstance(sampler, data.RandomSampler), generator=generator)
        loader = data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                                 num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                 pin_memory=loader.pin_memory, drop_last=loader.drop_last, timeout=loader.timeout,
                                 worker_init_fn=loader.worker_init_fn,
                                 persistent_workers=loader.persistent_workers)
        log(f"{name}: sharded with a DistributedSampler; each optimiser step averages {per_step} items "
            f"(the loader's batch on each of {here.size} processes; the learning rate is the caller's to scale)")
    check_data(loader, name)
    return loader


def _sync_batchnorm_view(model: nn.Module) -> nn.Module:
    """A module tree computing what ``model`` computes, sharing its parameters and buffers (the same tensor
    objects), with every BatchNorm as a ``SyncBatchNorm``; ``model`` itself is not changed."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(copy.copy(model))
    view = copy.copy(model)
    view._modules = {name: None if child is None else _sync_batchnorm_view(child)
                     for name, child in model._modules.items()}
    return view


@contextlib.contextmanager
def data_parallel(model: nn.Module, *, sync_batchnorm: bool = False) -> Iterator[nn.Module]:
    """The module a training phase steps: ``model`` wrapped in ``DistributedDataParallel`` (gradients
    averaged over the ranks in backward; ``SyncBatchNorm`` over a view sharing ``model``'s tensors when
    ``sync_batchnorm``). Parameters are rank 0's at the start (DDP broadcasts them) and parameters and
    buffers are rank 0's again at the end (:func:`sync_module`). In one process: ``model`` itself.

    Raises:
        UserError: a process stopped during the phase (:func:`lost_process`).
    """
    if not world().active:
        yield model
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    trained = _sync_batchnorm_view(model) if sync_batchnorm else model
    with collective():
        wrapped = nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None)
    with collective(only_backend_errors=True), warnings.catch_warnings():  # forward / loss errors stay the caller's
        # a compacted 1x1 conv's weight gradient (a fresh user's [80, 45, 1, 1]) can come with other strides than
        # DDP's bucket view of it: DDP warns once per such layer on every rank; one extra copy, nothing to act on
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        yield wrapped
    sync_module(model)


__all__ = ["DEFAULT_TIMEOUT_S", "DistributedConfig", "World", "all_gather_object", "broadcast_object",
           "broadcast_tensors", "check_data", "check_same", "collective", "data_parallel", "digest", "finish",
           "init_from_env", "launched", "local_device", "lost_process", "on_main", "parallel_map", "shard_loader",
           "sync_module", "sync_tensors", "world"]
