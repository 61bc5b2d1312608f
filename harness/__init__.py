"""The development harness: a real ComfyUI server and frontend to drive, tiny real models, the workflow builder,
the demo runner and the benchmarks. Imported by tests, scripts and benchmarks; never by the runtime (comfy_dg/,
nodes/)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
