"""Anonymous identities, naming and corrections: the CLI commands' and the API's code, the gallery with its
negative examples, and its reload in a running recognition process.

This module is wiring (like :mod:`pipeline.services`): it joins ``stages`` (the gallery) and ``storage``
(clusters, corrections). Imports are made inside the functions, so a process that only needs one part loads
no more.

- ``facepro identities list --unknown``: :func:`unknown_docs`; ``facepro identities name unknown-17 Alice``:
  :func:`storage.corrections.name_unknown`; ``facepro identities merge A B`` with an ``unknown-<n>``:
  :func:`merge_any`; ``facepro events relabel EVENT --not Bob [--as Carol]``: :func:`relabel_doc`.
- The recognition process builds its gallery with :func:`gallery_from_db` (enrolled embeddings and negative
  examples of its embedder model) and reloads it when the database's gallery changes (:class:`GalleryRefresh`,
  every 2 s): a name given to a cluster, a negative example, an enrollment, a deletion or a merge reaches a
  running pipeline within seconds.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pipeline.config import AppConfig

log = logging.getLogger("facepro.identities")


def gallery_from_db(engine: Any, model_name: str, threshold: float) -> Any:
    """The :class:`stages.gallery.Gallery` of ``model_name`` with its negative examples, from the database.

    Raises:
        StorageError: unreadable database; mixed dimensions.
    """
    from stages.gallery import Gallery
    from storage.queries import load_gallery, load_negatives

    rows = load_gallery(engine, model_name)
    if rows.skipped:
        log.warning("identities enrolled only with another face model are ignored: %s; re-enroll them",
                    ", ".join(sorted(rows.skipped)))
    negatives = load_negatives(engine, model_name) if len(rows.names) else None
    return Gallery(list(rows.names), rows.vectors, threshold=threshold, model_name=model_name, negatives=negatives)


class GalleryRefresh:
    """A runner service of the recognition process: reloads the gallery when the database's changes.

    Every ``interval_s`` it reads :func:`storage.queries.gallery_version` (one aggregate query); when that
    changed it builds the gallery again (:func:`gallery_from_db`) and hands it to ``apply``. A failed read is
    logged and retried at the next poll; the gallery in force stays.

    Args:
        engine: database engine (read only here).
        model_name, threshold: as :func:`gallery_from_db`.
        apply: called with the new gallery.
        interval_s: seconds between polls.
        clock: monotonic seconds (tests inject a fake one).

    Attributes:
        reloads: galleries built since start (the first one not counted).
    """

    def __init__(self, engine: Any, model_name: str, threshold: float, apply: Callable[[Any], None],
                 interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        from storage.queries import gallery_version

        self.engine, self.model_name, self.threshold, self.apply = engine, model_name, threshold, apply
        self.interval_s = interval_s
        self._clock = clock
        self._due = clock() + interval_s
        self._version = gallery_version(engine, model_name)
        self.reloads = 0

    def __call__(self) -> None:
        from storage.db import StorageError
        from storage.queries import gallery_version

        now = self._clock()
        if now < self._due:
            return
        self._due = now + self.interval_s
        try:
            version = gallery_version(self.engine, self.model_name)
            if version == self._version:
                return
            gallery = gallery_from_db(self.engine, self.model_name, self.threshold)
        except StorageError as err:
            log.warning("reloading the gallery failed (retried in %.0f s): %s", self.interval_s, err)
            return
        self._version = version
        self.apply(gallery)
        self.reloads += 1
        log.info("gallery reloaded: %d identities, %d negative examples", len(gallery), gallery.negatives)


def unknown_assigner(cfg: AppConfig) -> Any:
    """The storage process's :class:`storage.unknowns.UnknownAssigner` for ``recognition.face.unknowns``
    (None when disabled); a threshold left null is ``recognition.face.match_threshold``."""
    face = cfg.recognition.face
    u = face.unknowns
    if not u.enabled:
        return None
    from storage.unknowns import UnknownAssigner, UnknownSettings

    follow = face.match_threshold  # the thresholds' default: the one that names a face (README "Unknown faces")
    return UnknownAssigner(UnknownSettings(follow if u.cluster_threshold is None else u.cluster_threshold,
                                           follow if u.merge_threshold is None else u.merge_threshold,
                                           u.min_faces, u.best_faces, u.min_consistency))


def unknown_docs(engine: Any) -> list[dict[str, Any]]:
    """Every anonymous identity (:meth:`storage.unknowns.UnknownRow.to_json`), most recently seen first."""
    from storage.unknowns import list_unknowns

    return [r.to_json() for r in list_unknowns(engine)]


def merge_any(engine: Any, keep: str, other: str) -> str:
    """``facepro identities merge KEEP OTHER`` where either may be an ``unknown-<n>`` cluster; returns the line
    to print.

    - two clusters: OTHER's tracks and events join KEEP;
    - an enrolled KEEP and a cluster OTHER: the cluster is named KEEP (:func:`storage.corrections.name_unknown`);
    - a cluster KEEP and an enrolled OTHER: refused (an enrolled identity never becomes anonymous);
    - two enrolled identities: :func:`storage.queries.merge_identities`.

    Raises:
        ValueError: unknown names, or a cluster KEEP with an enrolled OTHER.
    """
    from storage.corrections import merge_clusters, name_unknown
    from storage.queries import merge_identities
    from storage.unknowns import parse_unknown

    k, o = parse_unknown(keep), parse_unknown(other)
    if k is not None and o is not None:
        moved = merge_clusters(engine, keep, other)
        return f"merged {other} into {keep}: {moved} event(s) moved; {other} deleted"
    if o is not None:
        res = name_unknown(engine, other, keep, must_exist=True)
        return f"merged {other} into {keep}: {res.embeddings} embedding(s) added, {res.events} event(s) relabelled; {other} deleted"
    if k is not None:
        raise ValueError(f"merge: {other} is enrolled and {keep} anonymous; name the cluster instead: "
                         f"facepro identities merge {other} {keep}")
    res = merge_identities(engine, keep, other)
    return f"merged {other} into {keep}: {res.embeddings} embedding(s) and {res.events} event(s) moved; {other} deleted"


def name_doc(engine: Any, unknown: str, name: str) -> dict[str, Any]:
    """Name cluster ``unknown`` (:func:`storage.corrections.name_unknown`): ``{"unknown", "name", "created",
    "embeddings", "events"}``."""
    from storage.corrections import name_unknown

    res = name_unknown(engine, unknown, name)
    return {"unknown": res.unknown, "name": res.name, "created": res.created, "embeddings": res.embeddings,
            "events": res.events}


def relabel_doc(engine: Any, cfg: AppConfig, event_id: str, not_name: str | None, as_name: str | None) -> dict[str, Any]:
    """Correct one event (:func:`storage.corrections.relabel_event`; an event that becomes unknown is clustered
    with ``cfg``'s settings): ``{"event_id", "identity", "unknown", "negative_of", "added_to"}``."""
    from storage.corrections import relabel_event

    res = relabel_event(engine, event_id, not_name, as_name, unknown_assigner(cfg))
    return {"event_id": res.event_id, "identity": res.identity, "unknown": res.unknown,
            "negative_of": res.negative_of, "added_to": res.added_to}


# ------------------------------------------------------------------------------ CLI

IDENTITIES_HELP = ("enrolled identities: list [--unknown] | delete NAME | merge KEEP OTHER (OTHER's embeddings and "
                   "events go to KEEP; either may be an unknown-<n> cluster) | name unknown-<n> NAME")


def identities_arguments(sp: Any) -> None:
    """The arguments of ``facepro identities`` (an argparse sub-parser)."""
    sp.add_argument("action", choices=["list", "delete", "merge", "name"])
    sp.add_argument("name", nargs="?")
    sp.add_argument("other", nargs="?", help="merge: the identity merged into NAME and deleted; name: the name to give")
    sp.add_argument("--unknown", action="store_true", help="list: the anonymous identities (unknown-<n>) instead")
    sp.add_argument("--json", action="store_true", help="list --unknown: one JSON document per line")


def events_arguments(sp: Any) -> None:
    """The arguments ``facepro events`` has for anonymous identities and corrections (an argparse sub-parser)."""
    sp.add_argument("action", nargs="?", choices=["relabel"], help="relabel: correct one event's identity")
    sp.add_argument("event", nargs="?", help="relabel: the event id (32 hex digits)")
    sp.add_argument("--not", dest="not_name", metavar="NAME", help="relabel: the event is not NAME (stored as a negative example)")
    sp.add_argument("--as", dest="as_name", metavar="NAME", help="relabel: the event is NAME (its face is added to NAME)")
    sp.add_argument("--unknown", metavar="unknown-N", help="only the events of this anonymous identity")


def print_unknowns(engine: Any, as_json: bool) -> int:
    """``facepro identities list --unknown``: one line per cluster (or one JSON document per line)."""
    import json

    for doc in unknown_docs(engine):
        if as_json:
            print(json.dumps(doc))
            continue
        sample = f"sample event {doc['sample_event']} ({doc['sample_snapshot']})" if doc["sample_event"] else "no sample"
        print(f"{doc['name']:<16} {doc['tracks']:>5} track(s) {doc['events']:>5} event(s)  first {doc['first_seen']}  "
              f"last {doc['last_seen']}  {sample}")
    return 0


def print_named(engine: Any, unknown: str, name: str) -> int:
    """``facepro identities name unknown-17 NAME``."""
    doc = name_doc(engine, unknown, name)
    made = "new identity" if doc["created"] else "added to the enrolled identity"
    print(f"named {unknown} {name} ({made}): {doc['embeddings']} embedding(s), {doc['events']} event(s) relabelled; "
          f"{unknown} deleted")
    return 0


def print_relabelled(engine: Any, cfg: AppConfig, event_id: str, not_name: str | None, as_name: str | None) -> int:
    """``facepro events relabel EVENT --not NAME [--as NAME]``."""
    doc = relabel_doc(engine, cfg, event_id, not_name, as_name)
    done = []
    if doc["negative_of"]:
        done.append(f"stored a negative example of {doc['negative_of']}")
    if doc["added_to"]:
        done.append(f"added its face to {doc['added_to']}")
    now = doc["identity"] or doc["unknown"] or "unknown"
    print(f"event {event_id}: {', '.join(done)}; now {now}")
    return 0
