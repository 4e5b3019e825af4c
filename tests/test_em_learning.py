"""Matrix capsules with EM routing learn (Hinton, Sabour, Frosst 2018): real MNIST, and the presets end to end.

The learning check is the test that would have caught the original report (a tiny EM network at chance on
real MNIST): the same small network must get clearly above chance on held-out digits within a CPU budget.
"""

import functools
import json

import pytest
import torch

import dataset_fixtures as fx
from capsnet.losses.spread import spread_loss
from capsnet.models.matrix_capsnet import MatrixCapsNet
from capsnet.routing.em import EMRouting

TINY_EM = ["model.A=4", "model.B=2", "model.C=2", "model.D=2"]


def _mnist(root, train: bool, n: int):
    from torchvision.datasets import MNIST

    data = MNIST(str(root), train=train, download=False)
    return data.data[:n].float().div(255).unsqueeze(1), data.targets[:n]


@pytest.mark.slow
@pytest.mark.parametrize("iters,final_lambda,steps", [(1, 0.0286, 300), (2, 0.005, 400)])
def test_small_em_network_learns_real_mnist(real_data, iters, final_lambda, steps):
    """A=16, B=C=D=4 with EM routing, 2,000 training digits, batch 32, fixed margin 0.2: >= 60% on 500 test
    digits (measured: 79% and 68%; about 30 s and 80 s on one thread). Three iterations stay at chance in this
    budget: see docs/routings.md, EM section, for why."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = _mnist(real_data, True, 2000)
        x_test, y_test = _mnist(real_data, False, 500)
        mean, std = x.mean(), x.std()
        x, x_test = (x - mean) / std, (x_test - mean) / std
        model = MatrixCapsNet((1, 28, 28), 10, A=16, B=4, C=4, D=4,
                              routing=functools.partial(EMRouting, iters=iters, final_lambda=final_lambda))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = spread_loss(model(x[idx]).scores, y[idx], 0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).scores.argmax(-1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    print(f"EM routing ({iters} iterations), real MNIST: test accuracy {accuracy:.3f} after {steps} steps")
    assert accuracy >= 0.6


def test_em_smallnorb_quick_trains_one_epoch(tmp_path):
    """experiment=em_smallnorb quick=on: one epoch on smallNORB files in the real format, results.json written."""
    from capsnet.train.build import compose_config
    from capsnet.train.run import Run

    fx.write_smallnorb(tmp_path, n=16, split="train")
    fx.write_smallnorb(tmp_path, n=6, split="test", gz=True)
    cfg = compose_config([f"out_dir={tmp_path / 'run'}", "experiment=em_smallnorb", "quick=on",
                          f"dataset.root={tmp_path}", "dataset.download=false", "dataset.train_subset=null",
                          "dataset.test_subset=null", "trainer.progress=false", "trainer.batch_size=8",
                          "trainer.eval_batch_size=16", *TINY_EM])
    assert cfg.routing._target_.endswith("EMRouting") and cfg.loss._target_.endswith("SpreadLoss")
    results = Run(cfg).fit()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["epochs"] == 1 and results["steps"] == 2 and saved["final"]["test/error"] == pytest.approx(
        100 - saved["final"]["test/accuracy"])
    assert 0 <= saved["final"]["test/accuracy"] <= 100 and saved["final"]["test/loss"] >= 0
