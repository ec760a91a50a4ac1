"""Who a track is: one state object per open track, with its face votes and the decision.

Recognition names a track by three methods in a fixed priority, face > Re-ID >
gait (:data:`PRIORITY`):

- **face**: every quality face of the track votes (an enrolled name, or
  unknown); the name with a strict majority of the votes wins
  (:class:`TrackVotes`). A face decision replaces any other; a face majority
  that is lost clears only a face decision.
- **Re-ID**: a link to an earlier named track replaces anything but a face
  decision.
- **gait**: names only a track that never had a decision.

:class:`TrackIdentity` holds all of that for one track, plus whether its
snapshot was taken, and says what work the track still needs
(:meth:`TrackIdentity.needs_face`) and when its next face analysis is due
(:class:`FaceSchedule`: a track whose box showed no face is looked at less
and less often). The tracker's
:class:`~pipeline.messages.TrackUpdate` carries a copy of the decision to
storage; this object is where it is made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

#: Naming methods, strongest first.
PRIORITY: tuple[str, ...] = ("face", "reid", "gait")


@dataclass(frozen=True)
class Named:
    """The identity decision of a track: name (or None), method (``face``/``reid``/``gait`` or None) and score
    (the cosine similarity behind it)."""

    identity: str | None
    method: str | None
    score: float


@dataclass
class TrackVotes:
    """Face votes of one track: the identity with a strict majority of face observations wins.

    Unknown faces vote for "unknown"; so a track seen 5 times unknown and once
    as "X" stays unknown. ``score`` is the best similarity of the winning identity.
    """

    votes: Counter = field(default_factory=Counter)
    best: dict = field(default_factory=dict)
    current: str | None = None  # the face decision last taken for the track

    def add(self, identity: str | None, similarity: float) -> None:
        self.votes[identity] += 1
        if identity is not None:
            self.best[identity] = max(self.best.get(identity, -1.0), similarity)

    def settled(self, votes_needed: int | None) -> bool:
        """True once one choice (a name, or unknown) holds at least ``votes_needed`` votes and a strict
        majority: more face work could no longer change the decision without that many contrary votes
        (None: never settled)."""
        if votes_needed is None or not self.votes:
            return False
        _, count = self.votes.most_common(1)[0]
        return count >= votes_needed and count * 2 > sum(self.votes.values())

    def decision(self) -> tuple[str | None, float]:
        total = sum(self.votes.values())
        known = [(n, c) for n, c in self.votes.items() if n is not None]
        if not known:
            return None, 0.0
        name, count = max(known, key=lambda nc: (nc[1], self.best[nc[0]]))
        if count * 2 <= total:  # no strict majority of the track's face observations
            return None, 0.0
        return name, float(self.best[name])


@dataclass
class FaceSchedule:
    """When a track's next face analysis is due: backing off while its box shows no face.

    Face analysis runs on a camera's face frames (every ``face.every_n_frames``
    detector frames). A track whose analysis found no face in its box (a person
    seen from behind, too far away, occluded) waits twice as long before the
    next one: ``every_n``, ``2 every_n``, ``4 every_n`` ... frames, at most
    ``max_frames``; a found face (even one the quality gate rejects: the face
    is there) resets the wait to ``every_n``, and so does a box grown by
    ``regrow`` (1.25: 25 % taller) since the last miss, a person coming closer.
    The same exponential backoff as a retry policy, applied to the question "is
    there a face in this box yet?"; it bounds the work spent on tracks that
    never show a face while a face that appears is looked at within
    ``max_frames``.

    Args:
        every_n: frames between face analyses of a track that shows a face (>= 1).
        max_frames: longest wait after misses, frames (at least ``every_n``); None: no backoff (every face frame).
        regrow: box height ratio that ends a backoff (> 1).

    Raises:
        ValueError: ``every_n < 1``, ``max_frames < 1`` or ``regrow <= 1``.
    """

    every_n: int
    max_frames: int | None
    regrow: float = 1.25
    misses: int = 0
    last_try: int | None = None
    miss_height: float = 0.0

    def __post_init__(self) -> None:
        if self.every_n < 1 or (self.max_frames is not None and self.max_frames < 1) or self.regrow <= 1:
            raise ValueError(f"FaceSchedule: every_n ({self.every_n}) and max_frames ({self.max_frames}) must be >= 1 "
                             f"(max_frames may be None), regrow ({self.regrow}) > 1")

    @property
    def wait(self) -> int:
        """Frames from the last analysis to the next one, after ``misses`` misses in a row."""
        if self.max_frames is None or self.misses == 0:
            return self.every_n
        return max(self.every_n, min(self.max_frames, self.every_n << min(self.misses, 30)))

    def due(self, frame_index: int, box_height: float) -> bool:
        """True if an analysis of the track is due at ``frame_index`` (its box ``box_height`` pixels tall)."""
        if self.last_try is None or frame_index - self.last_try >= self.wait:
            return True
        return self.misses > 0 and box_height >= self.regrow * self.miss_height

    def tried(self, frame_index: int, found: bool, box_height: float) -> None:
        """Record an analysis at ``frame_index``: ``found`` a face in the box or not."""
        self.last_try = frame_index
        self.misses = 0 if found else self.misses + 1
        self.miss_height = 0.0 if found else float(box_height)


@dataclass
class TrackIdentity:
    """Everything recognition knows about one open track's identity.

    Attributes:
        votes: its face votes.
        named: the decision in force (None: none was ever taken).
        snapped: True once its snapshot was taken.
        schedule: when its next face analysis is due (None until the first one: see :meth:`face_schedule`).
    """

    votes: TrackVotes = field(default_factory=TrackVotes)
    named: Named | None = None
    snapped: bool = False
    schedule: FaceSchedule | None = None

    def face_schedule(self, every_n: int, max_frames: int | None) -> FaceSchedule:
        """The track's :class:`FaceSchedule`, made with these settings on first use."""
        if self.schedule is None:
            self.schedule = FaceSchedule(every_n, max_frames)
        return self.schedule

    def needs_face(self, settle_votes: int | None) -> bool:
        """True until the face votes are settled (see :meth:`TrackVotes.settled`)."""
        return not self.votes.settled(settle_votes)

    def face_vote(self, identity: str | None, similarity: float) -> Named | None:
        """Add one face vote; returns the new decision when the vote changed the face decision and that
        change is to be applied (see the module docstring), else None."""
        self.votes.add(identity, similarity)
        return self.face_decision()

    def face_decision(self) -> Named | None:
        """The face decision, if it differs from the last one taken and is to be applied; records it as taken."""
        identity, score = self.votes.decision()
        if identity == self.votes.current:
            return None
        self.votes.current = identity
        if identity is None and (self.named is None or self.named.method != "face"):
            return None  # a lost face majority clears only a face decision
        return Named(identity, "face" if identity else None, score)

    def accepts(self, method: str) -> bool:
        """True if a decision by ``method`` (``reid`` or ``gait``) may replace the one in force."""
        if method == "gait":
            return self.named is None
        return self.named is None or self.named.method != "face"

    def decide(self, named: Named) -> bool:
        """Put ``named`` in force; True if it differs from the decision in force."""
        if self.named == named:
            return False
        self.named = named
        return True
