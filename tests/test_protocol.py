"""protocol=paper|official: each switch of the official TensorFlow code against a hand computation.

The official code: github.com/Sarasra/models, research/capsules (docs/fidelity.md cites each line).
"""

import math
from contextlib import nullcontext

import pytest
import torch
from omegaconf import OmegaConf

from capsnet.errors import CapsnetError
from capsnet.types import Batch, ModelOutput
from helpers import FAST, TINY_CAPSNET, compose_cfg, make_mnist

# Spread of N(0, 1) truncated to [-2, 2]: 1 - 2 * 2 * pdf(2) / (cdf(2) - cdf(-2)) is its variance.
PDF2, MASS2 = math.exp(-2.0) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
TRUNC_STD = math.sqrt(1 - 4 * PDF2 / MASS2)  # about 0.880


# --- the loss ------------------------------------------------------------------------------------
def official_margin_loss(lengths, labels):
    """layers.py `_margin_loss` + `evaluate`: written out per element in float64 (a reference, not fast)."""
    b, k = lengths.shape
    total = 0.0
    for n in range(b):
        for j in range(k):
            logit = float(lengths[n, j]) - 0.5
            if j == int(labels[n]):
                total += 0.5 * (logit - 0.4) ** 2 if logit < 0.4 else 0.0
            else:
                total += 0.5 * 0.5 * (logit + 0.4) ** 2 if logit > -0.4 else 0.0
    return total / (b * k)  # tf.reduce_mean over [batch, classes]


def eq4(lengths, labels):
    """Eq. 4 summed over the classes, mean over the batch, float64 loops."""
    total = 0.0
    for n in range(lengths.shape[0]):
        for j in range(lengths.shape[1]):
            v = float(lengths[n, j])
            total += max(0.0, 0.9 - v) ** 2 if j == int(labels[n]) else 0.5 * max(0.0, v - 0.1) ** 2
    return total / lengths.shape[0]


def test_the_official_margin_loss_is_one_twentieth_of_eq4_and_leaves_the_reconstruction_term_alone():
    from capsnet.losses.capsule import CapsuleLoss

    g = torch.Generator().manual_seed(1)
    lengths, labels = torch.rand(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    images = torch.rand(16, 1, 4, 4, generator=g)
    recon = torch.rand(16, 1, 1, 4, 4, generator=g)
    out, batch = ModelOutput(scores=lengths, reconstructions=recon), Batch(images, labels)
    sse = float((recon[:, 0] - images).square().flatten(1).sum(1).mean())
    official = CapsuleLoss(margin_scale=0.05)(out, batch)
    paper = CapsuleLoss()(out, batch)
    assert float(official["margin_loss"]) == pytest.approx(official_margin_loss(lengths, labels), rel=1e-5)
    assert float(official["margin_loss"]) == pytest.approx(eq4(lengths, labels) / 20, rel=1e-5)
    assert float(paper["margin_loss"]) == pytest.approx(eq4(lengths, labels), rel=1e-5)
    assert float(official["loss"]) == pytest.approx(official_margin_loss(lengths, labels) + 0.0005 * sse, rel=1e-5)
    with pytest.raises(CapsnetError, match="loss.margin_scale"):
        CapsuleLoss(margin_scale=0.0)


# --- initialisation ------------------------------------------------------------------------------
def assert_truncated_normal(weight: torch.Tensor, std: float):
    w = weight.detach().double().flatten()
    assert w.abs().max() <= 2 * std * (1 + 1e-6)  # nothing beyond 2 std
    assert w.mean().abs() < 0.05 * std
    assert w.std() == pytest.approx(std * TRUNC_STD, rel=0.03)
    assert (w.abs() > 1.5 * std).any()  # a truncated normal, not a squeezed one


def test_truncated_normal_initialisation_and_biases_of_every_layer():
    from capsnet.nn.capsules import ClassCapsules, PrimaryCapsules
    from capsnet.nn.decoder import ReconstructionDecoder
    from capsnet.nn.features import ConvFeatures

    caps = ClassCapsules(in_capsules=64, in_dim=8, out_capsules=10, out_dim=16, init="truncated_normal",
                         init_std=0.1, bias=True, bias_init=0.1)
    assert_truncated_normal(caps.weight, 0.1)
    assert torch.equal(caps.bias, torch.full((10, 16), 0.1))
    feats = ConvFeatures(in_channels=1, channels=[64], kernel_size=9, init="truncated_normal", init_std=0.05)
    assert_truncated_normal(feats[0].weight, 0.05)
    assert torch.equal(feats[0].bias, torch.full((64,), 0.1))
    prim = PrimaryCapsules(in_channels=16, capsules=8, capsule_dim=8, init="truncated_normal")
    assert_truncated_normal(prim.conv.weight, 0.1)
    assert torch.equal(prim.conv.bias, torch.full((64,), 0.1))
    dec = ReconstructionDecoder(num_classes=10, capsule_dim=16, out_shape=(1, 28, 28), hidden=[64, 128],
                                init="truncated_normal")
    linears = [m for m in dec.net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    for layer in linears:
        assert_truncated_normal(layer.weight, 0.1)
        assert torch.equal(layer.bias, torch.full_like(layer.bias, 0.1))
    with pytest.raises(CapsnetError, match="model.decoder.init"):
        ReconstructionDecoder(num_classes=10, capsule_dim=16, out_shape=(1, 2, 2), init="xavier")


def test_the_paper_initialisation_draws_what_it_drew_before():
    """The defaults take the same random draws as before the switches: N(0, 0.01) W, zero bias, PyTorch's convs."""
    from capsnet.nn.capsules import ClassCapsules, PrimaryCapsules
    from capsnet.nn.features import ConvFeatures

    torch.manual_seed(3)
    caps = ClassCapsules(in_capsules=6, in_dim=8, out_capsules=10, bias=True)
    feats = ConvFeatures(in_channels=1, channels=[4], kernel_size=3)
    prim = PrimaryCapsules(in_channels=4, capsules=2, capsule_dim=3, kernel_size=3)
    torch.manual_seed(3)
    weight = torch.randn(6, 8, 160) * 0.01
    conv, conv2 = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 6, 3, 2)
    assert torch.equal(caps.weight, weight) and torch.equal(caps.bias, torch.zeros(10, 16))
    assert torch.equal(feats[0].weight, conv.weight) and torch.equal(feats[0].bias, conv.bias)
    assert torch.equal(prim.conv.weight, conv2.weight) and torch.equal(prim.conv.bias, conv2.bias)


# --- primary capsules ----------------------------------------------------------------------------
def test_primary_preactivation_is_the_convolution_over_the_types_plus_a_bias():
    """The official one-iteration routing over 32 types: couplings softmax(0) = 1/32, then + bias, squash."""
    from capsnet.nn.capsules import PrimaryCapsules

    types, dim, k, s = 32, 2, 3, 2
    layer = PrimaryCapsules(in_channels=2, capsules=types, capsule_dim=dim, kernel_size=k, stride=s,
                            divide_by_types=True).double()
    with torch.no_grad():
        layer.conv.bias.normal_()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    w, bias = layer.conv.weight, layer.conv.bias
    route = torch.softmax(torch.zeros(types, dtype=torch.float64), 0)  # logits start at 0 (layers.py 127)
    h = (5 - k) // s + 1
    want = torch.zeros(2, types * h * h, dim, dtype=torch.float64)
    for n in range(2):
        for t in range(types):
            for i in range(h):
                for j in range(h):
                    patch = x[n, :, i * s:i * s + k, j * s:j * s + k]
                    pre = torch.stack([float(route[t]) * (w[t * dim + a] * patch).sum() + bias[t * dim + a]
                                       for a in range(dim)])
                    sq = pre.square().sum()
                    want[n, t * h * h + i * h + j] = sq / (1 + sq) * pre / sq.sqrt()
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer.preactivation(x)[0, 5, 1, 0], (w[5] * x[0, :, 2:5, 0:3]).sum() / 32 + bias[5])
    plain = PrimaryCapsules(in_channels=2, capsules=types, capsule_dim=dim, kernel_size=k, stride=s).double()
    plain.load_state_dict(layer.state_dict())  # the same parameters: only the division differs
    torch.testing.assert_close(plain.preactivation(x), layer.conv(x))


# --- learning rate -------------------------------------------------------------------------------
def test_the_learning_rate_decays_smoothly_to_its_floor_and_stays_there():
    from capsnet.train.optim import exponential_decay

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-3)
    sched = exponential_decay(opt, decay_rate=0.5, decay_steps=2, min_lr=1e-6)
    seen = []
    for step in range(1, 41):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
        assert seen[-1] == pytest.approx(max(1e-3 * 0.5 ** (step / 2), 1e-6), rel=1e-9), step
    assert seen[-1] == 1e-6 and seen.count(1e-6) > 15  # reached at step 20 (2^-10 < 1e-3), kept
    again = exponential_decay(torch.optim.Adam([param], lr=1e-3), decay_rate=0.5, decay_steps=2, min_lr=1e-6)
    again.load_state_dict(sched.state_dict())
    assert again.min_lr == 1e-6 and again.last_epoch == 40
    assert type(exponential_decay(opt)) is torch.optim.lr_scheduler.ExponentialLR  # the paper: unchanged
    with pytest.raises(CapsnetError, match="min_lr"):
        exponential_decay(opt, min_lr=-1.0)


# --- evaluation ----------------------------------------------------------------------------------
class Recording(torch.nn.Module):
    """A loss that keeps what it was given."""

    def forward(self, out, batch):
        self.out = out
        return {"loss": out.scores.sum() * 0}


def test_evaluation_with_labels_decodes_the_true_labels_capsule():
    from capsnet.models import CapsNet
    from capsnet.nn.capsules import ClassCapsules, PrimaryCapsules
    from capsnet.nn.decoder import ReconstructionDecoder
    from capsnet.nn.features import ConvFeatures
    from capsnet.train.engine import evaluate
    from functools import partial

    model = CapsNet((1, 12, 12), 4, partial(ConvFeatures, channels=[4], kernel_size=3),
                    partial(PrimaryCapsules, capsules=2, capsule_dim=4, kernel_size=3),
                    partial(ClassCapsules, out_dim=4, init_std=0.5),
                    partial(ReconstructionDecoder, hidden=[8], init="truncated_normal", init_std=1.0)).eval()
    images = torch.rand(6, 1, 12, 12)
    with torch.no_grad():
        ref = model(images)
    longest = ref.scores.argmax(-1)
    labels = (longest + 1) % 4  # never the longest capsule
    by_label = model.decoder(ref.poses, labels)
    loss = Recording()
    for with_labels, want in ((True, by_label), (False, model.decoder(ref.poses, longest))):
        evaluate(model, loss, {}, [Batch(images, labels)], nullcontext, torch.device("cpu"),
                 recon_with_labels=with_labels)
        torch.testing.assert_close(loss.out.reconstructions[:, 0], want.detach())
    assert (by_label - model.decoder(ref.poses, longest)).abs().max() > 1e-2  # the two choices differ


# --- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [[], ["experiment=paper_mnist"], ["model=capsnet_small"],
                                       ["model=baseline_cnn", "dataset=fashion_mnist"],
                                       ["experiment=paper_smallnorb"], ["experiment=table1", "variant=baseline_cnn"]])
def test_protocol_paper_composes_to_exactly_the_config_without_a_protocol(overrides):
    as_dict = lambda cfg: OmegaConf.to_container(cfg, resolve=False)  # noqa: E731
    before = as_dict(compose_cfg([*overrides, "~protocol"]))
    assert as_dict(compose_cfg([*overrides, "protocol=paper"])) == before
    assert as_dict(compose_cfg(overrides)) == before  # paper is the default


def test_protocol_official_composes_and_instantiates_with_every_switch_on():
    from capsnet.train.build import build_loss, build_model, build_optimizer, count_parameters
    from capsnet.train.optim import FlooredExponentialLR

    cfg = compose_cfg(["experiment=paper_mnist", "protocol=official"])
    paper = compose_cfg(["experiment=paper_mnist"])
    model = build_model(cfg, (1, 28, 28), 10)
    assert count_parameters(model) == 8_215_568 + 160  # the paper's network + the bias on s (160)
    assert count_parameters(build_model(paper, (1, 28, 28), 10)) == 8_215_568
    assert torch.equal(model.features[0].bias, torch.full((256,), 0.1))
    assert_truncated_normal(model.features[0].weight, 0.05)
    assert model.primary.divide_by_types and torch.equal(model.primary.conv.bias, torch.full((256,), 0.1))
    assert_truncated_normal(model.class_caps.weight, 0.1)
    assert torch.equal(model.class_caps.bias, torch.full((10, 16), 0.1))
    assert torch.equal(model.decoder.net[-2].bias, torch.full((784,), 0.1))
    loss = build_loss(cfg)
    assert loss.margin_scale == 0.05 and loss.recon_weight == 0.0005
    _, sched = build_optimizer(cfg, model)
    assert isinstance(sched, FlooredExponentialLR) and sched.min_lr == 1e-6
    assert cfg.trainer.eval_recon_with_labels and cfg.trainer.steps == 300_000
    assert math.ceil(300_000 / math.ceil(60_000 / cfg.trainer.batch_size)) == 640  # 469 steps an epoch
    assert cfg.routing == paper.routing and cfg.dataset == paper.dataset  # the rest is the paper's run
    assert cfg.optim.lr == paper.optim.lr and cfg.optim.decay_steps == paper.optim.decay_steps


def test_a_run_with_protocol_official_counts_steps_and_evaluates_with_labels(tmp_path, monkeypatch):
    import capsnet.train.run as run_module

    seen = []
    real = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    data = make_mnist(tmp_path / "data", n_train=64, n_test=16)
    threads = torch.get_num_threads()
    try:
        results = run_module.Run(compose_cfg([f"dataset.root={data}", f"out_dir={tmp_path / 'run'}", *FAST,
                                              "protocol=official", "trainer.steps=5", "optim.decay_steps=1",
                                              "optim.decay_rate=0.01"])).fit()
    finally:
        torch.set_num_threads(threads)
    assert results["epochs"] == 3 and results["steps"] == 6  # 2 steps an epoch: ceil(5 / 2) epochs
    assert seen and all(kw["recon_with_labels"] for kw in seen)
    assert OmegaConf.select(compose_cfg(TINY_CAPSNET), "trainer.steps") is None
    last = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"lr": 1e-06' in last  # 1e-3 x 0.01^6 is far below the floor
