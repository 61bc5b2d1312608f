from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .compare import ComparisonGrid
from .demo import DecodeDigits, LoadDemoModel
from .guide import DiscriminatorGuidance, DiscriminatorGuidanceV1
from .load import LoadDiscriminator
from .rank import RankByRealism
from .sampler import DGHeunBoosted, DGRejectionSampler
from .train import CombineLatents, EncodeRealImages, SampleFakeLatents, TrainDiscriminator


class DiscriminatorGuidanceExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadDiscriminator, DiscriminatorGuidance, EncodeRealImages, SampleFakeLatents, CombineLatents,
                TrainDiscriminator, ComparisonGrid, RankByRealism, LoadDemoModel, DecodeDigits, DGHeunBoosted,
                DGRejectionSampler, DiscriminatorGuidanceV1]
