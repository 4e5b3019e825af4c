"""Efficient-CapsNet (SPEC 7.2) and the inverted-attention CIFAR-10 capsule network (SPEC 7.3):
parameter counts from the papers' architectures, the forward contract, configs, routing modes."""

import functools

import pytest
import torch
from hydra.utils import instantiate

from capsnet.errors import CapsnetError
from capsnet.models.efficient_capsnet import EfficientCapsNet
from capsnet.models.idpa_capsnet import IDPACapsNet, ResNetBackbone
from capsnet.nn.decoder import ReconstructionDecoder
from capsnet.routing.inverted_dot_product import InvertedDotProductRouting
from capsnet.routing.self_attention import SelfAttentionRouting
from capsnet.types import Batch

from helpers import SHARED_DATA, compose_cfg


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


DECODER = functools.partial(ReconstructionDecoder, hidden=(512, 1024))


def efficient(decoder=DECODER, **kw):
    return EfficientCapsNet((1, 28, 28), 10, SelfAttentionRouting, decoder=decoder, **kw)


# ---------------------------------------------------------------- Efficient-CapsNet

def test_efficient_capsnet_has_the_papers_161824_parameters():
    assert n_params(efficient(decoder=None)) == 161_824  # Mazzia et al. (2021), Table/section 4
    decoder = 160 * 512 + 512 + 512 * 1024 + 1024 + 1024 * 784 + 784
    assert n_params(efficient()) == 161_824 + decoder


def test_efficient_capsnet_parameter_count_by_layer():
    """The count is the architecture's: 4 convs with biases + BatchNorm gain/offset, depthwise 9x9, W, prior b."""
    convs = (1 * 25 + 1) * 32 + (32 * 9 + 1) * 64 + (64 * 9 + 1) * 64 + (64 * 9 + 1) * 128
    batchnorm = 2 * (32 + 64 + 64 + 128)
    depthwise = 128 * 81 + 128
    class_caps = 16 * 8 * 10 * 16 + 10 * 16
    model = efficient(decoder=None)
    assert n_params(model.features) == convs + batchnorm
    assert n_params(model.primary) == depthwise
    assert model.weight.numel() + n_params(model.routing) == class_caps
    assert model.routing.prior.shape == (10, 16)


def test_efficient_capsnet_forward_contract():
    model = efficient()
    images = torch.rand(4, 1, 28, 28)
    out = model(images, torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]))
    assert out.scores.shape == (4, 10) and out.poses.shape == (4, 10, 16)
    assert out.reconstructions.shape == (4, 2, 1, 28, 28)
    torch.testing.assert_close(out.scores, out.poses.norm(dim=-1), atol=1e-5, rtol=1e-5)
    model.eval()
    out_eval = model(images, torch.tensor([[1, 2]] * 4))
    assert out_eval.reconstructions.shape == (4, 1, 1, 28, 28)  # the longest capsule at test time
    torch.testing.assert_close(out_eval.reconstructions[:, 0],
                               model.decoder(out_eval.poses, out_eval.scores.argmax(-1)))


def test_efficient_capsnet_decodes_each_column_separately():
    model = efficient()  # training mode: the decoder follows recon_classes
    for m in model.modules():  # keep BatchNorm's batch statistics out of the comparison
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    images, classes = torch.rand(3, 1, 28, 28), torch.tensor([[0, 9], [4, 4], [2, 7]])
    out = model(images, classes)
    for r in range(2):
        torch.testing.assert_close(out.reconstructions[:, r], model.decoder(out.poses, classes[:, r]))


def test_efficient_capsnet_trains_with_the_margin_loss_under_autocast():
    cfg = compose_cfg(["model=efficient_capsnet"])
    model = instantiate(cfg.model, in_shape=(1, 28, 28), num_classes=10)
    loss_fn = instantiate(cfg.loss)
    assert isinstance(model.routing, SelfAttentionRouting)
    batch = Batch(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch.images, batch.recon_classes)
    terms = loss_fn(out, batch)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and model.routing.prior.grad is not None
    model.routing.record = True
    assert model(batch.images).extras["couplings"][0].shape == (4, 16, 10)


# ---------------------------------------------------------------- inverted dot-product attention CapsNet

def resnet_count(c_in=3):
    conv = lambda a, b, k: a * b * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    shortcut = lambda a, b: conv(a, b, 1) + bn(b) if a != b else 0  # noqa: E731
    block = lambda a, b: conv(a, b, 3) + conv(b, b, 3) + 2 * bn(b) + shortcut(a, b)  # noqa: E731
    return conv(c_in, 64, 3) + bn(64) + 3 * block(64, 64) + block(64, 128) + 3 * block(128, 128)


def test_idpa_capsnet_parameter_count_matches_the_architecture():
    """1,828,817 on 3x32x32, the count the authors' code reports for resnet_backbone_CIFAR10.json."""
    model = IDPACapsNet((3, 32, 32), 10, functools.partial(InvertedDotProductRouting, iters=2))
    layer_norm = 2 * 16
    primary = 128 * 32 * 16 + layer_norm  # 1x1 conv without bias
    conv_caps = 3 * 3 * 32 * 32 * 16 + layer_norm  # one 4x4 W per (kernel offset, child type, parent type)
    class_caps = 32 * 5 * 5 * 10 * 16 + layer_norm  # one 4x4 W per (child, class)
    head = 16 + 1
    expected = resnet_count() + primary + 2 * conv_caps + class_caps + head
    assert n_params(model) == expected == 1_828_817


def tiny_idpa(iters=2, concurrent=True, matrix_pose=True, in_shape=(1, 12, 12)):
    dim = 16 if matrix_pose else 6
    backbone = functools.partial(ResNetBackbone, stem_channels=8, channels=(8, 8), blocks=(1, 1), strides=(1, 1))
    return IDPACapsNet(in_shape, 5, functools.partial(InvertedDotProductRouting, iters=iters), backbone=backbone,
                       primary_capsules=3, capsule_dim=dim, matrix_pose=matrix_pose, concurrent=concurrent,
                       conv_caps=[{"capsules": 4, "kernel_size": 3, "stride": 2},
                                  {"capsules": 3, "kernel_size": 3, "stride": 1}])


@pytest.mark.parametrize("matrix_pose", [True, False])
def test_idpa_capsnet_forward_gives_logits_and_gradients(matrix_pose):
    model = tiny_idpa(matrix_pose=matrix_pose)
    out = model(torch.randn(2, 1, 12, 12))
    assert out.scores.shape == (2, 5) and out.poses.shape == (2, 5, 16 if matrix_pose else 6)
    assert out.reconstructions is None
    out.scores.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_idpa_capsnet_one_iteration_concurrent_equals_sequential_and_more_differ():
    x = torch.randn(2, 1, 12, 12)
    outs = {}
    for iters in (1, 3):
        for concurrent in (True, False):
            torch.manual_seed(0)
            outs[iters, concurrent] = tiny_idpa(iters, concurrent).eval()(x).scores
    torch.testing.assert_close(outs[1, True], outs[1, False])
    assert not torch.allclose(outs[3, True], outs[3, False])


def test_idpa_capsnet_config_composes_with_cross_entropy_and_records():
    cfg = compose_cfg(["model=idpa_capsnet", "routing.iters=3", "model.concurrent=false"])
    assert cfg.loss._target_.endswith("CrossEntropyLoss") and cfg.routing.iters == 3
    model = instantiate(cfg.model, in_shape=(3, 32, 32), num_classes=10)
    assert model.iters == 3 and not model.concurrent and n_params(model) == 1_828_817
    small = tiny_idpa(iters=2)
    small.routing.record = True
    couplings = small(torch.randn(2, 1, 12, 12)).extras["couplings"]
    assert len(couplings) == 2 and couplings[0].shape == (2, 3 * 3 * 3, 5)  # 12 -> 5 -> 3: 3 types x 3 x 3


def test_idpa_capsnet_too_small_input_raises_one_line_error():
    with pytest.raises(CapsnetError, match="too small|smaller than the kernel"):
        tiny_idpa(in_shape=(1, 6, 6))


# ---------------------------------------------------------------- learning on real MNIST

@pytest.mark.slow
def test_efficient_capsnet_learns_a_slice_of_real_mnist():
    """2,000 training images, 2 epochs of batch 16 with Adam 5e-4 (the paper's settings): >= 90% on 500 test
    images. BatchNorm's running averages move faster than Keras' 0.99 so that 250 steps settle them."""
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {SHARED_DATA}")
    from torchvision.datasets import MNIST

    from capsnet.losses.capsule import CapsuleLoss

    def tensors(train, n):
        ds = MNIST(str(SHARED_DATA), train=train, download=False)
        return ds.data[:n].float().div(255).unsqueeze(1), ds.targets[:n]

    (x, y), (xt, yt) = tensors(True, 2000), tensors(False, 500)
    torch.manual_seed(0)
    model, loss_fn = efficient(bn_momentum=0.1), CapsuleLoss()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(16):
            batch = Batch(x[idx], y[idx])
            loss = loss_fn(model(batch.images, batch.recon_classes), batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xt).scores.argmax(-1) == yt).float().mean().item()
    assert accuracy >= 0.90, accuracy
