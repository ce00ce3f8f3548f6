"""The Docker route, validated without Docker: docker-compose.yml and the Dockerfiles it builds refer
to things that exist (build contexts, console scripts, tools inside the images, settings)."""

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from pg_kafka_cdc.common.settings import common_options
from tests.helpers import REPO
from writer.cli import main as writer_main

COMPOSE_FILE = REPO / "docker-compose.yml"
PROGRAMS = ("writer", "source", "sink")
EXPECTED_SERVICES = {"kafka", "postgres-source", "postgres-target", *PROGRAMS}
DOCUMENTED_SETTINGS = {
    "SOURCE_DSN",
    "TARGET_DSN",
    "KAFKA_BOOTSTRAP_SERVERS",
    "TOPIC_PREFIX",
    "TABLES",
    "METRICS_PORT",
    "WRITER_RATE",
    "WRITER_MIX",
    "WRITER_BATCH",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "SOURCE_SLOT",
    "SINK_GROUP",
}
# Scripts of the Kafka distribution under /opt/kafka/bin in the apache/kafka image.
KAFKA_SCRIPTS = {"kafka-broker-api-versions.sh", "kafka-topics.sh", "kafka-metadata-quorum.sh"}


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "no services in the file"
    return doc


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSOLE_SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


def build_of(service: dict[str, Any]) -> tuple[Path, Path] | None:
    """(context, Dockerfile) of a built service, None for an image-only one."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(pending)
            pending = ""
    pairs = []
    for line in logical:
        word, _, rest = line.partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def base_image(service: dict[str, Any]) -> str:
    """The image a service runs: its `image`, or the first FROM of its Dockerfile."""
    found = build_of(service)
    if found is None:
        return str(service["image"])
    return next(args for word, args in dockerfile_instructions(found[1]) if word == "FROM")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command_words(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def healthcheck_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    assert kind in {"CMD", "CMD-SHELL"}, f"healthcheck test starts with {kind!r}"
    return shlex.split(rest[0]) if kind == "CMD-SHELL" else [str(w) for w in rest]


def published(service: dict[str, Any]) -> dict[int, int]:
    """Host port -> container port."""
    ports: dict[int, int] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["published"])] = int(entry["target"])
        else:
            *_, host, container = str(entry).split(":")
            ports[int(host)] = int(container.split("/")[0])
    return ports


def envvars_of(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


# --- the services ---------------------------------------------------------------------------------


def test_expected_services() -> None:
    assert set(SERVICES) == EXPECTED_SERVICES


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_service_has_an_image_or_a_build_that_exists(name: str) -> None:
    service = SERVICES[name]
    assert "image" in service or "build" in service, f"{name} has neither image nor build"
    found = build_of(service)
    if found is not None:
        context, dockerfile = found
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"


def test_published_ports() -> None:
    assert published(SERVICES["postgres-source"]) == {5432: 5432}
    assert published(SERVICES["postgres-target"]) == {5433: 5432}
    assert 9092 in published(SERVICES["kafka"])


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_commands_are_console_scripts(name: str) -> None:
    words = command_words(SERVICES[name]["command"])
    assert words[0] == f"cdc-{name}"
    assert words[0] in CONSOLE_SCRIPTS, f"{words[0]} is not in pyproject's [project.scripts]"
    module, _, function = CONSOLE_SCRIPTS[words[0]].partition(":")
    assert importlib.util.find_spec(module) is not None, f"{module} (for {words[0]}) does not exist"
    assert function


def test_replay_command_in_the_header_uses_a_real_service_and_script() -> None:
    header = COMPOSE_FILE.read_text().split("\nservices:")[0]
    assert "docker compose up --build" in header
    match = re.search(r"docker compose run --rm (\S+) (\S+) rebuild --tables public\.person", header)
    assert match, "the header should show the replay command"
    assert match[1] in SERVICES and match[2] in CONSOLE_SCRIPTS


# --- health checks --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_healthcheck_runs_something_real(name: str) -> None:
    service = SERVICES[name]
    assert "healthcheck" in service, f"{name} has no healthcheck"
    words = healthcheck_command(service)
    program = words[0]
    image = base_image(service)
    if program in CONSOLE_SCRIPTS:
        assert build_of(service) == build_of(SERVICES["writer"]), f"{name} does not run the pipeline image"
    elif program.startswith("/opt/kafka/bin/"):
        assert image.startswith("apache/kafka:"), f"{name}: {program} only exists in apache/kafka"
        assert program.removeprefix("/opt/kafka/bin/") in KAFKA_SCRIPTS, program
        assert "--bootstrap-server" in words
    elif program == "pg_isready":
        assert image.startswith("postgres:"), f"{name}: pg_isready needs a postgres image, not {image}"
    elif program == "python":
        assert image.startswith("python:"), f"{name}: python needs the python image, not {image}"
        assert words[1] == "-c"
        compile(words[2], f"<healthcheck of {name}>", "exec")
    else:
        pytest.fail(f"{name}: unexpected healthcheck program {program!r}")


@pytest.mark.parametrize("name", ["source", "sink"])
def test_connector_healthcheck_asks_the_metrics_port(name: str) -> None:
    service = SERVICES[name]
    port = environment(service)["METRICS_PORT"]
    code = " ".join(healthcheck_command(service))
    assert f"http://127.0.0.1:{port}/healthz" in code


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_depends_on_waits_for_healthy_services(name: str) -> None:
    depends = SERVICES[name].get("depends_on") or {}
    if isinstance(depends, list):
        depends = {d: {} for d in depends}
    for other, spec in depends.items():
        assert other in SERVICES, f"{name} depends on an unknown service {other}"
        if spec.get("condition") == "service_healthy":
            assert "healthcheck" in SERVICES[other], f"{name} waits for {other} to be healthy; it has no check"
    if name in PROGRAMS:
        assert depends, f"{name} should wait for the services it uses"
        assert all(spec.get("condition") == "service_healthy" for spec in depends.values())


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROGRAMS)
def test_programs_use_only_documented_settings(name: str) -> None:
    env = environment(SERVICES[name])
    unknown = set(env) - DOCUMENTED_SETTINGS
    assert not unknown, f"{name} sets undocumented variables {sorted(unknown)}"
    for required in ("SOURCE_DSN", "TARGET_DSN", "KAFKA_BOOTSTRAP_SERVERS", "TOPIC_PREFIX", "TABLES"):
        assert required in env, f"{name} does not set {required}"


def test_writer_settings_are_read_by_the_writer() -> None:
    env = environment(SERVICES["writer"])
    assert "WRITER_RATE" in env
    known = envvars_of(writer_main)
    assert set(env) <= known, f"cdc-writer ignores {sorted(set(env) - known)}"


def test_shared_settings_are_common_options() -> None:
    @click.command()
    @common_options
    def probe(**kwargs: Any) -> None:
        pass

    known = envvars_of(probe)
    for name in PROGRAMS:
        shared = {"SOURCE_DSN", "TARGET_DSN", "KAFKA_BOOTSTRAP_SERVERS", "TOPIC_PREFIX", "TABLES"}
        assert shared <= set(environment(SERVICES[name])) and shared <= known


@pytest.mark.parametrize("name", PROGRAMS)
def test_programs_reach_services_by_name(name: str) -> None:
    env = environment(SERVICES[name])
    assert "@postgres-source:5432/testdb" in env["SOURCE_DSN"]
    assert "@postgres-target:5432/testdb" in env["TARGET_DSN"]
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


SOURCE_SETTINGS = (
    "wal_level=logical",
    "max_replication_slots=20",
    "max_wal_senders=20",
    "output_plugin_libraries=pgoutput,test_decoding,wal2json",
)


def test_postgres_services() -> None:
    for name in ("postgres-source", "postgres-target"):
        env = environment(SERVICES[name])
        assert env["POSTGRES_DB"] == "testdb" and env["POSTGRES_PASSWORD"] == "postgres", name
        assert any(":/var/lib/postgresql/data" in v for v in SERVICES[name]["volumes"]), name
    # Pinned to a release with the output-plugin allow-list, which the source's command sets.
    assert SERVICES["postgres-target"]["image"] == "postgres:15.20"
    command = " ".join(command_words(SERVICES["postgres-source"]["command"]))
    for setting in SOURCE_SETTINGS:
        assert f"-c {setting}" in command, f"postgres-source is not started with {setting}"


def test_kafka_listeners() -> None:
    env = environment(SERVICES["kafka"])
    assert base_image(SERVICES["kafka"]).startswith("apache/kafka:")
    advertised = dict(
        item.split("://", 1)[::-1] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )  # address -> listener name
    assert "kafka:9092" in advertised, "other services must reach the broker as kafka:9092"
    external = advertised.get("127.0.0.1:9092")
    assert external, "the host must reach the broker as 127.0.0.1:9092"
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    external_port = int(listeners[external].rsplit(":", 1)[1])
    assert published(SERVICES["kafka"])[9092] == external_port, "host 9092 must map to the EXTERNAL listener"
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
    ):
        assert env[key] == "1", key
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "CLUSTER_ID must be a base64 UUID"


def test_named_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses the undeclared volume {source}"
    assert declared, "the data should live in named volumes"


# --- Dockerfiles ----------------------------------------------------------------------------------


def test_pipeline_dockerfile() -> None:
    found = build_of(SERVICES["writer"])
    assert found is not None
    context, dockerfile = found
    steps = dockerfile_instructions(dockerfile)
    assert steps[0] == ("FROM", "python:3.11-slim")
    copied: set[str] = set()
    for word, args in steps:
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                if not any(c in source for c in "*?["):
                    assert (context / source).exists(), f"COPY {source}: no such file in {context}"
                copied.add(source.strip("./"))
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    missing = [p for p in packages if p not in copied]
    assert not missing, f"pip install . would miss the packages {missing}"
    assert "pyproject.toml" in copied
    assert any(word == "RUN" and "pip install ." in args for word, args in steps)
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"
    for word, args in steps:
        if word in {"ENV", "ARG"}:
            assert not re.search(r"PASSWORD|SECRET|TOKEN|_DSN", args, re.IGNORECASE), f"{word} {args}"


def test_postgres_source_dockerfile() -> None:
    found = build_of(SERVICES["postgres-source"])
    assert found is not None
    steps = dockerfile_instructions(found[1])
    assert steps[0] == ("FROM", "postgres:15.20")
    assert any(
        word == "RUN" and "apt-get install" in args and "postgresql-15-wal2json" in args for word, args in steps
    )
    [cmd] = [args for word, args in steps if word == "CMD"]
    for setting in SOURCE_SETTINGS:
        assert f'"-c", "{setting}"' in cmd, f"the image's CMD does not set {setting}: {cmd}"
