"""A real ComfyUI server in a subprocess, with this pack installed, on a loopback port (demo and tests)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from . import REPO


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI at `comfyui`, with user files, models and outputs under `base` (--base-directory) and this pack
    linked into base/custom_nodes, plus any extra node packs given (folders copied beside it)."""

    def __init__(self, comfyui: str, base: str, extra_node_packs=()):
        self.comfyui, self.base = comfyui, base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        nodes_dir = os.path.join(base, "custom_nodes")
        os.makedirs(nodes_dir, exist_ok=True)
        os.makedirs(os.path.join(base, "models", "discriminators"), exist_ok=True)
        os.symlink(REPO, os.path.join(nodes_dir, "comfy-dg"))
        for pack in extra_node_packs:
            shutil.copytree(pack, os.path.join(nodes_dir, os.path.basename(pack)))
        self.log_path = os.path.join(base, "server.log")
        self.proc = None

    def start(self, timeout=120, extra_args=(), env=None):
        """`env`: extra environment variables for the server (its server-side settings)."""
        env = dict(os.environ, COMFY_DG_REPO=REPO, PYTHONUNBUFFERED="1", **(env or {}))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", self.base, "--disable-auto-launch", "--disable-metadata", *extra_args],
            cwd=self.comfyui, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start-up:\n{self.read_log()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.read_log()}")

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self.log.close()

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt):
        """(HTTP status, JSON body) of POST /prompt."""
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def interrupt(self):
        """POST /interrupt: stop the prompt that runs now."""
        req = urllib.request.Request(self.url + "/interrupt", data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def run(self, prompt, timeout=120):
        """Queue a prompt and wait for its history entry."""
        status, body = self.post_prompt(prompt)
        if status != 200:
            raise AssertionError(f"prompt refused ({status}): {body}")
        return self.wait(body["prompt_id"], timeout)

    def wait(self, pid, timeout=120):
        """The history entry of the queued prompt `pid`, once it has run."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    return hist[pid]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish:\n{self.read_log()[-3000:]}")
