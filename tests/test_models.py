import pytest
import torch
from hydra.utils import instantiate

from capsnet.train.run import count_parameters
from helpers import TINY_CAPSNET, compose_cfg


def build(overrides=(), in_shape=(1, 28, 28), num_classes=10):
    cfg = compose_cfg(overrides)
    return instantiate(cfg.model, in_shape=in_shape, num_classes=num_classes)


@pytest.mark.parametrize("overrides, expected", [
    (["model=capsnet"], 8_215_568),
    (["model=capsnet", "model.decoder=null"], 6_804_224),
    (["model=capsnet_small"], 22_848),
    (["model=baseline_cnn"], 35_445_522),
])
def test_parameter_counts_equal_the_papers(overrides, expected):
    assert count_parameters(build(overrides)) == expected


@pytest.mark.parametrize("experiment, in_shape, expected, primary", [
    ("paper_multimnist", (1, 36, 36), 11_361_808, 3_200),   # SPEC 5.1
    ("paper_affnist", (1, 40, 40), 13_475_648, 4_608),      # SPEC 5.2, expanded MNIST
    ("paper_cifar10", (3, 24, 24), 22_476_288, 9_216),      # SPEC 5.5, the official setting
])
def test_the_paper_models_of_the_other_datasets_have_their_parameter_counts(experiment, in_shape, expected,
                                                                            primary):
    from capsnet.train.build import build_data, compose_config

    cfg = compose_config([f"experiment={experiment}"])
    assert build_data(cfg).eval_transforms is not None  # the preset composes with its dataset
    model = build([f"experiment={experiment}"], in_shape=in_shape)
    assert count_parameters(model) == expected and model.class_caps.in_capsules == primary


def test_capsnet_small_uses_its_own_routing_defaults():
    model = build(["model=capsnet_small"])
    assert model.routing.iters == 5 and model.routing.squash_name == "keras"
    assert build(["model=capsnet_small", "routing.iters=2"]).routing.iters == 2


def test_routing_iters_override_reaches_the_model():
    assert build(["routing.iters=4", *TINY_CAPSNET]).routing.iters == 4


def test_decoder_masks_with_the_given_classes_else_with_the_longest_capsule():
    model = build(TINY_CAPSNET)
    with torch.no_grad():
        model.class_caps.weight.mul_(1000.0)  # poses far from zero, so every mask decodes differently
    x, target = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    model.train()
    out = model(x, target.unsqueeze(1))
    assert out.reconstructions.shape == (6, 1, 1, 28, 28)
    torch.testing.assert_close(out.reconstructions[:, 0], model.decoder(out.poses, target))
    two = torch.stack([target, (target + 3) % 10], 1)  # MultiMNIST: one decoding per listed class
    out2 = model(x, two)
    torch.testing.assert_close(out2.reconstructions[:, 1], model.decoder(out.poses, two[:, 1]))
    model.eval()
    out = model(x)
    predicted = out.scores.argmax(-1)
    torch.testing.assert_close(out.reconstructions[:, 0], model.decoder(out.poses, predicted))
    other = (predicted + 1) % 10
    assert not torch.allclose(out.reconstructions[:, 0], model.decoder(out.poses, other))


def test_decoder_sees_only_the_selected_capsule():
    model = build(TINY_CAPSNET)
    poses = torch.randn(2, 10, 4)
    changed = poses.clone()
    changed[:, 5:] += 1.0  # capsules other than the selected class 1
    select = torch.tensor([1, 1])
    torch.testing.assert_close(model.decoder(poses, select), model.decoder(changed, select))


def test_forward_shapes():
    out = build(TINY_CAPSNET)(torch.rand(3, 1, 28, 28))
    assert out.scores.shape == (3, 10) and out.poses.shape == (3, 10, 4)
    assert out.reconstructions.shape == (3, 1, 1, 28, 28)
    assert ((out.scores > 0) & (out.scores < 1)).all()
