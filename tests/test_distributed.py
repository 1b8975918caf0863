"""Data-parallel training: deformcp.torch modules under DistributedDataParallel match a single process.

A small float64 model (ModulatedDeformConv2dPack → ReLU → SpatialTransformer → RoIAlign on 3 boxes per image →
Linear) trains for a few SGD steps in 2 processes on the CPU (the gloo backend), each rank on its half of every
batch, and in this process on the whole batches. The loss is a mean over equally many elements on each rank, so
DDP's gradient (the average of the ranks' gradients) is the whole batch's gradient: every rank's gradients at
every step, and its parameters after the last step, must equal the single process's.

Tolerance: the two runs add the same terms in different orders (a rank's batch sums, then DDP's all-reduce,
against one sum over the whole batch), so in float64 they differ by rounding alone: at most ~2e-15 of the
tensor's largest entry in the runs seen. rtol 1e-10 (with atol 1e-10 times the tensor's largest entry, for
entries near zero) leaves five orders of magnitude for that, and is far below any real mistake: a rank's
gradient not reduced, not averaged, or computed on the wrong data is off by O(1), and even one rank's bias
gradient scaled by 1 + 1e-8 once fails.

Each worker also records (by wrapping deformcp.ops._call's front doors) which deformcp ops ran forward and
backward and under which backend, so the test fails when the model's ops did not run, or ran on another backend.

The workers are spawned, not forked (torch.multiprocessing, start method "spawn"): fresh interpreters that
inherit no thread pools, OpenMP threads or locks. deformcp's backend is a per-thread / per-context setting, so
each worker selects it itself (``with deformcp.backend(...)`` around its training loop). They rendezvous through
a file store under tmp_path (no port to pick), and a hang fails the test: collectives time out after
COLLECTIVE_TIMEOUT seconds, and the workers are killed when they have not all finished after TIMEOUT.
"""
import datetime
import gc
import pathlib
import pickle
import time
import traceback
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import deformcp  # noqa: E402
import deformcp.torch as dtorch  # noqa: E402
from deformcp import _host, _workspace  # noqa: E402
from deformcp.ops import _call  # noqa: E402

WORLD = 2
IMAGES_PER_RANK = 2
BOXES_PER_IMAGE = 3
STEPS = 3
LR, MOMENTUM = 0.05, 0.9
#: Seconds a collective may wait for the other rank before it raises.
COLLECTIVE_TIMEOUT = 60
#: Seconds the workers may take in all (start-up, imports, training) before they count as hung and are killed.
TIMEOUT = 180
#: The deformcp ops the model runs: each must run forward and backward in the workers.
OPS = {"deform_conv2d", "affine_grid", "grid_sample", "roi_align"}


class Net(nn.Module):
    """[N, 2, 8, 8] images and [K, 5] boxes (in the 6 × 6 transformed image) → [K, 3]."""

    def __init__(self):
        super().__init__()
        self.dcn = dtorch.ModulatedDeformConv2dPack(2, 4, 3, padding=1)
        # a smooth localisation net: no ReLU that could leave it without gradients for some random parameters
        localization = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.Tanh())
        self.stn = dtorch.SpatialTransformer(4, output_size=(6, 6), localization=localization, localization_features=8)
        self.roi = dtorch.RoIAlign(2, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x, boxes):
        y = self.stn(torch.relu(self.dcn(x)))
        return self.head(self.roi(y, boxes).flatten(1))


def make_model(seed: int) -> Net:
    """A float64 Net whose zero-initialised offset, mask and θ branches are perturbed, so that the convolution
    samples off the pixel grid and the transform is not the identity (and their gradients reach every
    parameter)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Net().double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def loss_fn(out, target):
    """A mean, so that the mean over the ranks of their losses (and gradients) is the whole batch's."""
    return ((out - target) ** 2).mean()


def shard(batch, rank):
    """Rank's images, their boxes (batch indices renumbered from 0) and targets."""
    x, boxes, target = batch
    images = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
    rows = slice(images.start * BOXES_PER_IMAGE, images.stop * BOXES_PER_IMAGE)
    boxes = boxes[rows].clone()
    boxes[:, 0] -= images.start
    return x[images], boxes, target[rows]


def train(model, batches, step_batch=lambda batch: batch):
    """STEPS SGD steps of model (a Net, or a DDP wrapping one); returns the losses and the gradients (by the Net's
    parameter names) of every step."""
    parameters = dict(getattr(model, "module", model).named_parameters())
    optimizer = torch.optim.SGD(parameters.values(), lr=LR, momentum=MOMENTUM)
    losses, grads = [], []
    for batch in batches:
        x, boxes, target = step_batch(batch)
        optimizer.zero_grad()
        loss = loss_fn(model(x, boxes), target)
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append({name: p.grad.detach().clone() for name, p in parameters.items()})
        optimizer.step()
    return losses, grads


def _train_rank(rank, backend, state, batches):
    """Rank's training under DDP: its losses, gradients and final parameters, and a weak reference to the DDP
    module (which the caller sees die before it destroys the process group)."""
    model = Net().double()
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model)
    with deformcp.backend(backend):  # a per-thread / per-context setting: each worker selects it itself
        losses, grads = train(ddp, batches, lambda batch: shard(batch, rank))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return losses, grads, params, weakref.ref(ddp)


def _worker(rank, backend, state, batches, store, results):
    """One DDP rank: trains a copy of the model on its shards under deformcp backend ``backend``, and saves its
    losses, gradients, final parameters and the deformcp ops it ran (name, forward or backward, backend)."""
    torch.set_num_threads(1)  # two ranks on the machine's CPUs, not each on all of them
    ran = []
    forward, backward = _call.run_forward, _call.run_backward

    def spy_forward(spec, *args, **kwargs):
        ran.append((spec.name, "forward", deformcp.current_backend()))
        return forward(spec, *args, **kwargs)

    def spy_backward(spec, *args, **kwargs):
        ran.append((spec.name, "backward", deformcp.current_backend()))
        return backward(spec, *args, **kwargs)

    _call.run_forward, _call.run_backward = spy_forward, spy_backward
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    # The DDP module must be gone before destroy_process_group (torch, not deformcp: when DDP's C++ reducer holds
    # the last reference to a gloo process group, it destroys the group holding the GIL, while the group's worker
    # thread may wait for the GIL to release a finished all-reduce: a deadlock, seen here about one run in ten).
    # So it lives in _train_rank's frame only, and on an error only the traceback's text is kept.
    error = None
    try:
        try:
            losses, grads, params, ddp = _train_rank(rank, backend, state, batches)
        except Exception:
            error = traceback.format_exc()
        gc.collect()
        if error is None and ddp() is not None:
            error = "the DDP module is still alive before destroy_process_group"
    finally:
        dist.destroy_process_group()
    if error is not None:
        raise RuntimeError(f"rank {rank}:\n{error}")
    torch.save({"losses": losses, "grads": grads, "params": params, "ran": sorted(set(ran)),
                "threads": (_host.threads(), _workspace.num_threads())}, results / f"rank{rank}.pt")


def run_workers(backend, state, batches, tmp_path):
    """Spawn the WORLD ranks and wait for them; fail when one raises or they have not finished after TIMEOUT."""
    context = mp.start_processes(_worker, args=(backend, state, batches, tmp_path / "store", tmp_path),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=1):  # raises ProcessRaisedException / ProcessExitedException on failure
            if time.monotonic() > deadline:
                # a rank that raised, then hung on its way out, left its traceback (pickled) in its error file
                errors = [pickle.loads(path.read_bytes()) for path in map(pathlib.Path, context.error_files)
                          if path.exists() and path.stat().st_size]
                pytest.fail(f"DDP workers still running after {TIMEOUT} s (hung)\n" + "\n".join(errors))
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def assert_equal_up_to_rounding(actual, expected, what):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=["numpy", "host"])
def cpu_backend(request):
    if request.param == "host" and _host.compiler() is None:
        pytest.skip("host backend: no C++ compiler found (deformcp._host.compiler() is None)")
    return request.param


def test_ddp_matches_single_process(cpu_backend, rng, tmp_path):
    images, boxes_total = WORLD * IMAGES_PER_RANK, WORLD * IMAGES_PER_RANK * BOXES_PER_IMAGE
    batches = []
    for _ in range(STEPS):
        x = torch.from_numpy(rng.standard_normal((images, 2, 8, 8)))
        corners = np.sort(rng.uniform(-0.5, 5.5, (boxes_total, 2, 2)), axis=1)  # (x1, y1) ≤ (x2, y2)
        index = np.repeat(np.arange(images), BOXES_PER_IMAGE)[:, None]
        boxes = torch.from_numpy(np.concatenate([index, corners.reshape(-1, 4)], axis=1))
        batches.append((x, boxes, torch.from_numpy(rng.standard_normal((boxes_total, 3)))))
    model = make_model(int(rng.integers(2**31)))
    state = {name: t.clone() for name, t in model.state_dict().items()}

    # the single process on the whole batches (on the host backend this also builds the modules the workers load)
    with deformcp.backend(cpu_backend):
        losses, grads = train(model, batches)
    for name, g in grads[0].items():
        assert g.abs().max() > 0, f"{name}: no gradient reaches it, so the comparison would not cover it"

    ranks = run_workers(cpu_backend, state, batches, tmp_path)

    for rank, result in enumerate(ranks):
        ran = result["ran"]
        assert {(op, way) for op, way, _ in ran} == {(op, way) for op in OPS for way in ("forward", "backward")}
        assert {backend for _, _, backend in ran} == {cpu_backend}, f"rank {rank} ran {ran}"
        # spawned, not forked: the host backend's OpenMP threads are all there
        assert result["threads"][0] == result["threads"][1]
        for step in range(STEPS):
            for name, g in grads[step].items():
                assert_equal_up_to_rounding(result["grads"][step][name], g, f"rank {rank}, step {step}, {name}.grad")
        for name, p in model.named_parameters():
            assert_equal_up_to_rounding(result["params"][name], p.detach(), f"rank {rank}, {name} after {STEPS}")
    for step in range(STEPS):  # each rank's loss is its half's mean: their mean is the whole batch's
        mean = sum(result["losses"][step] for result in ranks) / WORLD
        assert_equal_up_to_rounding(mean, losses[step], f"mean loss, step {step}")
