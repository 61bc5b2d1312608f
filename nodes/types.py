from comfy_api.latest import io

Discriminator = io.Custom("DISCRIMINATOR")
