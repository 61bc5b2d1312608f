import torch
from comfy_api.latest import io, ui

from comfy_dg.pictures import side_by_side


class ComparisonGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGComparisonGrid",
            display_name="Comparison Grid (DG)",
            category="model_patches/discriminator_guidance",
            description="Lays two or three image batches out as labelled grids side by side (e.g. unguided | "
                        "guided with the same seeds), as one image.",
            inputs=[
                io.Image.Input("images_a", tooltip="First panel, e.g. without DG."),
                io.Image.Input("images_b", tooltip="Second panel, e.g. with DG (same seeds)."),
                io.String.Input("label_a", default="unguided", tooltip="Caption of the first panel."),
                io.String.Input("label_b", default="guided (DG)", tooltip="Caption of the second panel."),
                io.Int.Input("columns", default=0, min=0, max=64, tooltip="Images per row in each panel (0: square)."),
                io.Image.Input("images_c", optional=True, tooltip="Optional third panel (e.g. real images)."),
                io.String.Input("label_c", default="real", optional=True,
                                tooltip="Caption of the optional third panel (shown first)."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="The panels side by side, as one image (also "
                                                                 "shown on the node).")],
        )

    @classmethod
    def execute(cls, images_a, images_b, label_a, label_b, columns, images_c=None, label_c="real") -> io.NodeOutput:
        panels = [(images_a, label_a), (images_b, label_b)]
        if images_c is not None:
            panels.insert(0, (images_c, label_c))
        grid = torch.from_numpy(side_by_side(panels, columns)).float().div(255.0)[None]
        # Shown on the node itself, so the comparison is visible without a Preview Image node.
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))
