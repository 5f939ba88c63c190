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

A released claim (its value null) can be taken again, and so can a claim whose holder is gone (the
process on this host no longer lives, or the claim from another host is older than
``OPTIFLOW_STALE_AFTER``: :func:`optiflow.heartbeat.gone`): the next process takes it over by a
compare-and-set on the dead holder's value, which one writer wins.  A claim whose work is done
(:func:`settle`) holds a note instead of a holder and is never taken again.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import optuna

from optiflow import heartbeat

PREFIX = "optiflow.claim."


def claim(study: optuna.Study, name: str) -> bool:
    """Whether this process took the claim ``name`` on ``study`` (False: a live process holds it, or its work is
    done); a claim whose holder is gone is taken over."""
    key, token = PREFIX + name, heartbeat.stamp()
    backend = _backend(study)
    if isinstance(backend, optuna.storages.RDBStorage):
        if _claim_row(backend, study._study_id, key, token, None):
            return True
        held = backend.get_study_system_attrs(study._study_id).get(key)
        return held is not None and _dead(held) and _claim_row(backend, study._study_id, key, token, held)
    with _journal_lock(backend):
        held = backend.get_study_system_attrs(study._study_id).get(key)
        if held is not None and not _dead(held):
            return False
        backend.set_study_system_attr(study._study_id, key, token)
        return True


def settle(study: optuna.Study, name: str, note: str) -> None:
    """Mark the claim ``name`` done (``note`` says how): no process takes it again, dead holder or not."""
    backend = _backend(study)
    with _journal_lock(backend):
        backend.set_study_system_attr(study._study_id, PREFIX + name, f"done: {note}")


def release(study: optuna.Study, name: str) -> None:
    """Free the claim ``name`` so that a later process can take it."""
    backend = _backend(study)
    with _journal_lock(backend):
        backend.set_study_system_attr(study._study_id, PREFIX + name, None)


def holder(study: optuna.Study, name: str) -> str | None:
    """Who holds the claim ``name`` (host, process and time), None when nobody does."""
    held = _backend(study).get_study_system_attrs(study._study_id).get(PREFIX + name)
    if held is None:
        return None
    try:
        host, pid, at = held.split(" ")
        return f"{host} pid {int(pid)} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(at)))}"
    except ValueError:
        return str(held)


def _dead(held: str) -> bool:
    """Whether the process holding a claim (its value, a heartbeat stamp) is gone."""
    return heartbeat.gone({heartbeat.TAG: held}) is not None


def _backend(study: optuna.Study) -> optuna.storages.BaseStorage:
    storage = study._storage
    inner = getattr(storage, "_backend", None)  # an RDB storage comes wrapped in Optuna's cache
    return inner if isinstance(inner, optuna.storages.RDBStorage) else storage


def _claim_row(storage: optuna.storages.RDBStorage, study_id: int, key: str, token: str, old: str | None) -> bool:
    """Set the claim's row to ``token`` where it holds ``old`` (None: where it is free or missing)."""
    from optuna.storages._rdb.models import StudySystemAttributeModel as Attribute
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    session = storage.scoped_session()
    try:
        retaken = session.execute(update(Attribute).where(Attribute.study_id == study_id, Attribute.key == key,
                                                          Attribute.value_json == json.dumps(old))
                                  .values(value_json=json.dumps(token)))
        if not getattr(retaken, "rowcount", 0):
            if old is not None:
                session.rollback()
                return False
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
