"""The resume state on its own (no Ray): which finished rows a re-run may keep, and which it must not."""

import json

from conftest import TINY_ARCH

from decree_ray import results as results_mod
from decree_ray.resume import ResumeState
from decree_ray.schema import new_row
from decree_ray.sources import EncoderTask
from decree_ray.storage import DEFAULT_S3

SETTINGS = results_mod.settings_key(profile="fast", overrides=(), steps=None, threshold=None, shadow_limit=None,
                                    shadow_sha256="s")


def _keys(settings=SETTINGS):
    return lambda _arch: settings  # every architecture under one key, as a run without bases


def _finished(tmp_path, settings=SETTINGS, identity="file:1:2:3:4"):
    ckpt = tmp_path / "a.pt"
    ckpt.write_bytes(b"x")
    task = EncoderTask(id="a.pt", uri=str(ckpt), arch=TINY_ARCH, sidecar=True, identity=identity)
    key = results_mod.task_content_key("ab" * 32, task, "fast", settings)
    row = new_row(id="a.pt", uri=str(ckpt), status="ok", arch=TINY_ARCH, sha256="ab" * 32, content_key=key,
                  source_identity=identity, verdict="clean")
    return task, row


def test_an_unchanged_entry_keeps_its_row_and_a_changed_sidecar_does_not(tmp_path):
    task, row = _finished(tmp_path)
    state = ResumeState([row], _keys(), "fast", DEFAULT_S3)
    assert state.unchanged_row(task)["verdict"] == "clean"
    assert state.unchanged_row(EncoderTask(**{**task.__dict__, "identity": "file:1:2:9:4"})) is None  # rewritten
    (tmp_path / "a.pt.json").write_text(json.dumps({"arch": TINY_ARCH, "image_size": 48}))
    assert state.unchanged_row(task) is None  # another preprocessing: another content key


def test_rows_of_other_settings_are_counted_and_never_kept(tmp_path):
    other = results_mod.settings_key(profile="fast", overrides=(), steps=1, threshold=None, shadow_limit=None,
                                     shadow_sha256="s")
    task, row = _finished(tmp_path, settings=other)
    state = ResumeState([row], _keys(), "fast", DEFAULT_S3)
    assert state.other_settings == 1 and state.unchanged_row(task) is None
    assert state.done_row(state.key("ab" * 32, task), task, "ab" * 32) is None


def _run(bases):
    """A JobConfig-like run: what settings_key_of reads."""
    from types import SimpleNamespace

    return SimpleNamespace(profile="fast", overrides=(), steps=None, threshold=None, shadow_limit=None, image_size=None,
                           trust_sidecar_preprocessing=False, bases=bases)


def test_a_member_change_in_one_architecture_rescans_that_architecture_only(tmp_path):
    """The consensus members are per architecture: a newcomer among the members of another architecture
    leaves this architecture's rows reusable; a change among its own members does not."""
    members = tuple((TINY_ARCH, f"m{i}.pt") for i in range(3))
    before = results_mod.SettingsKeys(_run(members + (("other/arch", "o1.pt"),)), "s")
    task, row = _finished(tmp_path, settings=before(TINY_ARCH))
    other_changed = ResumeState([row], results_mod.SettingsKeys(_run(members + (("other/arch", "o2.pt"),)), "s"),
                                "fast", DEFAULT_S3)
    assert other_changed.other_settings == 0 and other_changed.unchanged_row(task)["verdict"] == "clean"
    own_changed = ResumeState([row], results_mod.SettingsKeys(_run(members[:2] + ((TINY_ARCH, "m9.pt"),)), "s"),
                              "fast", DEFAULT_S3)
    assert own_changed.other_settings == 1 and own_changed.unchanged_row(task) is None
    assert own_changed.done_row(own_changed.key("ab" * 32, task), task, "ab" * 32) is None
