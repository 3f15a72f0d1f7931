"""Training-step benchmarks: one layer's forward and backward, ours against torch's layers.

``run_train_bench``: per suite layer, one training step (forward, then backward with the
gradients of the input, the weights and the biases) with ``numba_dsconv.torch.separable``
against torch's Conv2d(groups=C) + Conv2d(1x1) on channels_last tensors, on the same number of
threads, after warm-up. On the CPU each side runs in processes of its own, alternating round
after round (a worker, ``python -m numba_dsconv.bench.train SIDE DEVICE BATCH LAYERS REPEAT
CHAIN`` with LAYERS the layers as JSON, prints {layer number: median seconds}), each side's
time the best of its rounds' medians; on a GPU the two are interleaved in one process (ours,
torch, ours, ...), medians. The gradients of ours are checked against torch's (float32).

``chain_step_fns``: one training step of a chain of MobileNetV1's separable layers (relu6
after each stage), timed as the layers are. ``saved_bytes``: what autograd keeps for the
backward of that chain, counted with torch.autograd.graph.saved_tensors_hooks, ours and
torch's.

Import needs torch (the command line says so where it is missing).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numba

from .machine import Progress, no_progress, torch_module
from .suite import Layer
from .timing import alternating_processes, time_interleaved

# MobileNetV1's 13 depthwise separable layers at 224 x 224: (H_in, C_in, C_out, stride)
MOBILENET_V1 = (
    (112, 32, 64, 1), (112, 64, 128, 2), (56, 128, 128, 1), (56, 128, 256, 2),
    (28, 256, 256, 1), (28, 256, 512, 2), *((14, 512, 512, 1),) * 5, (14, 512, 1024, 2),
    (7, 1024, 1024, 1),
)  # fmt: skip


@dataclass
class TrainRow:
    layer: int
    name: str
    batch: int
    device: str
    ours_s: float
    torch_s: float
    ratio: float  # ours / torch: below 1, ours is faster
    grad_error: float  # max over the gradients of max |ours - torch| / max |torch|
    # per side: on the CPU each round's median seconds (ours_s / torch_s: the least), on a GPU
    # the one median of the interleaved samples
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class ChainStep:
    """One training step of the first ``layers`` MobileNetV1 separable layers in a chain
    (relu6 after each stage; ``_mobilenet_v1``), ours and torch's: seconds as TrainRow's."""

    layers: int
    ours_s: float
    torch_s: float
    ratio: float
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class TrainResult:
    device: str
    batch: int
    threads: int
    rows: list[TrainRow]
    chain: ChainStep | None = None

    @property
    def geomean(self) -> float:
        return math.exp(statistics.fmean(math.log(r.ratio) for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "batch": self.batch, "threads": self.threads,
                "geomean_ratio": self.geomean, "rows": [asdict(r) for r in self.rows],
                "chain": None if self.chain is None else asdict(self.chain)}  # fmt: skip


def _tensors(torch: Any, lay: Layer, batch: int, device: str, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last

    def r(*shape: int, scale: float = 1.0) -> Any:
        return (scale * torch.randn(*shape, generator=g)).to(device)

    oh = (lay.hw + 2 * lay.padding - lay.kernel) // lay.stride + 1
    return {
        "x": r(batch, lay.c_in, lay.hw, lay.hw).contiguous(memory_format=cl),
        "dw": r(lay.c_in, 1, lay.kernel, lay.kernel, scale=1 / 3),
        "pw": r(lay.c_out, lay.c_in, 1, 1, scale=1 / math.sqrt(lay.c_in)),
        "b1": r(lay.c_in),
        "b2": r(lay.c_out),
        "grad": r(batch, lay.c_out, oh, oh).contiguous(memory_format=cl),
    }


def train_step_fns(lay: Layer, batch: int, device: str = "cpu") -> tuple[dict, Any, Any]:
    """({"ours": (step, sync), "torch": (step, sync)}, the leaves' gradients of one step of
    each as a function, torch)."""
    torch = torch_module()
    import torch.nn.functional as F

    from .. import torch as ndt

    t = _tensors(torch, lay, batch, device, seed=lay.number)
    sides: dict[str, dict[str, Any]] = {}
    for name in ("ours", "torch"):
        sides[name] = {k: v.detach().clone(memory_format=torch.preserve_format).requires_grad_()
                       for k, v in t.items() if k != "grad"}  # fmt: skip
    s, p = lay.stride, lay.padding

    def forward(name: str) -> Any:
        v = sides[name]
        if name == "ours":
            return ndt.separable(v["x"], v["dw"], v["pw"], stride=s, padding=p,
                                 dw_bias=v["b1"], bias=v["b2"])  # fmt: skip
        mid = F.conv2d(v["x"], v["dw"], v["b1"], stride=s, padding=p, groups=lay.c_in)
        return F.conv2d(mid, v["pw"], v["b2"])

    def step(name: str) -> None:
        for leaf in sides[name].values():
            leaf.grad = None
        forward(name).backward(t["grad"])

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns = {name: ((lambda n=name: step(n)), sync) for name in sides}

    def grads(name: str) -> list[Any]:
        step(name)
        sync()
        return [sides[name][k].grad for k in ("x", "dw", "pw", "b1", "b2")]

    return fns, grads, torch


def chain_step_fns(batch: int, device: str = "cpu", layers: int = 13) -> dict[str, Any]:
    """{"ours": (step, sync), "torch": (step, sync)}: one training step (forward, backward of
    the sum of the output: the gradients of every weight and bias) of the first ``layers``
    MobileNetV1 separable layers (``_mobilenet_v1``, relu6 after each stage) on one
    channels_last input that needs no gradient, as an image batch; the same initial
    weights on both sides."""
    torch = torch_module()
    from .. import torch as ndt

    g = torch.Generator().manual_seed(0)
    hw, c_in = MOBILENET_V1[0][:2]
    x = torch.randn(batch, c_in, hw, hw, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    ours = _mobilenet_v1(torch, ndt, True, layers)
    theirs = _mobilenet_v1(torch, ndt, False, layers)
    ours.load_state_dict(
        {k: v.view_as(p) for (k, p), v in zip(ours.state_dict().items(),
                                              theirs.state_dict().values(), strict=True)}
    )  # fmt: skip
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns = {}
    for name, model in (("ours", ours), ("torch", theirs)):
        model = model.to(device).to(memory_format=torch.channels_last)

        def step(model: Any = model) -> None:
            for p in model.parameters():
                p.grad = None
            model(x).sum().backward()

        fns[name] = (step, sync)
    return fns


def run_train_bench(
    device: str, batch: int, layers: list[Layer], repeat: int | None = None,
    progress: Progress = no_progress, rounds: int = 5, chain: int = 0,
) -> TrainResult:  # fmt: skip
    """The training step of each layer, ours against torch's (see the module docstring),
    and with ``chain`` (a number of layers), one step of that chain of MobileNetV1's
    separable layers (``chain_step_fns``), timed as the layers are.

    On the CPU each side is timed in processes of its own, alternating for ``rounds`` rounds
    (``timing.alternating_processes``), and each side's time is the best of its rounds'
    medians, as the peers' are: in one process the two OpenMP pools (Numba's and torch's)
    disturbed each other, whichever ran second paying (the same layer measured 0.57x and
    1.19x in two runs on the development machine). On a GPU both sides share one process,
    interleaved."""
    torch = torch_module()
    if torch is None:
        raise NotImplementedError("the training benchmark needs torch: pip install torch")
    threads = numba.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)  # the same cores for both
    errors = {}
    for lay in layers:  # the gradients checked once, in this process
        _, grads, _ = train_step_fns(lay, batch, device)
        theirs = grads("torch")
        error = 0.0
        for a, b in zip(grads("ours"), theirs, strict=True):
            scale = float(b.abs().max()) or 1.0
            error = max(error, float((a - b).abs().max()) / scale)
        errors[lay.number] = error
    numbers = [lay.number for lay in layers]
    if device == "cpu":
        spelled = json.dumps([asdict(lay) for lay in layers])  # any Layer, not only the suite's
        args = [device, str(batch), spelled, str(repeat or 9), str(chain)]
        runs = alternating_processes(
            "numba_dsconv.bench.train", list(SIDES), args, threads, rounds,
            lambda done, total: progress(
                "measure", f"round {min(done // len(SIDES) + 1, rounds)} of {rounds}", done, total
            ),
        )  # fmt: skip
        keys = [*numbers, *(["chain"] if chain else [])]
        rounds_s = {side: {n: [out[str(n)] for out in outs] for n in keys}
                    for side, outs in runs.items()}  # fmt: skip
    else:
        rounds_s = {side: {} for side in SIDES}
        for i, lay in enumerate(layers):
            progress("measure", f"layer {lay.number}", i, len(layers))
            for side, med in _timed(lay, batch, device, repeat or 9, SIDES).items():
                rounds_s[side][lay.number] = [med]
        if chain:
            step = time_chain(batch, device, chain, repeat or 9)
            rounds_s["ours"]["chain"], rounds_s["torch"]["chain"] = [step.ours_s], [step.torch_s]
        progress("measure", "done", len(layers), len(layers))
    rows = []
    for lay in layers:
        best = {side: min(rounds_s[side][lay.number]) for side in SIDES}
        rows.append(TrainRow(lay.number, lay.name, batch, device, best["ours"], best["torch"],
                             best["ours"] / best["torch"], errors[lay.number],
                             {side: rounds_s[side][lay.number] for side in SIDES}))  # fmt: skip
    steps = None
    if chain:
        best = {side: min(rounds_s[side]["chain"]) for side in SIDES}
        steps = ChainStep(chain, best["ours"], best["torch"], best["ours"] / best["torch"],
                          {side: rounds_s[side]["chain"] for side in SIDES})  # fmt: skip
    return TrainResult(device, batch, threads, rows, steps)


SIDES = ("ours", "torch")


def time_chain(batch: int, device: str = "cpu", layers: int = 13, repeat: int = 9) -> ChainStep:
    """One training step of the first ``layers`` MobileNetV1 separable layers in a chain
    (``chain_step_fns``), both sides interleaved in this process after warm-up: how
    ``run_train_bench`` times it on a GPU (on the CPU it times each side in processes of its
    own: two thread pools in one process disturb each other)."""
    med = _timed_fns(chain_step_fns(batch, device, layers), repeat)
    return ChainStep(layers, med["ours"], med["torch"], med["ours"] / med["torch"],
                     {side: [med[side]] for side in SIDES})  # fmt: skip


def _timed(lay: Layer, batch: int, device: str, repeat: int, sides: tuple[str, ...]) -> dict:
    """{side: median seconds of one training step}, the sides interleaved after warm-up."""
    fns, _, _ = train_step_fns(lay, batch, device)
    return _timed_fns({side: fns[side] for side in sides}, repeat)


def _timed_fns(fns: dict[str, Any], repeat: int) -> dict[str, float]:
    """{side: median seconds of its step}: the steps interleaved after warm-up."""
    for fn, sync in fns.values():  # warm up
        fn()
        sync()
    samples, _ = time_interleaved(fns, repeat, min_sample_s=0.05)
    return {side: statistics.median(v) for side, v in samples.items()}


def worker(
    side: str, device: str, batch: int, layers: list[Layer], repeat: int, chain: int = 0
) -> dict:
    """{layer number: median seconds of one training step} of one side, in this process, and
    with ``chain``, "chain": that of the MobileNetV1 chain (``chain_step_fns``)."""
    torch = torch_module()
    torch.set_num_threads(numba.get_num_threads())
    out = {str(lay.number): _timed(lay, batch, device, repeat, (side,))[side] for lay in layers}
    if chain:
        fns = chain_step_fns(batch, device, chain)
        out["chain"] = _timed_fns({side: fns[side]}, repeat)[side]
    return out


def saved_bytes(batch: int = 8, device: str = "cpu", layers: int = 13) -> dict[str, dict]:
    """What autograd keeps for the backward of the first ``layers`` MobileNetV1 separable
    layers (relu6 after each stage), ours and torch's (Conv2d(groups=C), ReLU6, Conv2d(1x1),
    ReLU6) from one input: {"ours"/"torch": {"raw": bytes of every saved tensor as saved,
    "unique": bytes of the distinct storages among them}}."""
    torch = torch_module()
    from .. import torch as ndt

    x0 = torch.randn(batch, 32, 112, 112, device=device).contiguous(
        memory_format=torch.channels_last
    ).requires_grad_()  # fmt: skip
    out = {}
    for name in ("ours", "torch"):
        model = _mobilenet_v1(torch, ndt, name == "ours", layers).to(device)
        out[name] = _count_saved(torch, model, x0)
    return out


def _mobilenet_v1(torch: Any, ndt: Any, ours: bool, layers: int) -> Any:
    modules = []
    for _, c_in, c_out, stride in MOBILENET_V1[:layers]:
        if ours:
            modules.append(ndt.SeparableConv2d(
                c_in, c_out, 3, stride=stride, padding=1, mid_activation="relu6",
                activation="relu6",
            ))  # fmt: skip
        else:
            modules += [torch.nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                        torch.nn.ReLU6(), torch.nn.Conv2d(c_in, c_out, 1, bias=True),
                        torch.nn.ReLU6()]  # fmt: skip
    return torch.nn.Sequential(*modules)


def _count_saved(torch: Any, model: Any, x: Any) -> dict[str, int]:
    """Bytes autograd saves in model(x): every saved tensor, and the distinct storages."""
    seen: dict[int, int] = {}
    raw = 0

    def pack(t: Any) -> Any:
        nonlocal raw
        raw += t.numel() * t.element_size()
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    del y
    return {"raw": raw, "unique": sum(seen.values())}


if __name__ == "__main__":  # a worker of ``run_train_bench``
    import sys

    sd, dev, n, lays, rep = sys.argv[1:6]
    chain = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    print(json.dumps(worker(sd, dev, int(n), [Layer(**d) for d in json.loads(lays)], int(rep),
                            chain)))  # fmt: skip
