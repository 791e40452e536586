"""A consensus base: the coordinate-wise median of several fine-tunes' weights, for a fleet whose base is unknown.

The base-model transfer score (decree.transfer) needs the model the encoders were fine-tuned from. An auditor often
holds only the fine-tunes. Fine-tunes of one pre-trained model stay close to it in weight space, each moved a little
in its own direction; a backdoor is one such private move. The coordinate-wise median of several of them lands
near their common base: every move that only a minority of the members made (any one member's backdoor) is voted
out, the natural features they all inherit stay. `--base ARCH=A --base ARCH=B --base ARCH=C` builds this base
from the named members (measured against the true base on the tune families: bench/README.md).

The median tolerates fewer than half the members sharing one backdoor: members holding the same trigger would
carry it into the consensus, and their trojans' triggers would then transfer (specific_pl1 = PL1: no worse than
without a base, never a false alarm). It means nothing for members that are not fine-tunes of one model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .encoders import Encoder
from .errors import CheckpointError

MIN_MEMBERS = 3  # a median of two is their mean: one backdoored member would move it halfway
MAX_MEMBERS = 15  # every member is held in memory while the median is taken
MEMBERS = 5  # picked from a listing by `--base ARCH=consensus`: 3 to 14 separated alike on the tune CLIP family


def spread(items: Sequence, k: int) -> list:
    """`k` of `items` spread evenly over their order (all of them when there are no more than `k`): the members
    `--base ARCH=consensus` picks from a listing."""
    if len(items) <= k:
        return list(items)
    step = (len(items) - 1) / (k - 1)
    return [items[round(i * step)] for i in range(k)]


def median_state_dict(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The coordinate-wise median of state dicts with the same keys and shapes (integer buffers too: a batch
    norm's step counter; a tie between the two middle values takes the lower, as torch.median does)."""
    if not states:
        raise ValueError("no members")
    keys = list(states[0])
    for i, sd in enumerate(states[1:], 1):
        if set(sd) != set(keys):
            raise CheckpointError(f"consensus member {i + 1} has other weights than member 1")
    out = {}
    for k in keys:
        first = states[0][k]
        if any(sd[k].shape != first.shape for sd in states):
            raise CheckpointError(f"consensus members disagree on the shape of {k}")
        if first.dtype == torch.bool:
            out[k] = first.clone()
            continue
        stack = torch.stack([sd[k].to(torch.float32 if first.is_floating_point() else torch.int64) for sd in states])
        out[k] = stack.median(dim=0).values.to(first.dtype)
    return out


def finite(encoder: Encoder) -> bool:
    """All weights and buffers finite: one NaN in a member would be the median's wherever it sits in the middle."""
    return all(bool(torch.isfinite(t).all()) for t in encoder.backbone.state_dict().values() if t.is_floating_point())


def consensus_encoder(members: Sequence[Encoder]) -> Encoder:
    """An encoder with the members' architecture and the first member's preprocessing, holding the median of
    their weights. The members are left unchanged."""
    if not MIN_MEMBERS <= len(members) <= MAX_MEMBERS:
        raise ValueError(f"a consensus base needs {MIN_MEMBERS} to {MAX_MEMBERS} members, got {len(members)}")
    arch = members[0].arch
    if any(m.arch != arch for m in members):
        raise CheckpointError("consensus members must share one architecture")
    import copy

    base = copy.deepcopy(members[0])
    base.backbone.load_state_dict(median_state_dict([m.backbone.state_dict() for m in members]))
    return base.eval().requires_grad_(False)
