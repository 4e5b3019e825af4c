import torch

from capsnet.losses.capsule import CapsuleLoss, margin_loss, reconstruction_loss
from capsnet.models import ModelOutput


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
    out = ModelOutput(torch.tensor([[0.3, 0.6]]), reconstruction=torch.zeros(1, 1, 2, 2))
    images = torch.ones(1, 1, 2, 2)
    terms = CapsuleLoss(recon_weight=0.5)(out, images, torch.tensor([1]))
    torch.testing.assert_close(terms["recon_loss"], torch.tensor(4.0))
    torch.testing.assert_close(terms["loss"], terms["margin_loss"] + 2.0)
