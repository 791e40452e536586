"""Does the inverted trigger belong to this encoder, or to the model it was fine-tuned from?

A clean encoder's smallest trigger is a *natural* one: an adversarial patch its features inherit from the
pre-trained model it was fine-tuned from, so it collapses that base model too. A backdoor's trigger was put into
this encoder alone: stamped on the same images, the base model does not embed them alike. With the base named
(`--base ARCH=SOURCE`, e.g. the publisher's original weights), a scan stamps its best trigger on the shadow images
once more and embeds them with the base as well (`base_similarity`). How much farther from a full collapse the
base stays than the encoder, r = (1 − base) / (1 − encoder) (at least 1; the encoder's side taken at τ at most),
divides the trigger's area: `specific_pl1` = PL1 / r. A natural trigger keeps its area; a trigger the base
ignores looks as small as it is specific. It is judged like PL1, against SPECIFIC_FRACTION of the profile's
threshold and, in a fleet, against its peers (measured on the tune families: bench/README.md).

When the base is unknown, the coordinate-wise median of several fine-tunes stands in for it (decree.consensus:
several `--base` sources for one architecture, or `--base ARCH=consensus`).

Only for fine-tunes of that base: an encoder trained elsewhere (another pre-training, from scratch) has natural
triggers of its own that the base does not share, and would look trojaned. The base runs with the scanned
encoder's own preprocessing (the trigger was found in that pixel space); one forward pass of TRANSFER_IMAGES
images per model, about the cost of one search step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .encoders import Encoder
from .errors import InversionError
from .inversion import mean_pairwise_cosine, stamp

TRANSFER_IMAGES = 128
# specific_pl1 flags below this share of the profile's threshold. The ratio grows as a clean fine-tune drifts from
# its base (up to 4.2 on the tune Lite0 family's short fine-tunes): half the threshold keeps a 2x margin for
# longer ones, and every tune trojan scored under 0.011 (bench/README.md)
SPECIFIC_FRACTION = 0.5
# ...or below this share of the base's own smallest trigger on the same shadow set (`base_pl1`): a natural trigger
# keeps about the base's area (tune clean fine-tunes: at least 0.23 of it; CLIP towers 0.61), a specific one is a
# small part of it whatever the architecture's scale. 0.1 keeps a 2x margin under the tune split's smallest clean
# ratio (bench/README.md); it adds the trojans whose specific score is small against the base but not against
# one constant (Lite0 on photo crops: clean 0.10-0.34, such trojans 0.02-0.03)
RELATIVE_FRACTION = 0.1
# ...and only while the encoder is still near its base (`base_distance`, decree.consensus.weight_distance). A long,
# hot fine-tune grows small natural triggers of its own that its base does not share, so its specific score falls
# into the trojans' range (tune `i2i-long`: a clean 600-step fine-tune at lr 1e-3, 0.0114 from its lineage's
# consensus, specific 0.0049 against trojans' 0.0009). Farther than this, the specific score only counts against
# the encoder's fleet peers. 0.006 is 2x the farthest light tune trojan (0.0030; CLIP towers 0.0028, short Lite0
# fine-tunes 0.0004) and about half that clean fine-tune's distance. Heavy BadEncoder attacks drift farther
# (`i2i-heavy`: up to 0.0063) but leave triggers the threshold flags by itself (PL1 0.013-0.015; bench/README.md)
DRIFT_LIMIT = 0.006
# The relative cut holds only nearer still: a natural trigger keeps about the base's area while the encoder is a
# gentle fine-tune of it. Tune split: every trojan that only the relative cut flags sits within 0.0005 of its base
# (short fine-tunes on photo crops), while long fine-tunes 0.0024-0.0037 from it grew natural triggers of 0.05-0.11
# of its area (tune `i2i-long`; one at 0.0009 from the publisher's weights, 0.07: naming those for long
# fine-tunes stays a misuse). Farther than this, half the threshold alone judges the specific score per encoder
RELATIVE_DRIFT_LIMIT = 0.001


@dataclass(frozen=True)
class Transfer:
    base_similarity: float  # mean pairwise cosine of the base's embeddings of the stamped images
    own_similarity: float  # the encoder's, on the same images
    tau: float

    @property
    def ratio(self) -> float:
        """How many times farther from a full collapse the base stays than the encoder (at least 1)."""
        own_gap = max(1.0 - self.own_similarity, 1.0 - self.tau, 1e-6)
        return max(1.0, (1.0 - self.base_similarity) / own_gap)

    def specific_pl1(self, pl1: float) -> float:
        return pl1 / self.ratio


def specific_cut(threshold: float | None, base_pl1: float | None = None, distance: float | None = None) -> float | None:
    """The specific score's cut: SPECIFIC_FRACTION of the threshold or RELATIVE_FRACTION of the base's own smallest
    trigger (`base_pl1`: None when unknown or the base never reached τ; the latter only within RELATIVE_DRIFT_LIMIT
    of the base), whichever is larger; None without either, or when the encoder's weight distance to the base
    (`distance`) is over DRIFT_LIMIT."""
    if distance is not None and not distance <= DRIFT_LIMIT:  # NaN counts as far
        return None
    if distance is not None and not distance <= RELATIVE_DRIFT_LIMIT:
        base_pl1 = None
    cuts = [f * v for f, v in ((SPECIFIC_FRACTION, threshold), (RELATIVE_FRACTION, base_pl1)) if v is not None]
    return max(cuts) if cuts else None


def specific_verdict(reached_tau: bool, specific_pl1: float, threshold: float, base_pl1: float | None = None,
                     distance: float | None = None) -> str:
    """Flagged when the search reached τ and the specific area is under its cut (`specific_cut`); never for an
    encoder that drifted farther than DRIFT_LIMIT from its base."""
    cut = specific_cut(threshold, base_pl1, distance)
    return "trojaned" if reached_tau and cut is not None and specific_pl1 < cut else "clean"


def collapsing_bases(rows) -> list[dict]:
    """The bases (named or consensus) whose own smallest trigger on a scan's shadow set is under the threshold the
    rows were judged by, once per architecture, input size, shadow set and lineage. Such a base is flagged by the
    same rule as its fine-tunes: either it carries a backdoor they all share (then so do they), or this shadow set
    and input size collapse clean models (a 32-px encoder scanned at its architecture's 224 px, a flat-background
    shadow set upsampled: bench/README.md), and the threshold verdicts of its fine-tunes mean nothing."""
    seen: dict[tuple, dict] = {}
    for r in rows:
        own, threshold = r.get("base_pl1"), r.get("threshold")
        if r.get("status", "ok") != "ok" or own is None or threshold is None or not own < threshold:
            continue
        key = (r.get("arch"), r.get("image_size"), r.get("shadow_sha256"), r.get("base_group"))
        hit = seen.setdefault(key, {"arch": r.get("arch"), "image_size": r.get("image_size"), "base_pl1": own,
                                    "threshold": threshold, "base_group": r.get("base_group"), "encoders": 0})
        hit["encoders"] += 1
    return sorted(seen.values(), key=lambda h: (str(h["arch"]), h["image_size"] or 0, str(h["base_group"])))


@torch.no_grad()
def stamped_similarity(encoder: Encoder, pixels: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                       images: int = TRANSFER_IMAGES, seed: int = 7, batch: int = 64,
                       preprocess: Encoder | None = None) -> float:
    """Mean pairwise cosine of `encoder`'s embeddings of `images` shadow images stamped with (mask, pattern),
    normalized as `preprocess` (default: the encoder itself) normalizes."""
    preprocess = preprocess or encoder
    n = min(images, pixels.shape[0])
    idx = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed))[:n].to(pixels.device)
    m = mask.to(pixels)[None, None] if mask.dim() == 2 else mask.to(pixels)[None]
    p = pattern.to(pixels)[None]
    embs = [encoder(preprocess.normalize(stamp(pixels[chunk], m, p))).float() for chunk in idx.split(batch)]
    return float(mean_pairwise_cosine(torch.cat(embs)[None])[0])


def transfer(encoder: Encoder, base: Encoder, pixels: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
             tau: float) -> Transfer:
    """Stamp the encoder's trigger on the shadow images and embed them with the encoder and with its base."""
    base = base.to(pixels.device).eval().requires_grad_(False)
    t = Transfer(base_similarity=stamped_similarity(base, pixels, mask, pattern, preprocess=encoder),
                 own_similarity=stamped_similarity(encoder, pixels, mask, pattern), tau=tau)
    if not (math.isfinite(t.base_similarity) and math.isfinite(t.own_similarity)):
        raise InversionError("the base model or the encoder embeds the stamped shadow set as NaN/Inf")
    return t
