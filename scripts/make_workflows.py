"""Rebuild workflows/*.json and their thumbnails in the real ComfyUI frontend (headless Chromium).

    .venv/bin/python -P scripts/make_workflows.py [name ...]

Each graph in comfy_dg/workflows.py is built with the frontend's LiteGraph and saved as the frontend serializes
it; then the file is loaded back as a user would drop it in and a picture of the canvas is saved beside it.
"""
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from comfy_dg.comfy_env import comfyui_path  # noqa: E402
from harness.comfy_server import ComfyServer  # noqa: E402
from harness.frontend import VIEWPORT, Frontend  # noqa: E402
from harness.workflows import BUILD_JS, FOLDER, WORKFLOWS, spec  # noqa: E402

THUMBNAIL = {"width": 800, "height": 600}


def main(names):
    os.makedirs(FOLDER, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="comfy-dg-workflows-") as base:
        server = ComfyServer(comfyui_path(), base).start()
        fe = Frontend(server)
        try:
            fe.open()
            for wf in WORKFLOWS:
                if names and wf.name not in names:
                    continue
                ids = fe.js(BUILD_JS, spec(wf))
                fe.fit()
                graph = fe.export()
                path = os.path.join(FOLDER, wf.name + ".json")
                with open(path, "w") as f:
                    json.dump(graph, f, indent=2, ensure_ascii=False)
                    f.write("\n")
                fe.load(graph)
                # The templates browser shows thumbnails small and about square: the part of the graph with
                # Discriminator Guidance in it, legible, in a 4:3 window.
                fe.page.set_viewport_size(THUMBNAIL)
                fe.page.wait_for_timeout(300)
                fe.fit_and_screenshot(os.path.join(FOLDER, wf.name + ".jpg"), node_ids=[ids[k] for k in wf.focus],
                                      max_scale=1.0)
                fe.page.set_viewport_size(VIEWPORT)
                fe.page.wait_for_timeout(300)
                print(f"wrote {path} and its thumbnail", flush=True)
        finally:
            fe.close()
            server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
