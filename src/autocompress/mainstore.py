"""The phase store of a run over several processes: rank 0 owns it, every rank sees it.

Under ``torch.distributed`` (``torchrun``) only rank 0 opens the run folder and writes to it (a
:class:`autocompress.runfolder.RunFolder`, or the in-memory :class:`autocompress.rounds.PhaseStore`); the
other ranks ask rank 0 (:func:`autocompress.distributed.on_main`): whether a phase is done, a finished
phase's payload, the records. So the run folder only has to exist where rank 0 runs (another node's disk
need not see it), the ranks never disagree about what is done, and an error of rank 0's store (a damaged
file, a folder in use) is raised on every rank.
"""
from __future__ import annotations

from typing import Any

from . import distributed
from .rounds import PhaseStore


class MainStore(PhaseStore):
    """``store`` (rank 0's; None on the other ranks) as every rank sees it (see the module docstring)."""

    def __init__(self, store: PhaseStore | None):
        super().__init__()
        self.store = store

    @property
    def records(self) -> list[dict]:
        return distributed.on_main(lambda: self.store.records)

    def is_done(self, round_index: Any, phase: str) -> bool:
        return distributed.on_main(lambda: self.store.is_done(round_index, phase))

    def load(self, round_index: int, phase: str) -> Any:
        return distributed.on_main(lambda: self.store.load(round_index, phase))

    def save(self, round_index: int, phase: str, payload: Any) -> None:
        distributed.on_main(lambda: self.store.save(round_index, phase, payload), share=False)

    def load_epoch(self, round_index: int, phase: str) -> dict | None:
        return distributed.on_main(lambda: self.store.load_epoch(round_index, phase))

    def save_epoch(self, round_index: int, phase: str, payload: dict) -> None:
        distributed.on_main(lambda: self.store.save_epoch(round_index, phase, payload), share=False)

    def record(self, record: dict) -> None:
        distributed.on_main(lambda: self.store.record(record), share=False)

    def finish(self, round_index: Any, phase: str, records: list[dict]) -> None:
        distributed.on_main(lambda: self.store.finish(round_index, phase, records), share=False)


__all__ = ["MainStore"]
