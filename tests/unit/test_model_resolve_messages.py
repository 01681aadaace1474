"""`--model` messages (one resolver, wsync.models.resolve): clear 422s naming `model`, no hub tried for a path."""

from __future__ import annotations

import pytest

from tests.fakes.app import fake_client
from wsync.errors import InvalidInput
from wsync.models import resolve_model


def test_nonexistent_path_is_not_found_without_a_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", no_hub)
    with pytest.raises(InvalidInput, match="not found") as err:
        resolve_model(str(tmp_path / "nonexistent"))
    assert err.value.field == "model"
    with pytest.raises(InvalidInput, match="not found"):
        resolve_model("./nope")


def test_folder_without_config_is_not_a_model_folder(tmp_path):
    (tmp_path / "tokenizer.model").write_text("x")
    with pytest.raises(InvalidInput, match=r"not a model folder \(no config.json"):
        resolve_model(str(tmp_path))


def test_offline_hub_id_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(InvalidInput, match="not found offline"):
        resolve_model("someorg/some-model-xyz")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("someorg/some-model-xyz") == "someorg/some-model-xyz"  # online: the loader's job


def test_api_answers_422_naming_model(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        for path, body in [("/v1/trainer/load", {"model": str(tmp_path / "missing")}),
                           ("/v1/engines", {"model": str(tmp_path)}),
                           ("/v1/trainer/load", {"model": "not a/valid/id"})]:
            r = client.post(path, json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == "model"
        assert client.get("/v1/engines").json()["total"] == 0
        assert client.get("/v1/jobs").json()["total"] == 0  # refused before any job


def test_confined_resolver_gives_the_same_messages(tmp_path):
    from wsync.models.resolve import resolve_model as confined

    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match=r"not a model folder \(no config.json") as err:
        confined(str(tmp_path / "empty"), [tmp_path])
    assert err.value.rule == "model_folder"
    with pytest.raises(InvalidInput, match="not found: no such local folder") as err:
        confined(str(tmp_path / "gone"), [tmp_path])
    assert err.value.rule == "model_exists"
