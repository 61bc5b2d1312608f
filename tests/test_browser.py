"""The shared workflows in the real ComfyUI frontend: headless Chromium on a real server with the pack installed.

Each file in workflows/ is loaded as a user's drag-and-drop loads it, checked for missing node types and widget
errors, photographed, converted by the frontend's own graphToPrompt and handed to the server: the server may
refuse it only for model files that are not installed (the file's `models` list names them); the CPU demo must
run to completion and produce its image.

Screenshots go to tests/.artifacts/browser/ (or $COMFY_DG_ARTIFACTS). With COMFY_DG_UPDATE_DOCS=1 they are also
copied to docs/screenshots/ for the README (scripts/screenshots.sh).
"""
import json
import os
import shutil
import time
import urllib.request

import pytest

from harness.comfy_server import ComfyServer
from harness.frontend import CHROMIUM, Frontend, chromium_path, wait_until
from harness.workflows import FOLDER, WORKFLOWS, declared_models
from conftest import COMFYUI, REPO

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run

NAMES = [wf.name for wf in WORKFLOWS]
ARTIFACTS = os.environ.get("COMFY_DG_ARTIFACTS") or os.path.join(REPO, "tests", ".artifacts", "browser")
UPDATE_DOCS = os.environ.get("COMFY_DG_UPDATE_DOCS") == "1"
DOCS = os.path.join(REPO, "docs", "screenshots")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Inputs that name a model file; with the file absent, these are the only validation errors allowed.
MODEL_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "discriminator_name"}
# Nodes the frontend alone runs (notes): graphToPrompt leaves them out.
FRONTEND_ONLY = {"MarkdownNote", "Note"}


def need_browser():
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing = "the playwright package (requirements-dev.txt)"
    else:
        missing = None if chromium_path() else f"Debian's chromium ({CHROMIUM}; apt-get install chromium)"
    if missing:
        # In CI the browser test must run: .ci/run installs chromium.
        (pytest.fail if IN_CI else pytest.skip)(f"browser test needs {missing}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyServer(COMFYUI, str(tmp_path_factory.mktemp("comfy"))).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def frontend(server):
    need_browser()
    os.makedirs(ARTIFACTS, exist_ok=True)
    fe = Frontend(server).open()
    yield fe
    fe.close()
    print(f"\nbrowser screenshots: {ARTIFACTS}")


def read_workflow(name):
    with open(os.path.join(FOLDER, name + ".json")) as f:
        return json.load(f)


def test_workflow_files_are_ui_format_with_thumbnails_and_served_as_templates(server):
    assert sorted(f[:-5] for f in os.listdir(FOLDER) if f.endswith(".json")) == sorted(NAMES)
    for name in NAMES:
        wf = read_workflow(name)
        assert wf["version"] == 0.4 and wf["links"] and "extra" in wf, name
        for node in wf["nodes"]:
            assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= set(node), (name, node)
        for model in declared_models(wf):
            assert set(model) == {"name", "url", "directory"}, (name, model)
        assert os.path.getsize(os.path.join(FOLDER, name + ".jpg")) > 10_000, f"{name}: thumbnail missing"
    # The templates browser lists a pack's workflows and asks for <name>.jpg beside each.
    listed = server.get("/workflow_templates")["comfy-dg"]
    assert sorted(listed) == sorted(NAMES)
    for name in NAMES:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/comfy-dg/{name}.jpg", timeout=30) as r:
            assert r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 10_000


def test_workflows_show_under_browse_templates_with_their_thumbnails(frontend):
    frontend.js("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = frontend.page.locator("[role=dialog]")
    dialog.get_by_text("comfy-dg", exact=True).click(timeout=120_000)     # the dialog is slow on a busy machine
    loaded = """() => Array.from(document.querySelectorAll('[role=dialog] img'))
                          .filter(i => i.complete && i.naturalWidth > 0).map(i => i.alt)"""
    frontend.page.wait_for_function(f"() => ({loaded})().length >= {len(NAMES)}", timeout=120_000)
    assert sorted(frontend.js(loaded)) == sorted(NAMES)
    shot = os.path.join(ARTIFACTS, "templates_browser.png")
    dialog.screenshot(path=shot)
    if UPDATE_DOCS:
        os.makedirs(DOCS, exist_ok=True)
        shutil.copy(shot, DOCS)
    dialog.locator("button:has(i.pi-times)").click()
    frontend.page.wait_for_function("() => !document.querySelector('[role=dialog]')", timeout=60_000)


def frontend_errors(fe):
    """Errors the page logged while loading (resource 404s of absent optional files aside)."""
    return [text for kind, text in fe.console
            if kind == "pageerror" or (kind == "error" and not text.startswith("Failed to load resource"))]


CHECK_GRAPH_JS = """() => {
    const out = {missing: [], errors: [], badWidgets: [], absentModels: []};
    for (const n of app.graph._nodes) {
        if (!LiteGraph.registered_node_types[n.type]) out.missing.push(n.type);
        if (n.has_errors) out.errors.push(n.type);
        const models = new Set((n.properties?.models || []).map(m => m.name));
        let absent = false;
        for (const w of n.widgets || []) {
            const o = w.options || {};
            if (w.type === 'combo') {
                const values = typeof o.values === 'function' ? o.values() : o.values;
                if (Array.isArray(values) && !values.includes(w.value)) {
                    if (!models.has(w.value)) out.badWidgets.push([n.type, w.name, w.value]);
                    else absent = true;
                }
            } else if (typeof w.value === 'number' && ((o.min !== undefined && w.value < o.min) ||
                                                        (o.max !== undefined && w.value > o.max))) {
                out.badWidgets.push([n.type, w.name, w.value]);
            }
        }
        if (absent) out.absentModels.push(n.type);
    }
    return out;
}"""


@pytest.fixture(scope="module")
def flags_absent_models(frontend):
    """Whether this frontend flags a loader whose file is not installed (newer frontends mark the node, older ones
    leave it alone): found by loading a graph of one such loader."""
    wf = read_workflow("1_sd15_text_to_image_dg")
    loader = next(n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert loader["properties"]["models"][0]["name"] == loader["widgets_values"][0]
    loader = dict(loader, outputs=[dict(o, links=[]) for o in loader.get("outputs", [])])
    frontend.load(dict(wf, nodes=[loader], links=[], groups=[]))
    check = frontend.js(CHECK_GRAPH_JS)
    assert check["absentModels"] == ["CheckpointLoaderSimple"] and check["errors"] in ([], ["CheckpointLoaderSimple"])
    return check["errors"] == ["CheckpointLoaderSimple"]


@pytest.fixture(scope="module")
def validates_v3_combos(server):
    """Whether this ComfyUI's prompt validation checks a V3 combo's value (newer ones do; older ones let it through
    to the node, which then refuses it when it runs): found with the demo graph naming an absent discriminator."""
    from harness.demo import demo_prompt
    prompt = demo_prompt(batch=1, steps=1)
    prompt["2"]["inputs"]["discriminator_name"] = "absent_probe_dg.safetensors"
    del prompt["13"]        # the unguided latent's output: every output left needs the discriminator
    status, body = server.post_prompt(prompt)
    if status == 400:
        [(node, err)] = body["node_errors"].items()
        assert node == "2" and [e["type"] for e in err["errors"]] == ["value_not_in_list"], body
        return True
    assert status == 200, body
    hist = wait_for_history(server, body["prompt_id"], timeout=120)
    assert hist["status"]["status_str"] == "error"
    assert "absent_probe_dg.safetensors" in json.dumps(hist["status"]["messages"]), hist["status"]["messages"]
    return False


def wait_for_history(server, prompt_id, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = server.get(f"/history/{prompt_id}").get(prompt_id)
        if hist and hist.get("status", {}).get("status_str") in ("success", "error"):
            return hist
        time.sleep(0.3)
    raise TimeoutError(f"prompt {prompt_id} did not finish:\n{server.read_log()[-3000:]}")


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_converts_and_validates_in_the_real_frontend(server, frontend, flags_absent_models,
                                                                   validates_v3_combos, name):
    wf = read_workflow(name)
    frontend.load(wf)

    # Loaded as saved: every node type known, every widget value where the file put it (a model file that is not
    # installed only where the file's `models` list names it), and no node flagged except, in a frontend that
    # flags them, exactly the loaders of those absent files.
    check = frontend.js(CHECK_GRAPH_JS)
    assert check["missing"] == [] and check["badWidgets"] == [], check
    assert check["errors"] == (check["absentModels"] if flags_absent_models else []), check
    assert bool(check["absentModels"]) == bool(declared_models(wf)), check
    assert frontend_errors(frontend) == []
    reloaded = {n["id"]: n for n in frontend.serialize()["nodes"]}
    for node in wf["nodes"]:
        assert reloaded[node["id"]]["type"] == node["type"]
        # (An empty list and an absent one are the same to the frontend.)
        assert (reloaded[node["id"]].get("widgets_values") or []) == (node.get("widgets_values") or []), node
    shot = frontend.fit_and_screenshot(os.path.join(ARTIFACTS, name + ".png"))
    if UPDATE_DOCS:
        os.makedirs(DOCS, exist_ok=True)
        shutil.copy(shot, DOCS)

    # The frontend's own conversion to the API prompt, then the server's validation.
    prompt = frontend.to_prompt()
    assert sorted(prompt, key=int) == sorted((str(n["id"]) for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY), key=int)
    missing = {m["name"] for m in declared_models(wf)}
    if missing:
        status, body = server.post_prompt(prompt)
        assert status == 400, f"{name}: expected the absent model files to be refused, got {status} {body}"
        refused = set()
        for node_id, err in body["node_errors"].items():
            for e in err["errors"]:
                info = e.get("extra_info", {})
                assert e["type"] == "value_not_in_list" and info.get("input_name") in MODEL_INPUTS, (node_id, e)
                assert info["received_value"] in missing, (node_id, e)
                refused.add(info["received_value"])
        # Every absent file is refused, but a ComfyUI that lets V3 combos through validation lets Load
        # Discriminator's through (the node refuses it when it runs: see validates_v3_combos).
        assert refused == {m for m in missing if validates_v3_combos or not m.endswith("_dg.safetensors")}, refused
        return

    # Nothing to download: queued as the Run button queues it, the workflow runs to completion on the CPU.
    before = set(server.get("/history"))
    # (Its return value is no verdict: it is false whenever the server sends node_errors, even an empty one.)
    frontend.js("() => app.queuePrompt(0, 1)")
    prompt_id = wait_until(lambda: set(server.get("/history")) - before or server.get("/queue")["queue_running"],
                           timeout=30)
    assert prompt_id, f"nothing was queued: {frontend_errors(frontend)}"
    prompt_id = (list(prompt_id)[0] if isinstance(prompt_id, set) else prompt_id[0][1])
    hist = wait_for_history(server, prompt_id, timeout=240)
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert hist["prompt"][2] == prompt   # what the Run button sent is graphToPrompt's output
    pictures = {}
    for node in wf["nodes"]:
        for image in hist["outputs"].get(str(node["id"]), {}).get("images", []):
            folder = os.path.join(server.base, image["type"], image["subfolder"])
            pictures.setdefault(node["type"], []).append(os.path.join(folder, image["filename"]))
    # Saved by Save Image, and shown on the Comparison Grid node itself.
    assert set(pictures) >= {"SaveImage", "DGComparisonGrid"}, pictures
    from PIL import Image
    with Image.open(pictures["SaveImage"][0]) as im:
        assert im.width > 500 and im.height > 250
    out = shutil.copy(pictures["SaveImage"][0], os.path.join(ARTIFACTS, name + "_output.png"))
    # The page got the run's messages too: the grid shows on its node.
    grid = next(n["id"] for n in wf["nodes"] if n["type"] == "DGComparisonGrid")
    frontend.page.wait_for_function("(id) => app.graph.getNodeById(id)?.imgs?.length > 0", arg=grid, timeout=30_000)
    ran = frontend.fit_and_screenshot(os.path.join(ARTIFACTS, name + "_after_run.png"))
    if UPDATE_DOCS:
        for f in (out, ran):
            shutil.copy(f, DOCS)


def test_the_checks_catch_a_broken_workflow(frontend):
    wf = read_workflow("1_sd15_text_to_image_dg")
    by_type = {n["type"]: n for n in wf["nodes"]}
    by_type["VAEDecode"]["type"] = "NoSuchNode"
    by_type["KSampler"]["widgets_values"][4] = "no_such_sampler"
    by_type["EmptyLatentImage"]["widgets_values"][0] = 1_000_000
    frontend.load(wf)
    check = frontend.js(CHECK_GRAPH_JS)
    assert check["missing"] == ["NoSuchNode"]
    assert sorted(check["badWidgets"]) == [["EmptyLatentImage", "width", 1_000_000],
                                           ["KSampler", "sampler_name", "no_such_sampler"]]


def test_every_node_is_described_with_tooltips_and_consistent_names(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if "comfy-dg" in v.get("python_module", "")}
    # Ten nodes (Rank by Realism the tenth), the boosting sampler, and the first guidance node kept (deprecated)
    # for old workflows.
    assert len(ours) == 13, sorted(ours)
    assert ours["DiscriminatorGuidance"].get("deprecated") and not ours["DiscriminatorGuidanceV2"].get("deprecated")
    for node_id, d in ours.items():
        assert len(d["description"]) > 40, node_id
        assert d["category"].startswith("model_patches/discriminator_guidance"), (node_id, d["category"])
        name = d["display_name"]
        assert name.endswith("(DG)") or "Discriminator" in name, (node_id, name)
        for group in ("required", "optional"):
            for input_name, spec in d["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (node_id, input_name)
        assert len(d["output_tooltips"]) == len(d["output"]) and all(d["output_tooltips"]), (node_id, d["output_tooltips"])
    # Node definitions reach the frontend with the same text.
    assert len({d["display_name"] for d in ours.values()}) == len(ours)


def test_a_nodes_help_page_opens_in_the_frontend(frontend):
    """Select Discriminator Guidance in the demo workflow, press the selection toolbox's info button: the side
    panel shows the pack's own help page (web/docs/<node id>.md), not the one-line description."""
    frontend.load(read_workflow("6_cpu_demo_digits"))
    frontend.js("""() => {
        const node = app.graph._nodes.find(n => n.type.startsWith('DiscriminatorGuidance'));
        app.canvas.deselectAll(); app.canvas.selectNode(node); app.canvas.setDirty(true, true);
    }""")
    frontend.page.locator("[data-testid=info-button]").first.click(timeout=30_000)
    marker = "Every guided model evaluation becomes"      # a sentence of the help page only
    frontend.page.get_by_text(marker).first.wait_for(timeout=30_000)
    assert frontend.page.get_by_role("heading", name="Inputs").first.is_visible()
    shot = os.path.join(ARTIFACTS, "node_help.png")
    frontend.page.screenshot(path=shot)
    if UPDATE_DOCS:
        os.makedirs(DOCS, exist_ok=True)
        shutil.copy(shot, DOCS)
