"""Deployment files: the compose file (YAML + keys: PostgreSQL, a required token), the Dockerfile's
shape, the KubeRay RayService manifest, and the Ray Serve application object (built, no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_starts_wsync_with_postgres_and_a_token():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    db, svc = doc["services"]["db"], doc["services"]["wsync"]
    assert db["image"].startswith("postgres:") and "healthcheck" in db
    assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY.parent / svc["build"]["dockerfile"]).is_file()
    assert svc["depends_on"]["db"]["condition"] == "service_healthy"
    env = svc["environment"]
    assert env["WSYNC_DATABASE_URL"].startswith("postgresql+psycopg://") and "@db:5432/" in env["WSYNC_DATABASE_URL"]
    assert env["WSYNC_API_TOKEN"].startswith("${WSYNC_API_TOKEN:?")  # compose refuses to start without one
    assert env["WSYNC_HOST"] == "0.0.0.0"


def test_dockerfile_runs_wsync_serve():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[0].startswith("FROM ")
    assert any(ln.startswith("CMD [\"wsync\", \"serve\"") for ln in lines)
    assert "'.[postgres]'" in text and "HEALTHCHECK" in text


def test_rayservice_manifest_points_at_the_serve_app():
    doc = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "wsync.deploy.serve:app"
    assert app["deployments"][0]["num_replicas"] == 1
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head["env"]}
    assert env["WSYNC_API_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "api-token"


def test_serve_application_builds_without_a_cluster(tmp_path):
    serve = pytest.importorskip("ray.serve")
    from wsync.deploy.serve import DEPLOYMENT_NAME, build_app

    app = build_app({"database_url": f"sqlite:///{tmp_path / 'w.db'}", "api_token": "t"}, start_fleet=False)
    assert isinstance(app, serve.Application)
    deployment = app._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME and deployment.num_replicas == 1
