"""Claims: of several processes sharing one study, exactly one does a thing (creates the parent run, refits a trial).

A claim is a system attribute ``optiflow.claim.<name>`` of the user's own study, holding who took it
(host, process, time); taking it is an atomic insert-if-free through the storage, so no other study is
created and optuna-dashboard shows only the user's:

- on an RDB storage (SQLite, PostgreSQL, MySQL) a row in Optuna's ``study_system_attributes`` table, whose
  unique (study, key) constraint lets exactly one insert succeed; a released claim is taken back by an
  ``UPDATE ... WHERE value is null``, which one writer wins;
- on a journal file a check-and-set under a lock file beside the journal (``<journal>.optiflow-claims.lock``,
  there only while a process holds it);
- in memory (one process) a plain check-and-set.

A released claim (its value null) can be taken again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

import optuna

PREFIX = "optiflow.claim."


def claim(study: optuna.Study, name: str) -> bool:
    """Whether this process took the claim ``name`` on ``study`` (False: another process holds it)."""
    key, token = PREFIX + name, f"{socket.gethostname()} pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
    backend = _backend(study)
    if isinstance(backend, optuna.storages.RDBStorage):
        return _claim_row(backend, study._study_id, key, token)
    with _journal_lock(backend):
        if backend.get_study_system_attrs(study._study_id).get(key) is not None:
            return False
        backend.set_study_system_attr(study._study_id, key, token)
        return True


def release(study: optuna.Study, name: str) -> None:
    """Free the claim ``name`` so that a later process can take it."""
    backend = _backend(study)
    with _journal_lock(backend):
        backend.set_study_system_attr(study._study_id, PREFIX + name, None)


def holder(study: optuna.Study, name: str) -> str | None:
    """Who holds the claim ``name`` (host, process and time), None when nobody does."""
    return _backend(study).get_study_system_attrs(study._study_id).get(PREFIX + name)


def _backend(study: optuna.Study) -> optuna.storages.BaseStorage:
    storage = study._storage
    inner = getattr(storage, "_backend", None)  # an RDB storage comes wrapped in Optuna's cache
    return inner if isinstance(inner, optuna.storages.RDBStorage) else storage


def _claim_row(storage: optuna.storages.RDBStorage, study_id: int, key: str, token: str) -> bool:
    from optuna.storages._rdb.models import StudySystemAttributeModel as Attribute
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    session = storage.scoped_session()
    try:
        retaken = session.execute(update(Attribute).where(Attribute.study_id == study_id, Attribute.key == key,
                                                          Attribute.value_json == json.dumps(None))
                                  .values(value_json=json.dumps(token)))
        if not getattr(retaken, "rowcount", 0):
            session.add(Attribute(study_id=study_id, key=key, value_json=json.dumps(token)))
        session.commit()
        return True
    except IntegrityError:  # the unique (study_id, key) row exists: another process holds the claim
        session.rollback()
        return False
    finally:
        session.close()


@contextlib.contextmanager
def _journal_lock(backend: optuna.storages.BaseStorage) -> Iterator[None]:
    """The lock serializing claims on a journal file's study; none is needed elsewhere."""
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage

    if not (isinstance(backend, JournalStorage) and isinstance(backend._backend, JournalFileBackend)):
        yield
        return
    lock = JournalFileSymlinkLock(backend._backend._file_path + ".optiflow-claims")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
