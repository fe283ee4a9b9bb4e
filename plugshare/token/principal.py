"""Who is asking: the principals the token authenticates, and the answer it gives them."""

from __future__ import annotations

import attrs

OWNER_KIND = "owner"
APP_KIND = "app"
PEER_KIND = "peer"
LINK_KIND = "link"  # a share link: an outside client limited to one share (links.py)


@attrs.frozen(slots=True)
class Principal:
    """An authenticated caller. Only the token makes these (`authenticate`, `verify_peer`,
    `Token.owner`); their roles are looked up at decision time, so removing an app or peer,
    or changing its roles, takes effect at once even for principals already handed out."""

    kind: str  # "owner" | "app" | "peer" | "link"
    id: str  # "owner", the app name, the peer's node id, or the link id
    label: str = attrs.field(init=False, eq=False, repr=False)  # "kind:id", as logged

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "label", f"{self.kind}:{self.id}")


OWNER = Principal(OWNER_KIND, "owner")


@attrs.frozen(slots=True)
class Decision:
    """The token's answer to one request."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed
