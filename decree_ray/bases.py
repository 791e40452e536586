"""`--base ARCH=consensus`: the consensus base's members picked from the scan's own listing.

A fleet whose base model is unknown still holds many fine-tunes of it. The job reads the first WINDOW encoders
the source lists, and for each architecture named `consensus` takes decree.consensus.MEMBERS of them (those whose
uri's digest sorts first: decree.consensus.pick); each worker groups them into fine-tunes of one model and builds each group's
coordinate-wise median (decree.consensus) as the base of the encoders near it. By default (`--consensus`) every
architecture the listing names at least MIN_MEMBERS times and no --base covers is picked for the same way.
The members are scanned like every other encoder and named in the job summary; an architecture's resolved members
enter its settings key, so a resumed run over the same listing reuses its rows, and new members of one
architecture rescan that architecture alone.

Members are the audited party's files. The median votes out a backdoor that fewer than half of them share;
members chosen to share one trigger only bring their trojans back to PL1 alone (a trigger that transfers keeps
its area), and a consensus that is no model at all makes every natural trigger look specific: loud false alarms
across the architecture, never a silent pass (SECURITY.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from .sources import EncoderTask, is_shard_index

CONSENSUS = "consensus"
WINDOW = 1000  # listed encoders read ahead to pick them from (tasks are small; the scan starts after)


def wanted(bases) -> list[str]:
    return [arch for arch, source in bases if source == CONSENSUS]


def pick_members(tasks: Iterator[EncoderTask], archs: list[str], members: int | None = None, window: int = WINDOW,
                 auto_except: set[str] | None = None) -> tuple[Iterator[EncoderTask], dict[str, list[str]], list[str]]:
    """(the same tasks, none lost, none twice; {arch: member uris}; the archs picked by default) from the first
    `window` listed. Only encoders whose architecture the listing already names (manifest, --arch) and single-file
    checkpoints are candidates. With `auto_except`, also every other architecture with at least MIN_MEMBERS
    candidates that is not in it."""
    from decree.consensus import MEMBERS, MIN_MEMBERS, pick  # the driver's first torch import (the fleet pass needs it)

    ahead = list(itertools.islice(tasks, window))
    candidates: dict[str, list[str]] = {}
    for t in ahead:
        if t.status == "pending" and t.arch and not is_shard_index(t.uri):
            candidates.setdefault(t.arch, []).append(t.uri)
    candidates = {a: list(dict.fromkeys(uris)) for a, uris in candidates.items()}
    auto = [] if auto_except is None else [
        a for a, uris in candidates.items() if a not in archs and a not in auto_except and len(uris) >= MIN_MEMBERS]
    picked = {arch: pick(candidates.get(arch, []), members or MEMBERS) for arch in [*archs, *auto]}
    return itertools.chain(ahead, tasks), picked, auto


def resolve(bases, picked: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """`bases` with each `ARCH=consensus` replaced by one `ARCH=uri` per member, then the members of the
    architectures picked by default."""
    out = []
    for arch, source in bases:
        out += [(arch, uri) for uri in picked.get(arch, [])] if source == CONSENSUS else [(arch, source)]
    named = {arch for arch, _ in bases}
    return tuple(out) + tuple((arch, uri) for arch, uris in picked.items() if arch not in named for uri in uris)
