"""A consensus base: the coordinate-wise median of several fine-tunes' weights, for a fleet whose base is unknown.

The base-model transfer score (decree.transfer) needs the model the encoders were fine-tuned from. An auditor often
holds only the fine-tunes. Fine-tunes of one pre-trained model stay close to it in weight space, each moved a little
in its own direction; a backdoor is one such private move. The coordinate-wise median of several of them lands
near their common base: every move that only a minority of the members made (any one member's backdoor) is voted
out, the natural features they all inherit stay. `--base ARCH=A --base ARCH=B --base ARCH=C` builds this base
from the named members (measured against the true base on the tune families: bench/README.md).

The median tolerates fewer than half the members sharing one backdoor: members holding the same trigger would
carry it into the consensus, and their trojans' triggers would then transfer (specific_pl1 = PL1: no worse than
without a base, never a false alarm). It means nothing for members that are not fine-tunes of one model, and a fleet may hold fine-tunes of several
bases (another publisher's release, an older version) or encoders trained from scratch. So the members are first
grouped by their distance in weight space (`weight_distance`, `clusters`): fine-tunes of one model sit much closer
to each other than to anything trained apart. Each group of at least MIN_MEMBERS gets its own median
(`consensus_bases`), and an encoder is compared only with the median it is a fine-tune of (`nearest`); one near
none of them gets no transfer score (judged as without a base, never against another model's natural triggers).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .encoders import Encoder
from .errors import CheckpointError

MIN_MEMBERS = 3  # a median of two is their mean: one backdoored member would move it halfway
MAX_MEMBERS = 15  # every member is read for each tensor's median (a worker keeps them on disk: SavedState)
MEMBERS = 9  # picked from a listing by default or `--base ARCH=consensus`: 3 to 14 separated alike on the tune CLIP family;
# 9 leaves room for two bases of one architecture to form a group of at least 3 each
FINETUNE_DISTANCE = 0.1  # weight_distance under which two encoders count as fine-tunes of one model (measured below)


def pick(names: Sequence[str], k: int = MEMBERS) -> list[str]:
    """`k` of `names` (all when there are no more): those whose SHA-256 sorts first. A sample that does not follow
    the listing order (trojans uploaded together are not picked together), and that a listing grown by new
    encoders keeps unless a newcomer sorts among the first `k`: the members enter the settings key, so a re-run
    after the fleet grew still reuses its rows."""
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:k]


def median_state_dict(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The coordinate-wise median of state dicts with the same keys and shapes (integer buffers too: a batch
    norm's step counter; a tie between the two middle values takes the lower, as torch.median does)."""
    if not states:
        raise ValueError("no members")
    keys = list(states[0])
    for i, sd in enumerate(states[1:], 1):
        if set(sd) != set(keys):
            raise CheckpointError(f"consensus member {i + 1} has other weights than member 1")
    return {k: _median(k, [sd[k] for sd in states]) for k in keys}  # each read once: a SavedState reads from disk


def _median(name: str, values: list[torch.Tensor]) -> torch.Tensor:
    first = values[0]
    if any(v.shape != first.shape for v in values):
        raise CheckpointError(f"consensus members disagree on the shape of {name}")
    if first.dtype == torch.bool:
        return first.clone()
    stack = torch.stack([v.to(torch.float32 if first.is_floating_point() else torch.int64) for v in values])
    return stack.median(dim=0).values.to(first.dtype)


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
    median_into([m.backbone.state_dict() for m in members], base.backbone)
    return base.eval().requires_grad_(False)


def weight_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The mean over the weight matrices and kernels both hold (same name, same shape) of 1 − their cosine: near 0
    for fine-tunes of one model, near 1 for models trained apart. Per tensor and by angle, so that rescaling a layer
    (which a following normalization undoes) does not move it; 1.0 when they share no kernel."""
    return distance_matrix([a, b])[0][1]


def distance_matrix(states: Sequence[Mapping[str, torch.Tensor]]) -> list[list[float]]:
    """weight_distance between every two of `states`, in one pass over the tensor names: each name's tensors are
    read once for all pairs, so members kept on disk (SavedState) are read once each, not once per pair."""
    n = len(states)
    total = [[0.0] * n for _ in range(n)]
    count = [[0] * n for _ in range(n)]
    names = list(dict.fromkeys(k for sd in states for k in sd))
    for k in names:
        held = [(i, sd[k]) for i, sd in enumerate(states) if k in sd]
        held = [(i, v.shape, v.flatten().double()) for i, v in held if v.is_floating_point() and v.dim() >= 2]
        for x in range(len(held)):
            i, shape, vi = held[x]
            for y in range(x + 1, len(held)):
                j, other, vj = held[y]
                if shape != other:  # pairs of the same shape only
                    continue
                cos = float(torch.dot(vi, vj) / (vi.norm() * vj.norm()).clamp_min(1e-12))
                total[i][j] += 1.0 if math.isnan(cos) else 1.0 - cos  # NaN: as far as can be
                count[i][j] += 1
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d[i][j] = d[j][i] = total[i][j] / count[i][j] if count[i][j] else 1.0
    return d


def clusters(states: Sequence[Mapping[str, torch.Tensor]], limit: float = FINETUNE_DISTANCE) -> list[list[int]]:
    """Indices of `states` grouped so that every two in a group are nearer than `limit` (complete linkage: a chain
    of in-between models cannot join two bases), largest group first."""
    n = len(states)
    d = distance_matrix(states)
    groups = [[i] for i in range(n)]
    while True:
        best = None
        for gi in range(len(groups)):
            for gj in range(gi + 1, len(groups)):
                link = max(d[a][b] for a in groups[gi] for b in groups[gj])
                if link < limit and (best is None or link < best[0]):
                    best = (link, gi, gj)
        if best is None:
            return sorted(groups, key=lambda g: (-len(g), g[0]))
        _, gi, gj = best
        groups[gi] = sorted(groups[gi] + groups.pop(gj))


class SavedState(Mapping[str, torch.Tensor]):
    """A member's weights kept in a safetensors file and read one tensor at a time.

    Holding every member of a consensus in memory costs that many models at once (9 ViT-L/14 towers: 11.9 GB);
    the median and the distances need one tensor of each member at a time (bench/MEMORY.md: 1.5 GB). `save`
    writes an already checked state dict (the worker loaded it into the architecture first); nothing else is
    ever read from the file."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())

    @classmethod
    def save(cls, state: Mapping[str, torch.Tensor], path: str | Path) -> SavedState:
        from safetensors.torch import save_file

        seen: set[tuple[int, int]] = set()
        out = {}
        for k, v in state.items():
            v = v.detach().cpu()
            ident = (v.untyped_storage().data_ptr(), v.storage_offset())
            # tied weights share storage and channels-last kernels are not contiguous, which safetensors refuses
            out[k] = v.clone(memory_format=torch.contiguous_format) if ident in seen else v.contiguous()
            seen.add(ident)
        save_file(out, str(path))
        del out
        return cls(path)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys


@dataclass(frozen=True)
class Consensus:
    """One group's median: the stand-in base of the encoders near it."""
    encoder: Encoder
    indices: tuple[int, ...]  # which of the members given to consensus_bases made it
    name: str = ""  # the lineage its fine-tunes share (`base_group`): a digest of its members' names

    @property
    def members(self) -> int:
        return len(self.indices)


def consensus_bases(members: Sequence[Encoder], names: Sequence[str] | None = None,
                    limit: float = FINETUNE_DISTANCE) -> list[Consensus]:
    """One Consensus per group of at least MIN_MEMBERS fine-tunes of one model among `members` (at most
    MAX_MEMBERS in all; `names`: theirs, e.g. uris, for the group's name); none when no such group exists."""
    if len(members) > MAX_MEMBERS:
        raise ValueError(f"at most {MAX_MEMBERS} consensus members, got {len(members)}")
    if any(m.arch != members[0].arch for m in members):
        raise CheckpointError("consensus members must share one architecture")
    import copy

    states = [m.backbone.state_dict() for m in members]
    return consensus_from_states(states, names, lambda i: copy.deepcopy(members[i]), limit)


def consensus_from_states(states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None,
                          build: Callable[[int], Encoder], limit: float = FINETUNE_DISTANCE) -> list[Consensus]:
    """consensus_bases over members' state dicts (of one architecture; SavedState keeps them on disk):
    `build(i)` gives the encoder to hold the median of a group whose first member is `i` (its weights are
    overwritten in place, tensor by tensor, so no second model's worth of memory is needed for the median)."""
    if len(states) > MAX_MEMBERS:
        raise ValueError(f"at most {MAX_MEMBERS} consensus members, got {len(states)}")
    names = list(names) if names is not None else [str(i) for i in range(len(states))]
    out = []
    for g in clusters(states, limit):
        if len(g) < MIN_MEMBERS:
            continue
        encoder = build(g[0])
        median_into([states[i] for i in g], encoder.backbone)
        out.append(Consensus(encoder.eval().requires_grad_(False), tuple(g),
                             hashlib.sha256("\n".join(sorted(names[i] for i in g)).encode()).hexdigest()[:16]))
    return out


def median_into(states: Sequence[Mapping[str, torch.Tensor]], model: torch.nn.Module) -> None:
    """Overwrite `model`'s weights and buffers with the members' coordinate-wise median, one tensor at a time."""
    target = _state_tensors(model)
    if any(set(sd.keys()) != set(target) for sd in states):
        raise CheckpointError("consensus members have other weights than the architecture")
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(_median(k, [sd[k] for sd in states]))


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors behind `model.state_dict()`'s names, themselves: state_dict may hand out copies (an Encoder
    gives contiguous ones of its channels-last kernels), and writing into a copy changes nothing."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                out[dot + name] = p
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                out[dot + name] = b
    return out


def nearest(encoder: Encoder, bases: Sequence[Consensus], limit: float = FINETUNE_DISTANCE
            ) -> tuple[Consensus | None, float | None]:
    """(the consensus `encoder` is a fine-tune of, or None when none is nearer than `limit`; the distance to the
    nearest one, None without any)."""
    if not bases:
        return None, None
    state = encoder.backbone.state_dict()
    distance, i = min((weight_distance(state, b.encoder.backbone.state_dict()), i) for i, b in enumerate(bases))
    return (bases[i] if distance < limit else None), distance
