"""The real ComfyUI frontend in headless Chromium (Playwright), for the browser test and the workflow generator.

Needs `playwright` (requirements-dev.txt) and Debian's `chromium`; Playwright's own browser is never downloaded.
"""
import json
import os
import shutil
import time
import urllib.request

CHROMIUM = os.environ.get("COMFY_DG_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        # Nothing but the local server resolves, so nothing waits on the network.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
VIEWPORT = {"width": 1600, "height": 900}

HIDE_PANELS = """body * { visibility: hidden !important; transition: none !important; }
#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }"""

READY = """() => !!(window.app && app.graph && app.vueAppReady && app.extensionManager?.workflow?.activeWorkflow
                 && document.querySelector('#graph-canvas'))"""


def chromium_path():
    """Debian's chromium, or None."""
    return CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")


class Frontend:
    """One Chromium page on a running ComfyServer's UI."""

    def __init__(self, server):
        self.server = server
        self._pw = self._browser = self.page = None
        self.console = []

    def open(self, timeout=60):
        from playwright.sync_api import sync_playwright
        exe = chromium_path()
        if exe is None:
            raise RuntimeError(f"comfy-dg: no chromium at {CHROMIUM}; install Debian's `chromium` package.")
        # Without this the templates dialog covers the canvas of a first visit.
        req = urllib.request.Request(self.server.url + "/settings/Comfy.TutorialCompleted", data=b"true",
                                     method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=exe, args=ARGS)
            self.page = self._browser.new_page(viewport=VIEWPORT)
            self.page.on("console", lambda m: self.console.append((m.type, m.text)))
            self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
            self.page.goto(self.server.url, timeout=timeout * 1000)
            self.page.wait_for_function(READY, timeout=timeout * 1000)
        except Exception:
            self.close()
            raise
        return self

    def close(self):
        if self._browser:
            self._browser.close()
        if self._pw:
            self._pw.stop()
        self._browser = self._pw = None

    def js(self, source, arg=None):
        return self.page.evaluate(source, arg)

    def load(self, workflow):
        """Load a UI-format workflow as the user's drag-and-drop does, minus the dialogs; close other tabs."""
        self.console.clear()
        self.js("""async (wf) => {
            await app.loadGraphData(wf, true, true, null,
                                    {showMissingNodesDialog: false, showMissingModelsDialog: false});
            const ws = app.extensionManager.workflow;
            for (const w of [...ws.openWorkflows]) if (w !== ws.activeWorkflow) await ws.closeWorkflow(w, {warnIfUnsaved: false});
        }""", workflow)

    def serialize(self):
        """The graph as the frontend saves it (through JSON, so nothing undefined turns into null)."""
        return json.loads(self.js("() => JSON.stringify(app.graph.serialize())"))

    def to_prompt(self):
        """The API prompt the frontend would queue (its own graphToPrompt)."""
        return json.loads(self.js("async () => JSON.stringify((await app.graphToPrompt()).output)"))

    def export(self):
        """The workflow as the frontend's own Export writes it (graphToPrompt's `workflow`)."""
        return json.loads(self.js("async () => JSON.stringify((await app.graphToPrompt()).workflow)"))

    def fit(self, node_ids=None, max_scale=1.2):
        """Show the whole graph (or the given nodes) in the window: the view a saved workflow opens with."""
        self.js("""([ids, maxScale]) => {
            app.canvas.show_info = false;
            const nodes = ids ? app.graph._nodes.filter(n => ids.includes(n.id)) : app.graph._nodes;
            const b = nodes.reduce((a, n) => [Math.min(a[0], n.pos[0]), Math.min(a[1], n.pos[1] - 40),
                Math.max(a[2], n.pos[0] + n.size[0]), Math.max(a[3], n.pos[1] + n.size[1])],
                [Infinity, Infinity, -Infinity, -Infinity]);
            const c = app.canvas.canvas, pad = 30;
            const s = Math.min((c.clientWidth - 2 * pad) / (b[2] - b[0]), (c.clientHeight - 2 * pad) / (b[3] - b[1]), maxScale);
            app.canvas.ds.scale = s;
            app.canvas.ds.offset = [(c.clientWidth / s - (b[2] - b[0])) / 2 - b[0],
                                    (c.clientHeight / s - (b[3] - b[1])) / 2 - b[1]];
            app.canvas.setDirty(true, true);
            app.canvas.draw(true, true);
        }""", [node_ids, max_scale])

    def fit_and_screenshot(self, path, quality=None, node_ids=None, max_scale=1.2):
        """Fit the graph (or some of its nodes) to the window, hide the frontend's panels and save a picture of
        the canvas."""
        self.fit(node_ids, max_scale)
        self.page.wait_for_timeout(300)
        # Only the canvas and the widgets drawn over it (prompt boxes): no menus, banners or minimap.
        self.js("(css) => { const s = document.createElement('style'); s.dataset.comfyDg = '1'; "
                "s.textContent = css; document.head.appendChild(s); }", HIDE_PANELS)
        self.page.wait_for_timeout(100)
        kw = {"type": "jpeg", "quality": quality or 85} if path.endswith(".jpg") else {}
        try:
            self.page.locator("#graph-canvas").screenshot(path=path, **kw)
        finally:
            self.js("() => document.querySelectorAll('style[data-comfy-dg]').forEach(s => s.remove())")
        return path


def wait_until(predicate, timeout, step=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None
