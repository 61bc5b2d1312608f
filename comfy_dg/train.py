"""`python -m comfy_dg.train --help`: train a discriminator from the command line (see comfy_dg/training/cli.py).

Multi-process: `torchrun --nproc_per_node=N -m comfy_dg.train ...` with the same options."""
import sys

from comfy_dg.comfy_env import ensure_comfyui


def main(argv=None) -> int:
    ensure_comfyui()            # before anything imports a comfy module
    from comfy_dg.training.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
