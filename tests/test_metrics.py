"""The benchmark's metrics on known cases."""
import numpy as np
import pytest
import scipy.linalg
import torch

from harness.bench.metrics import DigitClassifier, evaluate, knn_precision_recall
from harness.bench.quality import digits_split


def frechet(a, b):
    """The textbook formula with scipy's matrix square root, to check torchmetrics' FID against."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return DigitClassifier().eval().requires_grad_(False)   # untrained: a fixed random feature map is enough here


def test_fd_matches_the_textbook_formula(classifier):
    x_train, _, x_test = digits_split()
    fake = (x_train[:400] + 0.3 * torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    m = evaluate(classifier, x_test, fake)
    f_real = classifier.features(x_test).double().numpy()
    f_fake = classifier.features(fake).double().numpy()
    assert m["fd"] == pytest.approx(frechet(f_real, f_fake), rel=1e-3)
    assert m["fd"] > 0


def test_identical_sets_score_perfectly(classifier):
    _, _, x_test = digits_split()
    m = evaluate(classifier, x_test, x_test.clone())
    assert abs(m["fd"]) < 1e-3 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert abs(m["kid"]) < 1e-3


def test_knn_precision_recall_known_cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, generator=g)
    far = a + 100.0
    assert knn_precision_recall(a, far) == (0.0, 0.0)
    # Fakes collapsed onto a quarter of the real support: precise, but low recall.
    sub = a[a[:, 0] > a[:, 0].quantile(0.75)]
    p, r = knn_precision_recall(a, sub + 1e-3)
    assert p > 0.95 and r < 0.6


def test_kid_grows_with_distance(classifier):
    _, _, x_test = digits_split()
    g = torch.Generator().manual_seed(2)
    near = (x_test + 0.1 * torch.randn(x_test.shape, generator=g)).clamp(-1, 1)
    far = (x_test + 0.8 * torch.randn(x_test.shape, generator=g)).clamp(-1, 1)
    assert evaluate(classifier, x_test, near)["kid"] < evaluate(classifier, x_test, far)["kid"]
