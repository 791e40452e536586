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

import shutil
import tempfile
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
        """The medians of the groups of members that load with finite weights.

        Members are read one after another into one model of the architecture (which checks each strictly),
        written from it to the worker's cache as safetensors, and the first group's median is then written into
        that same model tensor by tensor: a worker holds about two models while it builds a consensus of nine
        (bench/MEMORY.md), not nine."""
        import copy

        from decree.consensus import MIN_MEMBERS, consensus_from_states, finite
        from decree.encoders import create_encoder, load_into

        self._cache.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="members-", dir=self._cache))
        states, names, failed = [], [], []
        model = None  # the architecture, built once from the first member that loads
        # members that hang until --load-timeout must not eat the first encoder's --timeout: all of them together
        # get twice one checkpoint's budget, the rest are skipped
        budget, t0 = 2 * self.settings.load_timeout, time.monotonic()
        try:
            for source in sources:
                if time.monotonic() - t0 > budget:
                    failed.append(f"{source}: skipped, the members' load budget ({budget:.0f} s) is spent")
                    continue
                try:
                    state = self._read(arch, source)
                    if model is None:
                        model = create_encoder(arch, state, image_size=image_size)
                    else:
                        load_into(model.backbone, state)
                    state = None
                    if not finite(model):
                        raise ValueError("non-finite weights (NaN/Inf)")
                    states.append(self._keep(model.backbone.state_dict(), folder / f"{len(states)}.safetensors"))
                    names.append(source)
                except Exception as e:  # noqa: BLE001 - counted and named below
                    failed.append(f"{source}: {self._error_text(e)}")
                finally:
                    state = None  # the next member is read with this one released
            if len(states) < MIN_MEMBERS:
                if arch in self.settings.auto_bases:
                    return []  # picked by default: these rows are judged as without a base
                raise RuntimeError(f"{len(states)} of {len(sources)} consensus members loaded (at least "
                                   f"{MIN_MEMBERS} needed); " + "; ".join(failed)[:2000])
            spare = [model]  # the first group's median goes into the members' model, another group's into a copy
            bases = consensus_from_states(states, names, lambda _first: spare.pop() if spare else copy.deepcopy(model))
            for b in bases:
                b.encoder.to(self._device)
            return bases
        finally:
            states = None
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _keep(state: dict, path: Path):
        """The member on disk (read back a tensor at a time), or in memory when the cache's disk lacks room for it:
        a full disk costs memory, as before, never the consensus."""
        from decree.consensus import SavedState

        size = sum(v.numel() * v.element_size() for v in state.values())
        if shutil.disk_usage(path.parent).free < 2 * size + (1 << 30):
            return {k: v.detach().cpu().clone() for k, v in state.items()}  # a copy: the next member overwrites it
        return SavedState.save(state, path)

    def _member(self, arch: str, source: str, image_size: int | None):
        from decree.encoders import create_encoder

        return create_encoder(arch, self._read(arch, source), image_size=image_size)

    def _read(self, arch: str, source: str) -> dict:
        """The state dict of a base or member: the offline weights registered for `arch`, or a checkpoint read
        like any encoder's (size refused before the download, parsed in the loader process)."""
        if source == "pretrained":
            from decree.encoders.registry import pretrained_state_dict

            return pretrained_state_dict(arch)
        limit = self.settings.max_checkpoint_bytes
        if limit is not None and (size := storage.size_of(source, self.settings.s3)) > limit:
            raise ValueError(f"{size} bytes, over --max-checkpoint-size ({limit} bytes)")
        path, delete = storage.fetch(source, self._cache / "base", self.settings.s3)
        try:
            return self._reader.read(path, max_bytes=limit, name=source.rsplit("/", 1)[-1])
        finally:
            if delete:
                path.unlink(missing_ok=True)
