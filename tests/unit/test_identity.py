"""One identity state per track: face > Re-ID > gait priority, face votes, settling."""

from __future__ import annotations

import pytest

from stages.identity import FaceSchedule, Named, TrackIdentity

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


# ------------------------------------------------------------------ face schedule (backoff while a box shows no face)
@pytest.mark.parametrize("steps, expected_due", [
    # steps: ("try", frame, found, box height) or ("due?", frame, box height) -> recorded answer
    ([("due?", 0, 100)], [True]),                                                         # never tried: due
    ([("try", 0, True, 100), ("due?", 1, 100), ("due?", 2, 100)], [False, True]),         # a face: every 2 frames
    ([("try", 0, False, 100), ("due?", 2, 100), ("due?", 4, 100)], [False, True]),        # 1 miss: waits 4
    ([("try", 0, False, 100), ("try", 4, False, 100), ("due?", 11, 100), ("due?", 12, 100)], [False, True]),  # 2: waits 8
    ([("try", 0, False, 100), ("try", 4, False, 100), ("try", 12, False, 100), ("try", 28, False, 100),
      ("due?", 43, 100), ("due?", 44, 100)], [False, True]),                              # capped at max_frames (16)
    ([("try", 0, False, 100), ("try", 4, False, 100), ("due?", 6, 124), ("due?", 6, 125)], [False, True]),  # 25 % taller
    ([("try", 0, False, 100), ("try", 4, True, 100), ("due?", 6, 100)], [True]),          # a found face resets the wait
])
def test_face_schedule_backs_off_while_a_box_shows_no_face(steps: list, expected_due: list) -> None:
    sched = FaceSchedule(every_n=2, max_frames=16)
    got = []
    for step in steps:
        if step[0] == "try":
            sched.tried(step[1], step[2], step[3])
        else:
            got.append(sched.due(step[1], step[2]))
    assert got == expected_due


def test_face_schedule_without_backoff_and_with_a_short_cap() -> None:
    off = FaceSchedule(every_n=3, max_frames=None)
    short = FaceSchedule(every_n=3, max_frames=2)  # a cap below every_n waits every_n
    for sched in (off, short):
        for frame in (0, 3, 6):
            sched.tried(frame, False, 50)
        assert sched.wait == 3 and sched.due(9, 50) and not sched.due(8, 50)


@pytest.mark.parametrize("kwargs", [dict(every_n=0, max_frames=4), dict(every_n=2, max_frames=0),
                                    dict(every_n=2, max_frames=4, regrow=1.0)])
def test_face_schedule_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="FaceSchedule"):
        FaceSchedule(**kwargs)
