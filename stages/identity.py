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
(:meth:`TrackIdentity.needs_face`). The tracker's
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
class TrackIdentity:
    """Everything recognition knows about one open track's identity.

    Attributes:
        votes: its face votes.
        named: the decision in force (None: none was ever taken).
        snapped: True once its snapshot was taken.
    """

    votes: TrackVotes = field(default_factory=TrackVotes)
    named: Named | None = None
    snapped: bool = False

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
