"""Registry readiness: pyproject.toml as the Comfy registry reads it, requirements.txt in step with it."""
import ast
import os
import re
import sys
import tomllib

import pytest

from conftest import COMFYUI, REPO

# Modules that come with ComfyUI itself (its own code and its requirements): not the pack's to list.
FROM_COMFYUI = {"torch", "torchvision", "comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths",
                "nodes", "node_helpers", "typing_extensions", "tqdm", "psutil", "yaml", "aiohttp", "server"}
# Import name of each distribution the pack lists.
IMPORT_NAME = {"pillow": "PIL"}


def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def requirement_lines(name):
    with open(os.path.join(REPO, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def dist_name(requirement):
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_pyproject_has_what_the_comfy_registry_needs():
    data = pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    # Registry node id: letters, digits, - _ . ; no leading digit or special character; no runs of specials.
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert len(project["description"]) > 30
    assert os.path.isfile(os.path.join(REPO, project["license"]["file"]))
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+,<=\d+\.\d+\.\d+", comfy["requires-comfyui"]), comfy["requires-comfyui"]
    # The icon's URL points into this repository: the file must be here and within the registry's limits.
    icon = comfy["Icon"]
    repo_path = re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/", "", icon)
    assert repo_path != icon, icon
    from PIL import Image
    with Image.open(os.path.join(REPO, repo_path)) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width <= 800 and im.height <= 400


def test_requirements_txt_matches_pyproject_and_pins_no_torch():
    deps = pyproject()["project"]["dependencies"]
    assert requirement_lines("requirements.txt") == deps
    for name in map(dist_name, deps + requirement_lines("requirements-dev.txt")):
        assert name not in ("torch", "torchvision", "torchaudio"), "torch comes with ComfyUI; never pin it here"


def runtime_imports():
    found = set()
    for folder in ("nodes", "comfy_dg"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO).replace(os.sep, "/")
                if not f.endswith(".py"):
                    continue
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Import):
                        found |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"comfy_dg"}


def test_every_runtime_import_is_listed_or_comes_with_comfyui():
    listed = {IMPORT_NAME.get(dist_name(r), dist_name(r)) for r in pyproject()["project"]["dependencies"]}
    assert runtime_imports() - FROM_COMFYUI <= listed


def test_the_runtime_never_imports_the_harness_or_the_tests():
    assert not runtime_imports() & {"harness", "tests", "conftest"}


def _library_imports():
    """{module: modules of comfy_dg it imports}, every import anywhere in the file (lazy ones too)."""
    graph = {}
    root = os.path.join(REPO, "comfy_dg")
    for folder, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
            edges = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                        + ([node.module] if node.module else []))
                    for alias in node.names:
                        edges.add(base + "." + alias.name if base + "." + alias.name in _MODULES else base)
                elif isinstance(node, ast.Import):
                    edges |= {a.name for a in node.names}
            graph[name] = {e for e in edges if e.startswith("comfy_dg") and e != name}
    return graph


_MODULES = {".".join(os.path.relpath(os.path.join(d, f), REPO)[:-3].split(os.sep)).removesuffix(".__init__")
            for d, _, fs in os.walk(os.path.join(REPO, "comfy_dg")) for f in fs if f.endswith(".py")}


def test_the_library_has_no_import_cycles():
    graph = _library_imports()
    assert set(graph) == _MODULES and "comfy_dg.patch" in graph["comfy_dg"]
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            # A package's own __init__ importing its submodules is how packages are built, not a cycle.
            if not m.startswith(n + "."):
                visit(n, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        visit(m, [])


def test_the_library_is_loaded_once_with_the_pack(pack):
    """The nodes and the tests use one comfy_dg: one set of classes and state per process."""
    import comfy_dg.patch
    copies = sorted(n for n in sys.modules if n.endswith(".comfy_dg") or ".comfy_dg." in n)
    assert copies == []
    guide_node = pack["DiscriminatorGuidanceV2"]
    assert sys.modules[guide_node.__module__].guide is comfy_dg.patch.guide


def test_the_comfyui_under_test_lies_in_the_stated_range():
    """requires-comfyui states the range the suite runs on (scripts/test.sh: its lowest and highest ComfyUI):
    every run checks that its own ComfyUI is inside."""
    from packaging.specifiers import SpecifierSet
    with open(os.path.join(COMFYUI, "comfyui_version.py")) as f:
        version = re.search(r"__version__\s*=\s*[\"']([^\"']+)", f.read()).group(1)
    spec = pyproject()["tool"]["comfy"]["requires-comfyui"]
    assert SpecifierSet(spec).contains(version), f"ComfyUI {version} is tested but outside requires-comfyui {spec}"


def test_publish_workflow_publishes_version_bumps_with_the_registry_action():
    import yaml
    with open(os.path.join(REPO, ".github", "workflows", "publish.yml")) as f:
        text = f.read()
    wf = yaml.safe_load(text)
    on = wf[True] if True in wf else wf["on"]        # YAML 1.1 reads the key `on` as a boolean
    assert on["push"]["paths"] == ["pyproject.toml"] and on["push"]["branches"] == ["main"]
    publish = wf["jobs"]["publish-node"]
    assert "changed == 'true'" in publish["if"]
    action = publish["steps"][-1]
    assert action["uses"].startswith("Comfy-Org/publish-node-action@")
    assert action["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    # The version check reads [project] version, the field the registry publishes.
    assert '["project"]["version"]' in text and "HEAD^:pyproject.toml" in text


@pytest.mark.slow
@pytest.mark.parametrize("where", ["comfy-dg", "ComfyUI/custom_nodes/comfy-dg", "comfy.dg-v1.2"])
def test_a_clone_in_any_folder_name_runs_its_tests(tmp_path, where):
    """The README's own install command makes a folder named `comfy-dg`, which is no Python identifier; pytest
    must not import the root __init__.py (ComfyUI's entry point) as a test package there, nor under custom_nodes."""
    import shutil
    import subprocess
    clone = tmp_path / where
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        if not os.path.isfile(os.path.join(REPO, rel)):     # deleted but not yet committed
            continue
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), clone / rel)
    env = dict(os.environ, COMFYUI_PATH=COMFYUI)
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                        "tests/test_package.py"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert re.search(r"\b\d+ passed", p.stdout), p.stdout
