"""One identity state per track: face > Re-ID > gait priority, face votes, settling."""

from __future__ import annotations

import pytest

from stages.identity import Named, TrackIdentity

ALICE_REID = Named("alice", "reid", 0.95)
BOB_GAIT = Named("bob", "gait", 0.99)


def _apply(ident: TrackIdentity, step: tuple) -> None:
    """One step: ("face", name, similarity) votes; ("reid"|"gait", Named) proposes a link."""
    if step[0] == "face":
        decided = ident.face_vote(step[1], step[2])
        if decided is not None:
            ident.decide(decided)
    elif ident.accepts(step[0]):
        ident.decide(step[1])


@pytest.mark.parametrize("steps, expected", [
    ([], None),
    ([("face", "carol", 0.6)], Named("carol", "face", 0.6)),
    ([("face", None, 0.1)], None),                                            # unknown faces decide nothing
    ([("reid", ALICE_REID)], ALICE_REID),
    ([("gait", BOB_GAIT)], BOB_GAIT),
    ([("reid", ALICE_REID), ("gait", BOB_GAIT)], ALICE_REID),                 # gait names only an undecided track
    ([("gait", BOB_GAIT), ("reid", ALICE_REID)], ALICE_REID),                 # Re-ID replaces gait
    ([("face", "carol", 0.6), ("reid", ALICE_REID)], Named("carol", "face", 0.6)),  # nothing replaces a face decision
    ([("reid", ALICE_REID), ("face", "carol", 0.6)], Named("carol", "face", 0.6)),
    ([("face", "carol", 0.6), ("face", None, 0.1), ("face", None, 0.1)],
     Named(None, None, 0.0)),                                                 # a lost face majority clears the face name
    ([("reid", ALICE_REID), ("face", "carol", 0.6), ("face", None, 0.1)], Named(None, None, 0.0)),  # 1 of 2 is no majority
    ([("reid", ALICE_REID), ("face", None, 0.1), ("face", None, 0.1)], ALICE_REID),  # unknown faces do not clear a Re-ID link
])
def test_decision_priority_face_over_reid_over_gait(steps: list, expected: Named | None) -> None:
    ident = TrackIdentity()
    for step in steps:
        _apply(ident, step)
    assert ident.named == expected


def test_a_track_needs_face_work_until_its_votes_settle() -> None:
    ident = TrackIdentity()
    for _ in range(2):
        ident.face_vote("carol", 0.6)
    assert ident.needs_face(3) and ident.needs_face(None)
    ident.face_vote("carol", 0.7)
    assert not ident.needs_face(3) and ident.needs_face(None)
