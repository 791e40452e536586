"""`--base ARCH=consensus`: the consensus base's members picked from the scan's own listing.

A fleet whose base model is unknown still holds many fine-tunes of it. The job reads the first WINDOW encoders
the source lists, and for each architecture named `consensus` takes decree.consensus.MEMBERS of them spread evenly over the
listing order; each worker builds their coordinate-wise median (decree.consensus) as that architecture's base.
The members are scanned like every other encoder and named in the job summary; the resolved list enters the
settings key, so a resumed run over the same listing reuses its rows.

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


def pick_members(tasks: Iterator[EncoderTask], archs: list[str], members: int | None = None, window: int = WINDOW
                 ) -> tuple[Iterator[EncoderTask], dict[str, list[str]]]:
    """(the same tasks, none lost, none twice; {arch: member uris}) from the first `window` listed. Only encoders
    whose architecture the listing already names (manifest, --arch) and single-file checkpoints are candidates."""
    from decree.consensus import MEMBERS, spread  # the driver's first torch import (the fleet pass needs it anyway)

    ahead = list(itertools.islice(tasks, window))
    picked = {}
    for arch in archs:
        candidates = [t.uri for t in ahead if t.status == "pending" and t.arch == arch and not is_shard_index(t.uri)]
        picked[arch] = spread(list(dict.fromkeys(candidates)), members or MEMBERS)
    return itertools.chain(ahead, tasks), picked


def resolve(bases, picked: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """`bases` with each `ARCH=consensus` replaced by one `ARCH=uri` per member."""
    out = []
    for arch, source in bases:
        out += [(arch, uri) for uri in picked.get(arch, [])] if source == CONSENSUS else [(arch, source)]
    return tuple(out)
