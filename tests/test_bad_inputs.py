"""Bad input is refused before training starts, with exit status 2 and one line naming problem and fix."""

import json
import os
import struct

import pytest
import torch

from capsnet.train.checkpoint import save_checkpoint
from helpers import TINY_CAPSNET, make_mnist, run_train, train_in_process

FAST = ["trainer.progress=false", "dataset.download=false", "trainer.epochs=1", *TINY_CAPSNET]


@pytest.fixture
def train(capsys):
    """`python train.py ARGS` in this process (most tests here); run_train starts a real one."""
    return lambda args, **kw: train_in_process(args, capsys)


def refused(proc, *fragments):
    """Exit status 2, a single stderr line starting 'capsnet: error:', holding every fragment; no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("capsnet: error: "), proc.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, fragments", [
    ("routing.iter=3", ["unknown config key 'routing.iter'", "--cfg job"]),
    ("routing.iters=abc", ["'routing.iters'", "abc", "Integer"]),
    ("trainer.batch_size=1.5", ["'trainer.batch_size'", "1.5"]),
    ("routing.iters=0", ["routing.iters=0", "from 1 to 100"]),
    ("routing.iters=1000000", ["routing.iters=1000000", "from 1 to 100"]),
    ("seed=99999999999999999999", ["seed=", "[0, 10^12)"]),
    ("dataset.shift=-1", ["dataset.shift=-1", ">= 0"]),
    ("+trainer.epoch=3", ["unknown config key 'trainer.epoch'", "--cfg job"]),
    ("+epochs=3", ["unknown config key 'epochs'"]),
    ("routing.squash=foo", ["cannot build model.class_caps.routing", "unknown squash 'foo'", "paper"]),
    ("model.decoder.hidden=[-4]", ["cannot build model", "negative dimension"]),
    ("+model.foo=1", ["cannot build model", "unexpected keyword argument 'foo'"]),
    ("dataset.root=${oc.env:CAPSNET_TEST_UNSET_VARIABLE}", ["cannot resolve dataset.root", "CAPSNET_TEST_UNSET_VARIABLE"]),
    ("trainer.batch_size=-8", ["trainer.batch_size=-8", ">= 1"]),
    ("trainer.amp=fp8", ["'trainer.amp'", "off, bf16, fp16"]),
    ("trainer.device=tpu", ["'trainer.device'", "auto, cpu, cuda"]),
    ("optim.lr=0", ["optim.lr", "> 0"]),
    ("optim.lr=-1e-3", ["optim.lr", "> 0"]),
    ("model=capsnett", ["model/capsnett", "capsnet_small"]),
])
def test_bad_config_values_are_refused_in_one_line(override, fragments, tmp_path, train, tiny_data):
    refused(train([f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST, override]), *fragments)


def test_a_bad_value_inside_a_sweep_is_refused_before_any_run(tmp_path):
    refused(run_train(["-m", "routing.iters=1,2,0", f"hydra.sweep.dir={tmp_path}"]), "routing.iters=0")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(tmp_path, train):
    refused(train(["trainer.device=cuda", f"out_dir={tmp_path}"]), "no CUDA GPU", "trainer.device=cpu")


def test_subset_larger_than_the_dataset_is_refused(tiny_data, tmp_path, train):
    refused(train([f"dataset.root={tiny_data}", "dataset.train_subset=100000", f"out_dir={tmp_path}", *FAST]),
            "dataset.train_subset=100000", "256 train images")


# --- data -------------------------------------------------------------------------------------

def test_missing_dataset_offline_names_folder_files_and_fix(tmp_path, train):
    line = refused(train([f"dataset.root={tmp_path / 'nothing'}", f"out_dir={tmp_path / 'run'}", *FAST]),
                   str(tmp_path / "nothing" / "MNIST" / "raw"), "train-images-idx3-ubyte", "dataset.root")
    assert "CAPSNET_DATA" in line


def test_empty_dataset_folder_with_failing_download_is_one_line(tmp_path, monkeypatch, train):
    (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True)
    args = [f"dataset.root={tmp_path / 'data'}", f"out_dir={tmp_path / 'run'}", *FAST, "dataset.download=true"]
    # no network here, or none allowed: point torchvision's mirrors at a closed local port
    import urllib.request

    monkeypatch.setattr(urllib.request, "_opener", None)  # the opener urlopen builds now, with this proxy, goes too
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    refused(train(args), "the download failed", "copy the files there")


def _corrupt(root, name, data: bytes):
    (root / "MNIST" / "raw" / name).write_bytes(data)


def test_truncated_idx_file_is_refused(tiny_data, tmp_path, train):
    path = tiny_data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    refused(train([f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST]),
            "MNIST", "download again")


def test_idx_file_with_a_wrong_magic_number_is_refused(tiny_data, tmp_path, train):
    _corrupt(tiny_data, "t10k-labels-idx1-ubyte", struct.pack(">II", 0x0BAD, 64) + bytes(64))
    refused(train([f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST]), "malformed", "download again")


def test_images_and_labels_of_different_counts_are_refused(tmp_path, train):
    root = make_mnist(tmp_path / "a", n_train=256)
    other = make_mnist(tmp_path / "b", n_train=200)
    os.replace(other / "MNIST" / "raw" / "train-labels-idx1-ubyte", root / "MNIST" / "raw" / "train-labels-idx1-ubyte")
    refused(train([f"dataset.root={root}", f"out_dir={tmp_path / 'run'}", *FAST]),
            "256 images but 200 labels")


def test_label_outside_the_classes_is_refused(tiny_data, tmp_path, train):
    raw = tiny_data / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(raw.read_bytes())
    data[8 + 17] = 12
    raw.write_bytes(bytes(data))
    refused(train([f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST]), "label 12", "0..9")


# --- checkpoints ------------------------------------------------------------------------------

def resume_from(train, tiny_data, tmp_path, ckpt, *extra):
    return train([f"dataset.root={tiny_data}", f"out_dir={tmp_path / 'run'}", *FAST,
                      f"trainer.resume={ckpt}", *extra])


def test_a_file_that_is_not_a_checkpoint_is_refused(tiny_data, tmp_path, train):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2048))
    refused(resume_from(train, tiny_data, tmp_path, junk), str(junk), "not a readable PyTorch checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    refused(resume_from(train, tiny_data, tmp_path, other), "not a capsnet checkpoint")


def _capsnet_state(overrides, num_classes=10):
    from hydra.utils import instantiate

    from helpers import compose_cfg

    model = instantiate(compose_cfg(overrides).model, in_shape=(1, 28, 28), num_classes=num_classes)
    return {"model": model.state_dict()}


def test_a_checkpoint_of_another_model_names_the_first_mismatch(tiny_data, tmp_path, train):
    ckpt = tmp_path / "wide.pt"
    save_checkpoint(_capsnet_state([*TINY_CAPSNET, "model.features.channels=[12]"]), ckpt)
    refused(resume_from(train, tiny_data, tmp_path, ckpt), "another model", "'features.0.weight'", "(12, 1, 9, 9)")


def test_a_checkpoint_with_another_number_of_classes_is_refused(tiny_data, tmp_path, train):
    ckpt = tmp_path / "five.pt"
    save_checkpoint(_capsnet_state(TINY_CAPSNET, num_classes=5), ckpt)
    refused(resume_from(train, tiny_data, tmp_path, ckpt), "another model", "class_caps.weight")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tiny_data, tmp_path, train):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(str(marker))}, ckpt)
    refused(resume_from(train, tiny_data, tmp_path, ckpt), "refused unread", str(ckpt))
    assert not marker.exists()


# --- output -----------------------------------------------------------------------------------

def test_an_unwritable_out_dir_is_refused(tiny_data, tmp_path, train):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    refused(train([f"hydra.run.dir={tmp_path / 'hydra'}", f"dataset.root={tiny_data}",
                       f"out_dir={blocker / 'run'}", *FAST]), "cannot write the run directory", "out_dir=")


def test_an_unwritable_hydra_run_directory_is_refused_before_hydra_starts(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    refused(run_train([f"hydra.run.dir={blocker / 'run'}", f"dataset.root={tiny_data}", *FAST]),
            "cannot create the run directory", "hydra.run.dir=")
    refused(run_train(["-m", f"hydra.sweep.dir={blocker / 'sweep'}", "seed=0,1"]), "hydra.sweep.dir=")


# --- checkpoint files themselves --------------------------------------------------------------

def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    from capsnet.errors import CheckpointError
    from capsnet.train.checkpoint import load_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    message = str(err.value)
    assert "\n" not in message and message.startswith("no space left on /") and "intact" in message
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_only_the_saves_own_temporaries_are_removed(tmp_path):
    from capsnet.train.checkpoint import remove_stale_temporaries

    for name in (".last.pt.abc123.tmp", ".best.pt.x.tmp", "notes.tmp", ".mine.tmp"):
        (tmp_path / name).write_text("x")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.tmp", "notes.tmp"]


@pytest.mark.parametrize("state, fragment", [
    ({"model": {"features.0.weight": [1, 2, 3]}}, "not a tensor"),
    ({"model": "weights"}, "not a state dict"),
])
def test_checkpoint_entries_that_are_not_tensors_are_refused(state, fragment, tmp_path):
    from capsnet.errors import CheckpointError
    from capsnet.train.checkpoint import load_model_state

    model = torch.nn.Module()
    model.features = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(CheckpointError, match=fragment):
        load_model_state(model, state["model"], "ckpt.pt")


def test_another_pickle_protocol_is_named_as_such(tmp_path):
    from capsnet.errors import CheckpointError
    from capsnet.train.checkpoint import load_checkpoint

    path = tmp_path / "p4.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, path, pickle_protocol=4)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="pickle protocol") as err:
        load_checkpoint(path)
    assert "unsafe" not in str(err.value)


# --- a run directory belongs to one run ---------------------------------------------------------

def test_a_resume_never_crosses_runs(tiny_data, tmp_path, train):
    """A sweep with a fixed out_dir: job 1 must not 'resume' job 0's finished checkpoint and report its numbers."""
    base = [f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST, "dataset.train_subset=32"]
    assert train([*base, "routing.iters=3"]).returncode == 0
    line = refused(train([*base, "routing.iters=2"]), "belongs to another run", "routing.iters=3 there",
                   "routing.iters=2 here", "trainer.resume=null")
    assert str(tmp_path / "checkpoints" / "last.pt") in line
    assert train([*base, "routing.iters=3", "trainer.epochs=2"]).returncode == 0  # the same run may go on


def test_a_second_process_on_the_same_run_directory_is_refused(tiny_data, tmp_path, train):
    from capsnet.train.resume import RunLock

    lock = RunLock(tmp_path)  # as a live run holds it
    try:
        refused(train([f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST]), "is in use by process",
                f"{os.getpid()}", "another out_dir")
    finally:
        lock.release()
    assert train([f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST, "dataset.train_subset=32"]).returncode == 0


def test_rerunning_a_finished_run_leaves_its_results(tiny_data, tmp_path, capsys):
    args = [f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST, "dataset.train_subset=32"]
    assert train_in_process(args, capsys).returncode == 0
    before = (tmp_path / "results.json").read_text()
    from capsnet.train.run import Run
    from helpers import compose_cfg

    again = Run(compose_cfg(args)).fit()
    assert "already complete (1 epochs)" in capsys.readouterr().out
    assert (tmp_path / "results.json").read_text() == before and again["final"] == json.loads(before)["final"]


def test_an_idx_header_that_describes_other_images_is_refused(tiny_data, tmp_path, train):
    path = tiny_data / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack(">II", 14, 56)  # same number of bytes, other dimensions: garbage if believed
    path.write_bytes(bytes(data))
    refused(train([f"dataset.root={tiny_data}", f"out_dir={tmp_path}", *FAST]), "(1, 14, 56)", "(1, 28, 28)",
            "download them again")


@pytest.mark.parametrize("args, fragments", [
    (["out_dir=/proc/capsnet_run"], ["cannot create the run directory /proc/capsnet_run", "out_dir="]),
    (["out_dir=/tmp/my", "run"], ["'run' is not key=value", "quoted as one argument"]),
])
def test_impossible_or_unquoted_output_paths_are_refused_in_one_line(args, fragments, train):
    refused(train(args), *fragments)
