"""A worker's base models (decree.transfer): one per architecture and input size, loaded once.

One source for an architecture (`--base ARCH=SOURCE`) is that model, the auditor's word. Several are the members
of a consensus (decree.consensus): named (`--base ARCH=A --base ARCH=B ...`), picked by `--base ARCH=consensus`,
or picked by default for every architecture the listing names often enough (`auto`). Members are grouped into
fine-tunes of one model and each group of at least MIN_MEMBERS gets its median; every encoder is then compared
with the median it is a fine-tune of.

Members are the audited party's files: each loads like any checkpoint (weights only, in the loader process, a
size over the limit refused before its download, all of them loaded within twice --load-timeout); one that
fails or holds a NaN/Inf drops out. A named
consensus with fewer than MIN_MEMBERS loading is an error in every row of its architecture; a picked-by-default
one only leaves those rows without a transfer score (`base_members` 0), as a scan without a base.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import storage


class BaseModels:
    def __init__(self, settings, reader, cache: Path, device: str, error_text):
        self.settings = settings
        self._reader = reader
        self._cache = cache
        self._device = device
        self._error_text = error_text
        # (arch, input size) -> an Encoder, a list of decree.consensus.Consensus, or the error loading raised
        self._loaded: dict[tuple[str, int | None], Any] = {}

    def get(self, arch: str, image_size: int | None):
        """The base of `arch` at `image_size`: None when none is named; raises what loading it raised (once per
        worker, repeated in each row of the architecture)."""
        sources = [s for a, s in self.settings.bases if a == arch]
        if not sources:
            return None
        key = (arch, image_size)
        if key not in self._loaded:
            try:
                if len(sources) == 1:
                    base = self._member(arch, sources[0], image_size).to(self._device).eval().requires_grad_(False)
                else:
                    base = self._consensus(arch, sources, image_size)
            except Exception as e:  # noqa: BLE001 - named in every row of this architecture, the scan goes on
                what = f"--base {arch}={sources[0]}" if len(sources) == 1 else f"of {arch}"
                base = RuntimeError(f"cannot load the base model {what}: {self._error_text(e)}")
            self._loaded[key] = base
        if isinstance(self._loaded[key], Exception):
            raise self._loaded[key]
        return self._loaded[key]

    def _consensus(self, arch: str, sources: list[str], image_size: int | None):
        """The medians of the groups of members that load with finite weights."""
        from decree.consensus import MIN_MEMBERS, consensus_bases, finite

        members, names, failed = [], [], []
        # members that hang until --load-timeout must not eat the first encoder's --timeout: all of them together
        # get twice one checkpoint's budget, the rest are skipped
        budget, t0 = 2 * self.settings.load_timeout, time.monotonic()
        for source in sources:
            if time.monotonic() - t0 > budget:
                failed.append(f"{source}: skipped, the members' load budget ({budget:.0f} s) is spent")
                continue
            try:
                member = self._member(arch, source, image_size)
                if not finite(member):
                    raise ValueError("non-finite weights (NaN/Inf)")
                members.append(member)
                names.append(source)
            except Exception as e:  # noqa: BLE001 - counted and named below
                failed.append(f"{source}: {self._error_text(e)}")
        if len(members) < MIN_MEMBERS:
            if arch in self.settings.auto_bases:
                return []  # picked by default: these rows are judged as without a base
            raise RuntimeError(f"{len(members)} of {len(sources)} consensus members loaded (at least {MIN_MEMBERS} "
                               "needed); " + "; ".join(failed)[:2000])
        bases = consensus_bases(members, names)
        for b in bases:
            b.encoder.to(self._device)
        return bases

    def _member(self, arch: str, source: str, image_size: int | None):
        from decree.encoders import create_encoder

        if source == "pretrained":
            return create_encoder(arch, pretrained=True, image_size=image_size)
        limit = self.settings.max_checkpoint_bytes
        if limit is not None and (size := storage.size_of(source, self.settings.s3)) > limit:
            raise ValueError(f"{size} bytes, over --max-checkpoint-size ({limit} bytes)")
        path, delete = storage.fetch(source, self._cache / "base", self.settings.s3)
        try:
            state = self._reader.read(path, max_bytes=limit, name=source.rsplit("/", 1)[-1])
        finally:
            if delete:
                path.unlink(missing_ok=True)
        return create_encoder(arch, state, image_size=image_size)
