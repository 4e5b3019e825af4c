import torch

from capsnet.losses.capsule import CapsuleLoss, margin_loss, reconstruction_loss
from capsnet.types import Batch, ModelOutput


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.05, 0.5], [0.2, 0.8, 0.0]])
    target = torch.tensor([0, 2])
    # row 0: present 0.95 >= 0.9 -> 0; absent 0.05 <= 0.1 -> 0; absent 0.5 -> 0.5*(0.4)^2 = 0.08
    # row 1: absent 0.2 -> 0.5*0.01 = 0.005; absent 0.8 -> 0.5*0.49 = 0.245; present 0.0 -> 0.81
    expected = (0.08 + (0.005 + 0.245 + 0.81)) / 2
    torch.testing.assert_close(margin_loss(lengths, target), torch.tensor(expected))


def test_margin_loss_accepts_multi_hot_targets():
    lengths = torch.tensor([[0.5, 0.7, 0.05]])
    multi = torch.tensor([[1.0, 1.0, 0.0]])
    expected = 0.4 ** 2 + 0.2 ** 2  # both present, the third below m_minus
    torch.testing.assert_close(margin_loss(lengths, multi), torch.tensor(expected))


def test_margin_loss_parameters_are_used():
    lengths, target = torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    expected = (1.0 - 0.5) ** 2 + 2.0 * (0.5 - 0.2) ** 2
    torch.testing.assert_close(margin_loss(lengths, target, m_plus=1.0, m_minus=0.2, lam=2.0),
                               torch.tensor(expected))


def test_reconstruction_loss_sums_pixels_and_averages_batch():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0]).view(2, 1, 2, 2)
    torch.testing.assert_close(reconstruction_loss(a, b), torch.tensor((4.0 + 4.0) / 2))


def test_capsule_loss_total_is_margin_plus_weighted_reconstruction():
    out = ModelOutput(scores=torch.tensor([[0.3, 0.6]]), reconstructions=torch.zeros(1, 1, 1, 2, 2))
    batch = Batch(torch.ones(1, 1, 2, 2), torch.tensor([1]))  # the input is the reconstruction target
    terms = CapsuleLoss(recon_weight=0.5)(out, batch)
    torch.testing.assert_close(terms["recon_loss"], torch.tensor(4.0))
    torch.testing.assert_close(terms["loss"], terms["margin_loss"] + 2.0)


def test_two_reconstructions_add_their_squared_errors():
    """MultiMNIST (section 6): margin on the two-hot label + 0.0005 (SSE_1 + SSE_2), each digit its own target."""
    recon = torch.rand(3, 2, 1, 4, 4, dtype=torch.float64)
    parts = torch.rand(3, 2, 1, 4, 4, dtype=torch.float64)
    labels = torch.zeros(3, 10)
    labels[:, 1] = labels[:, 7] = 1
    scores = torch.rand(3, 10, dtype=torch.float64)
    batch = Batch(torch.rand(3, 1, 4, 4), labels, {"reconstruction": parts})
    terms = CapsuleLoss()(ModelOutput(scores=scores, reconstructions=recon), batch)
    sse = sum(((recon[b, r] - parts[b, r]) ** 2).sum() for b in range(3) for r in range(2)) / 3
    margin = sum(labels[b, k] * max(0.0, 0.9 - scores[b, k]) ** 2
                 + 0.5 * (1 - labels[b, k]) * max(0.0, scores[b, k] - 0.1) ** 2
                 for b in range(3) for k in range(10)) / 3
    torch.testing.assert_close(terms["recon_loss"], sse.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["loss"].double(), (margin + 0.0005 * sse).double(), rtol=1e-5, atol=1e-6)
