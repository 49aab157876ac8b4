"""deploy/docker, checked without docker: every COPY source exists in the build context
(and .dockerignore keeps it), the images are multi-stage with a non-root final stage
that builds nothing, the health check and exposed ports agree with the process the
image runs (its ENTRYPOINT + CMD parsed by `slotmesh`'s own parser), and the Python
install is scripts/install-python.sh, the script CI's setup runs — for the router image
that script is run here into a fresh venv and the router starts without torch.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.paths import REPO

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

DOCKER = REPO / "deploy" / "docker"
IMAGES = {  # Dockerfile -> (install target, the process, torch build index or None)
    "worker-cpu.Dockerfile": ("worker", "worker", "https://download.pytorch.org/whl/cpu"),
    "worker-gpu.Dockerfile": ("worker", "worker", "https://download.pytorch.org/whl/cu128"),
    "router.Dockerfile": ("router", "router", None),
}
INSTALL = "bash scripts/install-python.sh /opt/slotmesh/bin/python"
BUILD_TOOLS = ("gcc", "g++", "clang", "make", "build-essential", "cmake", "git", "curl",
               "wget", "python3-dev", "python3-venv", "python3-pip")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """ARGs before the first FROM, and the stages: (INSTRUCTION, argument) per line,
    continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    args, stages = {}, []
    for line in logical:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = rest.split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) > 2 else None))
        elif not stages and op == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((op, rest))
    return args, stages


def ignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or
               any(fnmatch.fnmatch(part, p.removeprefix("**/")) for part in parts)
               for p in patterns)


def exec_form(arg: str) -> list[str]:
    return json.loads(arg)


@pytest.mark.parametrize("dockerfile", list(IMAGES))
def test_copy_sources_exist_in_the_build_context(dockerfile) -> None:
    _, stages = parse(DOCKER / dockerfile)
    copied = 0
    for stage in stages:
        for arg in stage.all("COPY"):
            words = shlex.split(arg)
            if any(w.startswith("--from") for w in words):
                continue
            for src in words[:-1]:
                assert (REPO / src).exists(), f"{dockerfile}: COPY {src}: no such file"
                assert not ignored(src.rstrip("/")), f"{dockerfile}: {src} is .dockerignored"
                copied += 1
    assert copied >= 5
    # everything pyproject packages is copied (else `pip install .` would miss it)
    build = stages[0].all("COPY")
    for package in ("protos", "services", "worker", "kernels"):
        assert any(arg.startswith(f"{package}/ ") for arg in build), package


@pytest.mark.parametrize("dockerfile", list(IMAGES))
def test_final_stage_is_non_root_and_builds_nothing(dockerfile) -> None:
    args, stages = parse(DOCKER / dockerfile)
    assert len(stages) >= 2, "multi-stage"
    build, final = stages[0], stages[-1]
    assert build.name == "build" and final.base == build.base  # same interpreter path
    assert args[final.base.strip("${}")]  # the base is a pinned ARG
    user = final.all("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    for arg in final.all("COPY"):
        assert arg == "--from=build /opt/slotmesh /opt/slotmesh", arg  # only the venv
    for arg in final.all("RUN"):
        assert "pip" not in arg and "install-python" not in arg
        words = set(arg.replace(";", " ").replace("&&", " ").split())
        assert not words & set(BUILD_TOOLS), (dockerfile, words & set(BUILD_TOOLS))
    assert not any(".gguf" in a or "fetch-model" in a for _, a in final.instructions), \
        "models are fetched at run time, never baked in"


@pytest.mark.parametrize("dockerfile", list(IMAGES))
def test_stop_signal_health_check_and_ports_match_the_process(dockerfile) -> None:
    from services.cli.main import build_parser
    from services.rpc.health_probe import main as probe_main

    _, process, _ = IMAGES[dockerfile]
    final = parse(DOCKER / dockerfile)[1][-1]
    entrypoint = exec_form(final.all("ENTRYPOINT")[-1])
    cmd = exec_form(final.all("CMD")[-1])
    assert entrypoint == ["slotmesh", process]
    args = build_parser().parse_args(entrypoint[1:] + cmd)
    assert args.host == "0.0.0.0"
    assert final.all("STOPSIGNAL") == ["SIGTERM"]
    [health] = final.all("HEALTHCHECK")
    probe = exec_form(health.split(" CMD ", 1)[1])
    assert probe[:3] == ["python", "-m", "services.rpc.health_probe"]
    assert probe[3] == f"127.0.0.1:{args.port}"
    assert probe_main([*probe[3:], "--timeout", "0.2"]) in (0, 1)  # its flags parse
    exposed = {int(p) for arg in final.all("EXPOSE") for p in arg.split()}
    assert exposed == {args.port, args.metrics_port}
    if process == "worker":
        assert str(args.cache_dir) == "/models" and '["/models"]' in final.all("VOLUME")


@pytest.mark.parametrize("dockerfile", list(IMAGES))
def test_images_install_with_the_script_ci_runs(dockerfile) -> None:
    target, _, torch_index = IMAGES[dockerfile]
    build = parse(DOCKER / dockerfile)[1][0]
    installs = [a for a in build.all("RUN") if "pip" in a or "install-python" in a]
    assert installs == [f"{INSTALL} {target}"], "one install step: the shared script"
    env = " ".join(build.all("ENV"))
    if torch_index:
        assert f"TORCH_INDEX_URL={torch_index}" in env
    else:
        assert "TORCH_INDEX_URL" not in env
    # ... and CI runs the same script: .ci/run -> scripts/test.sh -> scripts/setup.sh
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in (REPO / "scripts" / "test.sh").read_text()
    assert ("bash scripts/install-python.sh .venv/bin/python dev"
            in (REPO / "scripts" / "setup.sh").read_text())
    # torch is pinned in that one place only
    pins = [p.name for p in [*DOCKER.iterdir(), *(REPO / "scripts").iterdir()]
            if "torch==" in p.read_text()]
    assert pins == ["install-python.sh"]


def test_router_install_target_runs_the_router_without_torch(tmp_path) -> None:
    """The router image's install step, for real: a fresh venv, the script's `router`
    target, then the router's command line and imports work and torch is absent."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    out = subprocess.run(["bash", "scripts/install-python.sh", str(python), "router"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    code = ("import importlib.util, sys; import services.router.server, services.rpc.health_probe; "
            "import services.gateway.server; "
            "from services.cli.main import main; "
            "assert importlib.util.find_spec('torch') is None; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules; "
            "sys.exit(main(['router', '--help']))")
    run = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--advertise-address" in run.stdout
