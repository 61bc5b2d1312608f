"""Sample-quality metrics for 8×8 digits, in the feature space of a digit classifier trained on the training
split (the benchmark's "Inception"): Fréchet distance and KID (torchmetrics, with this classifier as the
feature extractor), k-NN precision and recall (Kynkäänniemi et al. 2019), and classifier confidence."""
import torch
from torch import nn
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    """A small CNN on (N, 1, 8, 8) images in [-1, 1]; `features` is its 128-d penultimate layer."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(images, labels, epochs=30, seed=0):
    """images (N, 1, 8, 8) in [-1, 1], labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        net = DigitClassifier()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=g).split(64):
                x = images[idx]
                # ±1 pixel shifts, so the features do not hinge on exact positions
                dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(net(x), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval().requires_grad_(False)


class _FeatureExtractor(nn.Module):
    """torchmetrics' image metrics take (N, 3, H, W) images in [0, 1]; this hands our 8×8 digits to the classifier."""

    num_features = DigitClassifier.num_features

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, img):
        gray = img.float().mean(dim=1, keepdim=True)
        if gray.shape[-1] != 8:
            gray = F.interpolate(gray, size=(8, 8), mode="area")
        return self.classifier.features(gray * 2.0 - 1.0)


def _as_rgb01(x):
    return ((x.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)


def knn_precision_recall(real_feats, fake_feats, k=3):
    """Precision: share of fakes inside some real sample's k-NN ball; recall: the reverse."""
    def radii(f):
        d = torch.cdist(f, f)
        return d.kthvalue(k + 1, dim=1).values     # k+1: the point itself is its own nearest neighbour

    def coverage(ref, ref_r, query):
        return (torch.cdist(query, ref) <= ref_r[None]).any(dim=1).float().mean().item()
    real_feats, fake_feats = real_feats.double(), fake_feats.double()
    return coverage(real_feats, radii(real_feats), fake_feats), coverage(fake_feats, radii(fake_feats), real_feats)


@torch.no_grad()
def evaluate(classifier, real, fake, kid_subset=None):
    """All metrics of `fake` (N, 1, 8, 8) against `real` (M, 1, 8, 8), both in [-1, 1]."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    extractor = _FeatureExtractor(classifier)
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    n = min(len(real), len(fake))
    kid = KernelInceptionDistance(feature=extractor, normalize=True, subset_size=kid_subset or min(n, 500))
    for metric in (fid, kid):
        metric.update(_as_rgb01(real), real=True)
        metric.update(_as_rgb01(fake), real=False)
    kid_mean, _ = kid.compute()
    precision, recall = knn_precision_recall(classifier.features(real), classifier.features(fake))
    confidence = F.softmax(classifier(fake.clamp(-1, 1)), dim=1).max(dim=1).values.mean().item()
    return {"fd": float(fid.compute()), "kid": float(kid_mean), "precision": precision, "recall": recall,
            "confidence": confidence}
