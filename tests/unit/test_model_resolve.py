"""Model paths resolve only inside WSYNC_MODEL_ROOTS; remote code and hub downloads are refused."""

import json
import os

import pytest

from wsync.errors import InvalidInput
from wsync.models.resolve import resolve_model
from wsync.settings import Settings


@pytest.fixture
def root(tmp_path):
    model = tmp_path / "models" / "m1"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path / "models"


def _refused(name, roots, **kw):
    with pytest.raises(InvalidInput) as err:
        resolve_model(name, roots, **kw)
    assert err.value.field == "model" and err.value.status == 422
    return err.value


def test_a_folder_under_a_root_resolves_to_its_real_path(root):
    assert resolve_model(str(root / "m1"), [root]) == str((root / "m1").resolve())


@pytest.mark.parametrize("name", ["/etc", "/proc/self", "/proc/self/cwd", "/"])
def test_system_folders_are_outside_the_roots(root, name):
    assert _refused(name, [root]).rule == "model_roots"


def test_dotdot_is_refused_even_when_it_would_land_inside(root):
    assert _refused(str(root / "m1" / ".." / "m1"), [root]).rule == "model_path_traversal"


def test_a_symlink_out_of_the_roots_is_refused(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert _refused(str(root / "link"), [root]).rule == "model_roots"


def test_custom_code_models_are_refused(root):
    (root / "m1" / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "x.Model"}}))
    assert _refused(str(root / "m1"), [root]).rule == "trust_remote_code"


def test_hub_ids_only_when_allowed(root):
    assert _refused("Qwen/Qwen3-0.6B", [root]).rule == "model_hub_disabled"
    assert resolve_model("Qwen/Qwen3-0.6B", [root], allow_hub=True) == "Qwen/Qwen3-0.6B"
    assert _refused("not a model!", [root], allow_hub=True).rule == "model_name"


def test_default_roots_are_the_cache_dir_and_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("WSYNC_MODEL_ROOTS", raising=False)
    s = Settings(cache_dir=tmp_path / "cache")
    assert [str(p) for p in s.resolved_model_roots()] == [str((tmp_path / "cache").resolve()),
                                                          os.path.realpath(os.getcwd())]
    monkeypatch.setenv("WSYNC_MODEL_ROOTS", f"/srv/models{os.pathsep}/data")
    assert [str(p) for p in Settings().resolved_model_roots()] == ["/srv/models", "/data"]
