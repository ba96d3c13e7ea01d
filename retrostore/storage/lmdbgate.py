"""One LMDB environment's transactions in this process, kept apart from its map resizes.

A process's handles on one store share one LMDB environment (``ChunkTable``'s registry).
When another process grows the map (a large commit), this process's next transaction fails with
``MDB_MAP_RESIZED`` until it adopts the new size with ``mdb_env_set_mapsize``, and a writer
grows its own map the same way when a transaction fills it. ``mdb_env_set_mapsize`` unmaps and
remaps the file, so "the caller must make sure that there are no active transactions in this
process" (``lmdb.h``), and py-lmdb invalidates the transactions and cursors open at the time.
Threads that each read through their own handle failed with "Attempt to operate on
closed/deleted/dropped object" and ``mdb_txn_begin: Invalid argument`` while another process
committed (reported as a damaged file, which it was not). :class:`EnvGate` counts the
transactions open in this process and resizes only when none is.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Iterator

import lmdb

from ..errors import RetrostoreError

__all__ = ["EnvGate"]

_GATES: "weakref.WeakSet[EnvGate]" = weakref.WeakSet()


class EnvGate:
    """The transactions of one LMDB environment in this process, and its map resizes.

    Parameters
    ----------
    env : lmdb.Environment
        The environment every transaction and resize goes through.
    """

    def __init__(self, env: lmdb.Environment):
        self.env = env
        self._cond = threading.Condition()
        self._active = 0  # transactions open, all threads
        self._resizing = False  # a resize waits for them: new ones wait for it (no starving)
        self._mine = threading.local()  # .n: those of the calling thread
        #: In a forked child: transactions the parent had open at the fork (their copies here must
        #: never be aborted: that would clear the parent's reader slots, see ChunkTable).
        self.open_at_fork = 0
        _GATES.add(self)

    def _enter(self) -> None:
        mine = getattr(self._mine, "n", 0)
        with self._cond:
            if not mine:  # a thread inside a transaction goes on: the resize waits for it
                self._cond.wait_for(lambda: not self._resizing)
            self._active += 1
        self._mine.n = mine + 1

    def _exit(self) -> None:
        self._mine.n -= 1
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    @contextlib.contextmanager
    def txn(self, write: bool = False) -> Iterator[lmdb.Transaction]:
        """A transaction (committed on a normal exit, aborted on an exception); one that finds
        the map grown by another process adopts its size first (:meth:`resize` with 0)."""
        while True:
            self._enter()
            try:
                txn = self.env.begin(write=write)
                break
            except lmdb.MapResizedError:
                self._exit()
                self.resize(0)
            except BaseException:
                self._exit()
                raise
        try:
            with txn:
                yield txn
        finally:
            self._exit()

    def close(self) -> None:
        """Close the environment once the transactions other threads have open in it end (helper-53:
        ``Store.close()`` while another thread read through the handle pulled the map from under the
        read, which failed as "damaged")."""
        with self._cond:
            mine = getattr(self._mine, "n", 0)
            self._cond.wait_for(lambda: self._active <= mine)
            self.env.close()

    def resize(self, size: int) -> None:
        """``env.set_mapsize(size)`` (0: the size another process set) once no transaction of
        this environment is open in this process; new ones wait until it is done. When
        another thread is already resizing, waits for it and returns (the caller retries).

        Raises
        ------
        RetrostoreError
            The calling thread itself holds a transaction of this environment (an iteration
            over records still running while the same thread reads more): the map cannot be
            remapped under it.
        """
        with self._cond:
            if getattr(self._mine, "n", 0):
                raise RetrostoreError(
                    f"{self.env.path()}: another process grew the LMDB map while this thread holds a read "
                    "transaction of it (an iteration over records not finished): finish or close that "
                    "iteration, then read again")
            if self._resizing:  # another thread is at it: use the map it sets
                self._cond.wait_for(lambda: not self._resizing)
                return
            self._resizing = True
            try:
                self._cond.wait_for(lambda: self._active == 0)
                self.env.set_mapsize(size)
            finally:
                self._resizing = False
                self._cond.notify_all()


_held: list[EnvGate] = []  # the gates whose locks a fork took


def _before_fork() -> None:
    """Take every gate's lock (held briefly by its users), so that a child copies consistent counts."""
    _held[:] = list(_GATES)
    for gate in _held:
        gate._cond.acquire()


def _after_fork_in_parent() -> None:
    for gate in _held:
        gate._cond.release()
    _held.clear()


def _after_fork_in_child() -> None:
    for gate in _held:
        gate.open_at_fork = gate._active
        gate._cond = threading.Condition()  # (the copy of the parent's lock is held: a fresh one)
        gate._active, gate._resizing, gate._mine = 0, False, threading.local()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
