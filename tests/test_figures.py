"""Figure 4's grid, the confusion/worst-image numbers and the routing diagnostics against hand computations."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from helpers import TINY_CAPSNET, compose_cfg, event_tags

from capsnet.routing.diagnostics import (RoutingRecorder, coupling_entropy, max_coupling, summarize_iterations)
from capsnet.routing.dynamic import DynamicRouting
from capsnet.routing.self_attention import SelfAttentionRouting
from capsnet.tools import figures
from capsnet.types import ModelOutput


@pytest.fixture(scope="module")
def tiny_capsnet():
    from capsnet.train.build import build_model

    torch.manual_seed(0)
    return build_model(compose_cfg(TINY_CAPSNET), (1, 28, 28), 10).eval()


# --- Figure 4 --------------------------------------------------------------------------------------
def test_deltas_are_the_papers_eleven():
    d = figures.perturbation_deltas(0.25, 0.05)
    assert len(d) == 11 and d[5] == 0 and d[0] == pytest.approx(-0.25) and d[-1] == pytest.approx(0.25)
    assert torch.allclose(d.diff(), torch.full((10,), 0.05))


def test_perturbation_grid_against_one_image_at_a_time(tiny_capsnet):
    model = tiny_capsnet
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        out = model(images)
    deltas = figures.perturbation_deltas()
    poses, klass = out.poses[1], int(out.scores[1].argmax())
    grid = figures.perturbation_grid(model.decoder, poses, klass, deltas)
    dim = poses.shape[-1]
    assert grid.shape == (dim, 11, 1, 28, 28)
    for d in range(dim):  # the centre column is the unperturbed, test-time reconstruction
        torch.testing.assert_close(grid[d, 5], out.reconstructions[1, 0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for d in range(dim):
            for j, delta in enumerate(deltas.tolist()):
                moved = poses.clone()
                moved[klass, d] += delta  # this dimension only, no re-squash; others masked by the decoder
                torch.testing.assert_close(grid[d, j], model.decoder(moved[None], torch.tensor([klass]))[0],
                                           rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grid[0, 0], grid[0, 10])  # the perturbation changes the picture


# --- confusion, worst images -------------------------------------------------------------------------
def test_confusion_and_worst_against_loops():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(40, 5, generator=g), torch.randint(0, 5, (40,), generator=g)
    counts = figures.confusion_counts(scores, labels)
    hand = torch.zeros(5, 5, dtype=torch.long)
    for s, y in zip(scores, labels):
        hand[int(y), int(s.argmax())] += 1
    assert torch.equal(counts, hand)
    margin = figures.wrong_margin(scores, labels)
    for i in range(40):
        others = [float(scores[i, k]) for k in range(5) if k != int(labels[i])]
        assert float(margin[i]) == pytest.approx(max(others) - float(scores[i, labels[i]]))
    worst = figures.worst_indices(scores, labels, 6)
    wrong = (scores.argmax(-1) != labels).sum().item()
    assert all(scores[i].argmax() != labels[i] for i in worst[:min(6, wrong)])
    assert margin[worst].tolist() == sorted(margin[worst].tolist(), reverse=True)


def test_worst_with_two_labels():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.1, 0.8]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # image 1: the third class outranks a true one
    assert figures.worst_indices(scores, labels, 1).tolist() == [1]
    assert figures.wrong_margin(scores, labels).tolist() == pytest.approx([-0.7, 0.7])


def test_overlay_is_green_then_red():
    a, b = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)
    a[0, 0, 0], b[0, 1, 1] = 1.0, 1.0
    rgb = figures.overlay_two(a, b)
    assert rgb[0, 0, 0].tolist() == [0, 1, 0] and rgb[0, 1, 1].tolist() == [1, 0, 0]


def test_plots_write_pngs(tmp_path):
    grid = torch.rand(4, 11, 1, 8, 8)
    figures.plot_perturbation([grid, grid], ["a", "b"], figures.perturbation_deltas(), tmp_path / "p.png")
    figures.plot_multimnist(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8),
                            [["1", "2"], ["3", "4"]], [["1", "2"], ["3", "5"]], tmp_path / "m.png")
    figures.plot_routing({"run": {"entropy": [2.3, 1.0], "max_coupling": [0.1, 0.5], "agreement": None,
                                  "uniform_entropy": math.log(10)}}, tmp_path / "r.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("p.png", "m.png", "r.png"))


# --- routing diagnostics -----------------------------------------------------------------------------
class _Routed(nn.Module):
    """A model around one routing module: the models' `routing` convention and extras."""

    def __init__(self, routing):
        super().__init__()
        self.routing = routing

    def forward(self, votes, bias=None):
        r = self.routing(votes, bias=bias)
        return ModelOutput(scores=r.activations, poses=r.poses, extras=dict(self.routing.recorded))


def _squash64(s):
    n2 = (s * s).sum(-1, keepdim=True)
    return n2 / (1 + n2) * s / torch.sqrt(n2)


def _procedure1_reference(votes: torch.Tensor, iters: int, bias=None):
    """Procedure 1 with explicit loops in float64 -> per iteration (entropy, max coupling, agreement) means."""
    u = votes.double()
    bsz, n_in, n_out, _ = u.shape
    b = torch.zeros(bsz, n_in, n_out, dtype=torch.float64)
    rows = []
    for _ in range(iters):
        c = torch.zeros_like(b)
        for n in range(bsz):
            for i in range(n_in):
                e = [math.exp(float(b[n, i, j])) for j in range(n_out)]
                for j in range(n_out):
                    c[n, i, j] = e[j] / sum(e)
        s = torch.zeros(bsz, n_out, u.shape[-1], dtype=torch.float64)
        for n in range(bsz):
            for j in range(n_out):
                for i in range(n_in):
                    s[n, j] += c[n, i, j] * u[n, i, j]
        if bias is not None:
            s = s + bias.double()
        v = _squash64(s)
        a = torch.zeros_like(b)
        for n in range(bsz):
            for i in range(n_in):
                for j in range(n_out):
                    a[n, i, j] = float((u[n, i, j] * v[n, j]).sum())
        ent = sum(-sum(float(c[n, i, j]) * math.log(float(c[n, i, j])) for j in range(n_out))
                  for n in range(bsz) for i in range(n_in)) / (bsz * n_in)
        mx = sum(max(float(c[n, i, j]) for j in range(n_out)) for n in range(bsz) for i in range(n_in)) / (bsz * n_in)
        rows.append((ent, mx, float(a.mean())))
        b = b + a
    return rows


def test_uniform_couplings_have_entropy_log_j():
    c = torch.full((2, 6, 5), 0.2)
    assert torch.allclose(coupling_entropy(c), torch.full((2, 6), math.log(5), dtype=torch.float64))
    assert torch.allclose(max_coupling(c), torch.full((2, 6), 0.2, dtype=torch.float64))
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 6)), 5).float()
    assert coupling_entropy(one_hot).abs().max() == 0 and max_coupling(one_hot).min() == 1
    model = _Routed(DynamicRouting(iters=1))
    with RoutingRecorder(model) as rec:
        sums = rec.sums(model(torch.randn(3, 7, 4, 5)))
    got = summarize_iterations(sums)
    assert got["iterations"] == 1 and got["entropy"][0] == pytest.approx(math.log(4))
    assert got["max_coupling"][0] == pytest.approx(0.25)
    assert model.routing.record is False  # the recorder leaves the routing as it found it


@pytest.mark.parametrize("with_bias", [False, True])
def test_dynamic_routing_diagnostics_against_procedure_1(with_bias):
    torch.manual_seed(1)
    votes = torch.randn(4, 6, 3, 5) * 0.7
    bias = torch.randn(3, 5) * 0.3 if with_bias else None
    model = _Routed(DynamicRouting(iters=3))
    totals: dict = {}
    with RoutingRecorder(model) as rec:
        for part in (votes[:1], votes[1:]):  # two batches: sums, then one mean over every image
            for k, v in rec.sums(model(part, bias=bias)).items():
                totals[k] = totals.get(k, 0) + v
    got = summarize_iterations(totals)
    ref = _procedure1_reference(votes, 3, bias)
    assert got["iterations"] == 3
    for r, (ent, mx, agree) in enumerate(ref):
        assert got["entropy"][r] == pytest.approx(ent, rel=1e-5)
        assert got["max_coupling"][r] == pytest.approx(mx, rel=1e-5)
        assert got["agreement"][r] == pytest.approx(agree, rel=1e-4, abs=1e-6)
    assert ref[0][0] == pytest.approx(math.log(3))  # the reference itself starts uniform
    assert got["entropy"][2] < got["entropy"][0]  # routing sharpens the couplings


def test_self_attention_agreement_is_eq_4():
    torch.manual_seed(2)
    votes = torch.randn(2, 5, 3, 4)
    model = _Routed(SelfAttentionRouting(in_capsules=5, out_capsules=3))
    with RoutingRecorder(model) as rec:
        got = summarize_iterations(rec.sums(model(votes)))
    gram = torch.einsum("bijd,bkjd->bijk", votes.double(), votes.double()).sum(-1) / 2.0  # sqrt(D) = 2
    assert got["iterations"] == 1 and got["agreement"][0] == pytest.approx(gram.mean().item(), rel=1e-5)


def test_no_recording_routing_gives_nothing(tiny_capsnet):
    class Plain(nn.Module):
        def forward(self, x):
            return ModelOutput(scores=x.mean((2, 3)))

    with RoutingRecorder(Plain()) as rec:
        assert rec.sums(ModelOutput(scores=torch.zeros(1, 3))) == {}


def test_tensorboard_logs_diagnostics_as_scalars(tiny_capsnet, tmp_path):
    from capsnet.train.tb import TensorBoard

    tb = TensorBoard(str(tmp_path))
    tb.inspect(tiny_capsnet, torch.rand(4, 1, 28, 28), 7, contextlib.nullcontext())
    tb.close()
    scalars = event_tags(tmp_path)["scalars"]
    for name in ("entropy", "max_coupling", "agreement"):
        assert {f"routing/{name}_iter{r}" for r in (1, 2, 3)} <= set(scalars), scalars
    assert tiny_capsnet.routing.record is False
