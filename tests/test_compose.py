"""docker-compose.yml, its GPU override, .dockerignore and the Dockerfile, checked without a Docker engine: the
files are parsed, and each service's command goes through the real `peer` argument parser and config loader, so a
typo fails here and not at `docker compose up`. tests/test_compose_engine.py runs the cluster on a real engine."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from peer import cli, config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
N_PEERS = 4
PORT = 50051
GRPC_GRACE_S = 5.0  # Node._shutdown: server.stop(grace_s=5.0) lets in-flight pushes finish
CLI_STARTUP_MARGIN_S = 2.0  # Python start-up and imports of `peer health` before its RPC starts, on a slow device
# Container start to SERVING with 4 peers starting together on 2 shared cores (Docker 20.10): 20 s to 34 s.
MEASURED_STARTUP_S = 34.0
# What a compose service may set: who the peer is, where it listens and keeps its state, how it finds the others
# and which part of the data it holds. Training, gossip and algorithm settings are the daemon's own defaults.
DEPLOYMENT_KEYS = {"node_id", "state_dir", "listen", "data.partition", "data.num_partitions", "data.partition_index"}
DEPLOYMENT_KEYS |= {"discovery.interfaces", "discovery.static_peers", "discovery.mdns"}
DEPLOYMENT_KEYS |= {"security.ca_file", "security.cert_file", "security.key_file"}
CERTS_SERVICE = "certs"  # the one-shot service that makes the cluster CA and the peers' certificates

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(value: Any) -> float:
    """A compose duration ("1m30s", "500ms", "20s") in seconds."""
    text = str(value).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def test_duration_parser() -> None:
    assert duration_s("30s") == 30 and duration_s("1m30s") == 90 and duration_s("500ms") == 0.5
    with pytest.raises(ValueError):
        duration_s("30")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # `<<: *peer` merge keys resolve here
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def peers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run a peer daemon: command `run ...` after the image's `peer` entrypoint."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc.get("command"), list) and svc["command"][:1] == ["run"]
    }


@pytest.fixture(scope="module")
def configs(peers: dict[str, dict[str, Any]]) -> dict[str, config.PeerConfig]:
    """Each peer service's command, parsed by `peer`'s own parser and loaded like `peer run` loads it."""
    out = {}
    for name, svc in peers.items():
        args = cli.build_parser().parse_args([str(part) for part in svc["command"]])
        assert args.command == "run" and args.fn is cli.cmd_run, name
        assert args.config is None, f"{name}: --config needs a file mounted into the container; use --set"
        out[name] = config.load(args.config, args.set)
    return out


def test_every_service_is_a_peer_but_the_one_shot_certs(
    compose: dict[str, Any], peers: dict[str, dict[str, Any]]
) -> None:
    assert len(peers) == N_PEERS
    assert set(compose["services"]) == set(peers) | {CERTS_SERVICE}


def _mounts(svc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (volume, options) of a service's volumes."""
    out = {}
    for v in svc.get("volumes") or []:
        name, path, *opts = str(v).split(":")
        out[path] = (name, opts[0] if opts else "rw")
    return out


def test_peers_use_mutual_tls_with_certificates_from_the_certs_service(
    compose: dict[str, Any], peers: dict[str, dict[str, Any]], configs: dict[str, config.PeerConfig]
) -> None:
    certs = compose["services"][CERTS_SERVICE]
    script = " ".join(str(part) for part in certs["command"])
    cert_mounts = _mounts(certs)
    ca_dirs = [p for p, (vol, _) in cert_mounts.items() if vol == "ca"]
    assert ca_dirs, "the CA key lives in its own volume"
    assert "peer certs init" in script and "peer certs issue" in script
    # Certificates are made once: a second `up` must not replace the CA (`peer certs init` refuses to anyway).
    assert "|| peer certs init" in script and "|| peer certs issue" in script
    for name, svc in peers.items():
        cfg = configs[name]
        assert not cfg.security.insecure and cfg.security.tls, f"{name}: mutual TLS, not plaintext"
        assert cfg.node_id in script, f"{name}: the certs service issues no certificate for {cfg.node_id}"
        mounts = _mounts(svc)
        assert all(vol != "ca" for vol, _ in mounts.values()), f"{name} must not see the CA key"
        files = [cfg.security.ca_file, cfg.security.cert_file, cfg.security.key_file]
        for f in files:
            folder = str(Path(str(f)).parent)
            assert folder in mounts and mounts[folder][1] == "ro", (name, f, mounts)
            assert mounts[folder][0] == cert_mounts[folder][0], f"{name}: {f} is not in the certs service's volume"
        assert Path(str(cfg.security.cert_file)).name == f"{cfg.node_id}.pem", name
        # The health probe shows the peer's own certificate.
        test = [str(t) for t in svc["healthcheck"]["test"]]
        args = cli.build_parser().parse_args(test[2:])
        assert [args.ca, args.cert, args.key] == files, (name, test)
        assert svc["depends_on"][CERTS_SERVICE]["condition"] == "service_completed_successfully", name


def test_commands_load_as_valid_configs_with_distinct_ids_and_partitions(
    configs: dict[str, config.PeerConfig],
) -> None:
    ids = [c.node_id for c in configs.values()]
    assert len(set(ids)) == N_PEERS, ids
    for name, cfg in configs.items():
        assert cfg.data.num_partitions == N_PEERS, name
        assert cfg.state_dir.startswith("/home/peer/"), f"{name}: state_dir must be writable by the image's user"
    # One data partition per peer, all of them covered.
    assert sorted(c.data.partition_index for c in configs.values()) == list(range(N_PEERS))


def test_peers_listen_everywhere_and_find_each_other_by_service_name(configs: dict[str, config.PeerConfig]) -> None:
    for name, cfg in configs.items():
        assert cfg.listen == f"0.0.0.0:{PORT}", name
        # mDNS does not cross Docker's bridge reliably: static peers by compose service name, exactly the others.
        # mDNS on the user-defined bridge network, static peers by service name as the fallback.
        assert cfg.discovery.mdns and cfg.discovery.interfaces == ["eth0"], name
        others = sorted(f"{other}:{PORT}" for other in configs if other != name)
        assert sorted(cfg.discovery.static_peers) == others, name
        assert len(cfg.discovery.static_peers) == len(set(cfg.discovery.static_peers)), name


def test_healthchecks_call_peer_health(peers: dict[str, dict[str, Any]]) -> None:
    for name, svc in peers.items():
        hc = svc.get("healthcheck")
        assert isinstance(hc, dict), f"{name} has no healthcheck"
        test = hc["test"]
        assert isinstance(test, list) and test[:3] == ["CMD", "peer", "health"], (name, test)
        args = cli.build_parser().parse_args([str(t) for t in test[2:]])
        assert args.fn is cli.cmd_health and args.addr == f"127.0.0.1:{PORT}", (name, test)
        for key in ("interval", "timeout", "start_period"):
            assert duration_s(hc[key]) > 0, (name, key)
        assert int(hc["retries"]) >= 1, name
        # Docker kills a check that outlives `timeout`: leave room for the CLI's start-up beyond its RPC deadline.
        assert duration_s(hc["timeout"]) >= args.timeout + CLI_STARTUP_MARGIN_S, (name, hc["timeout"], args.timeout)
        assert duration_s(hc["interval"]) >= duration_s(hc["timeout"]), name


def test_stop_grace_period_exceeds_the_grpc_grace(peers: dict[str, dict[str, Any]]) -> None:
    for name, svc in peers.items():
        # After the 5 s gRPC grace the daemon still writes its final checkpoint; Docker must not SIGKILL first.
        assert duration_s(svc["stop_grace_period"]) > GRPC_GRACE_S, name


def test_all_peers_share_one_user_defined_bridge_network(
    compose: dict[str, Any], peers: dict[str, dict[str, Any]]
) -> None:
    networks = compose.get("networks") or {}
    assert len(networks) == 1, networks
    (net_name, net) = next(iter(networks.items()))
    assert net_name not in ("default", "host", "none", "bridge")
    assert (net or {}).get("driver", "bridge") == "bridge"
    assert not (net or {}).get("external", False)
    for name, svc in peers.items():
        assert "network_mode" not in svc, name
        nets = svc.get("networks")
        assert list(nets) == [net_name], (name, nets)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_peer_as_non_root_with_pinned_torch() -> None:
    instr = _dockerfile_instructions()
    last_from = max(i for i, (w, _) in enumerate(instr) if w == "FROM")
    final = instr[last_from:]
    users = [rest for w, rest in final if w == "USER"]
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    entry = [rest for w, rest in final if w == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["peer"], entry
    # torch is pinned through a build argument with a default version, and the pip install uses it.
    args = dict(rest.partition("=")[::2] for w, rest in instr if w == "ARG")
    version = args.get("TORCH_VERSION", "")
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", version), f"ARG TORCH_VERSION needs a pinned default, got {version!r}"
    runs = " ".join(rest for w, rest in instr if w == "RUN")
    assert re.search(r"torch==\$\{?TORCH_VERSION\}?", runs), "pip must install torch==${TORCH_VERSION}"
    # The same default as scripts/_setup.sh, so the image and the venv run the same torch.
    setup = (ROOT / "scripts" / "_setup.sh").read_text(encoding="utf-8")
    assert f"TORCH_VERSION:-{version}" in setup


def _set_keys(command: list[Any]) -> list[str]:
    parts = [str(p) for p in command]
    return [parts[i + 1].partition("=")[0] for i, p in enumerate(parts) if p == "--set"]


def test_services_use_the_daemons_defaults(peers: dict[str, dict[str, Any]]) -> None:
    for name, svc in peers.items():
        keys = _set_keys(svc["command"])
        assert len(keys) == len(set(keys)), (name, keys)
        tuning = sorted(set(keys) - DEPLOYMENT_KEYS)
        assert not tuning, f"{name} sets {tuning}: compose runs the daemon's own defaults, as a user does"


def test_each_peer_keeps_its_state_in_its_own_named_volume(
    compose: dict[str, Any], peers: dict[str, dict[str, Any]], configs: dict[str, config.PeerConfig]
) -> None:
    declared = compose.get("volumes") or {}
    used = []
    for name, svc in peers.items():
        mounts = _mounts(svc)
        assert configs[name].state_dir in mounts, f"{name}: mount a named volume at its state_dir"
        volume = mounts[configs[name].state_dir][0]
        assert volume in declared, f"{name}: {volume} is a bind mount or undeclared; use a named volume"
        assert not (declared[volume] or {}).get("external", False), volume
        used.append(volume)
    assert len(set(used)) == len(used) == N_PEERS, used


def test_the_state_dir_exists_in_the_image_owned_by_the_daemons_user(configs: dict[str, config.PeerConfig]) -> None:
    """A fresh named volume copies the image's directory, ownership included: the daemon (not root) can write."""
    instr = _dockerfile_instructions()
    user = [rest for w, rest in instr if w == "USER"][-1]
    runs = " ".join(rest for w, rest in instr if w == "RUN")
    made = re.search(r"mkdir -p ((?:/\S+ ?)+)", runs)
    owned = re.search(rf"chown {user}(?::{user})? ((?:/\S+ ?)+)", runs)
    assert made and owned, runs
    folders = {c.state_dir for c in configs.values()} | {
        str(Path(str(c.security.cert_file)).parent) for c in configs.values()
    }
    for folder in folders:
        assert folder in made.group(1).split() and folder in owned.group(1).split(), (folder, runs)
    assert not any(w == "VOLUME" for w, _ in instr), "compose names the volumes; VOLUME adds anonymous ones"


def test_start_period_covers_the_measured_start_up(peers: dict[str, dict[str, Any]]) -> None:
    for name, svc in peers.items():
        assert duration_s(svc["healthcheck"]["start_period"]) >= 1.5 * MEASURED_STARTUP_S, name


def test_torch_source_is_a_build_argument_with_the_dockerfiles_defaults(peers: dict[str, dict[str, Any]]) -> None:
    instr = _dockerfile_instructions()
    defaults = dict(rest.partition("=")[::2] for w, rest in instr if w == "ARG")
    assert defaults["TORCH_INDEX_URL"].startswith("https://"), defaults
    assert "TORCH_FIND_LINKS" in defaults
    runs = " ".join(rest for w, rest in instr if w == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and "TORCH_FIND_LINKS" in runs
    interpolated = re.compile(r"^\$\{(\w+):-(.*)\}$")
    for name, svc in peers.items():
        args = svc["build"]["args"]
        for key in ("TORCH_VERSION", "TORCH_INDEX_URL", "TORCH_FIND_LINKS"):
            m = interpolated.match(str(args[key]))
            # Compose 1.x passes an unset variable as "" (not as "unset"): every argument needs its default here.
            assert m and m.group(1) == key, (name, key, args[key])
            assert m.group(2) == defaults[key], f"{name}: {key} defaults to {m.group(2)!r}, not the Dockerfile's"


def test_dockerignore_keeps_the_build_context_small() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".git", "bench-results", "state", "**/__pycache__", ".mypy_cache", ".pytest_cache"):
        assert needed in patterns, f".dockerignore must exclude {needed}"
    # What the Dockerfile copies stays in the context.
    copied = {src for w, rest in _dockerfile_instructions() if w == "COPY" for src in rest.split()[:-1]}
    assert copied and not copied & patterns, copied & patterns


def test_gpu_override_reserves_an_nvidia_gpu_for_every_peer(peers: dict[str, dict[str, Any]]) -> None:
    gpu = yaml.safe_load(COMPOSE_GPU.read_text(encoding="utf-8"))
    assert set(gpu["services"]) == set(peers)
    for name, svc in gpu["services"].items():
        assert set(svc) == {"deploy"}, f"{name}: the override only adds the device reservation"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        dev = devices[0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], (name, dev)
        assert ("count" in dev) != ("device_ids" in dev), f"{name}: count or device_ids, not both"
