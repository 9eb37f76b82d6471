"""torch.compile and host syncs: the training forward/backward and one generation step each compile into ONE
graph (fullgraph=True fails on a graph break, and a graph break is where code reads a device value on the
host), compiled results equal eager ones, `sampling.compile` gives the same images, and neither generation
nor the training forward runs an op that makes the host wait for the device.

Backend aot_eager: dynamo's tracing (where graph breaks happen) plus AOT autograd's forward and backward
graphs, run with eager kernels. Inductor's C++ code generation took 186 s (training forward/backward) and
116 s (one generation step) per graph on the 2-core CI machine, against 9 s and 7 s here; the GPU run of
tools/gpu_check.py exercises inductor (`sampling.compile` with the default backend).
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tb_model.mar import MAR
from tb_model.registry import create
from tb_model.tokenbridge import TokenBridge
from tb_train.sample.sampler import Sampler, SamplingConfig

SMALL = dict(latent_size=4, latent_channels=4, num_classes=10, buffer_size=4)
aten = torch.ops.aten


def _model(seed: int = 0, **kw) -> TokenBridge:
    """The tiny model with random non-zero adaLN weights, so every path of the head matters."""
    torch.manual_seed(seed)
    model = create("tiny", **{**SMALL, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_training_forward_backward_compiles_to_one_graph() -> None:
    """The real training path: random MAR orders, label dropout and dropout inside the graph; only the
    masked count (a CPU draw read on the host) comes from outside, as an int."""
    torch._dynamo.reset()
    model = _model()  # train mode: dropout 0.1, label drop 0.1
    x, y = torch.randn(3, 4, 4, 4), torch.tensor([1, 2, 10])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    count = model.mar.sample_mask_count()
    got = compiled(x, y, num_masked=count)
    got["loss"].backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(5)
    assert model.mar.sample_mask_count() == count
    ref = model(x, y, num_masked=count)
    ref["loss"].backward()
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["ce_per_channel"], ref["ce_per_channel"], rtol=0, atol=1e-5)
    for (name, p), g in zip(model.named_parameters(), got_grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_generation_step_compiles_to_one_graph(order: str) -> None:
    """One step of `generate`: the batched-CFG MAR pass, position choice, the head's cached sampling of the
    chosen positions and the write-back, with the step's counts fixed (n = 4 of 9 masked positions)."""
    torch._dynamo.reset()
    model = _model(1).eval()
    B, L, n, remaining = 3, 16, 4, 9
    tokens = torch.randint(0, 64, (B, L, 4))
    mask = MAR.mask_from_orders(torch.rand(B, L).argsort(dim=1), remaining)
    score, labels = torch.rand(B, L), torch.tensor([0, 5, 10])
    drawn = remaining if order == "confidence" else n
    uniforms = torch.rand(B * drawn, model.head.steps)
    fns = model.generation_fns()

    def run(step: Callable[..., None]) -> tuple[Tensor, Tensor]:
        t, m = tokens.clone(), mask.clone()
        with torch.no_grad():
            step(t, m, score, labels, uniforms, n, remaining, 3.0, 0.9, order, False, fns)
        return t, m

    ref = run(model._generation_step)
    got = run(torch.compile(model._generation_step, fullgraph=True, backend="aot_eager"))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    filled = mask & ~ref[1]
    assert bool((ref[1].sum(1) == remaining - n).all()) and bool((filled.sum(1) == n).all())
    assert torch.equal(ref[0][~filled], tokens[~filled]) and not torch.equal(ref[0][filled], tokens[filled])


@pytest.mark.slow
def test_sampler_compile_gives_the_same_latents() -> None:
    """sampling.compile=True: the Sampler runs a compiled MAR pass and head sampling step and gives the same
    latents as the plain Sampler; a second batch, of another size, traces nothing new (dynamic shapes)."""
    torch._dynamo.reset()
    aot_eager, graphs = torch._dynamo.lookup_backend("aot_eager"), []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    model = _model(2).eval()
    settings = SamplingConfig(num_iter=3, guidance=2.0, temperature=0.9, batch_size=3)
    labels, indices = [1, 4, 10], [0, 1, 2]
    plain = Sampler(model, None, settings).latents(labels, indices, seed=7)
    sampler = Sampler(model, None, SamplingConfig(**{**vars(settings), "compile": True}),
                      compile_kwargs={"backend": counting_backend})
    got = sampler.latents(labels, indices, seed=7)
    assert torch.equal(got, plain)
    traced = " ".join(str(node.meta.get("stack_trace")) for gm in graphs for node in gm.graph.nodes)
    assert "tb_model/mar.py" in traced and "tb_model/head.py" in traced  # both functions ran compiled
    seen = len(graphs)
    again = sampler.latents([3, 0], [5, 6], seed=7)
    assert len(graphs) == seen
    assert torch.equal(again, Sampler(model, None, settings).latents([3, 0], [5, 6], seed=7))


class _NoHostReads(TorchDispatchMode):
    """Fails on every op whose result the host has to read from the device before it can go on: a scalar
    read (`.item()`, `int()`, `bool()`, `float()` of a tensor), `nonzero`, `masked_select`, and indexing
    with a boolean mask (its result size is the mask's count). On a GPU each is a stall of the host until
    the queued kernels have run."""

    READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.is_nonzero.default}
    INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in self.READS:
            raise AssertionError(f"host read of a device value: {func}")
        if func.overloadpacket in self.INDEXING and any(
                isinstance(t, Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1])):
            raise AssertionError(f"boolean-mask indexing: {func}")
        return func(*args, **kwargs)


def test_the_detector_sees_host_reads() -> None:
    """The detector fails on the ops the model used to make (so the test below can fail)."""
    z, mask = torch.randn(2, 5, 3), torch.rand(2, 5) > 0.5
    for read in (lambda: int(mask[0].sum()), lambda: z[mask], lambda: bool(mask.any()), lambda: mask.nonzero()):
        with pytest.raises(AssertionError), _NoHostReads():
            read()


@pytest.mark.parametrize("head_type", ["ar", "parallel"])
def test_generation_and_training_never_read_device_values(head_type: str) -> None:
    """`generate` (every order, CFG, per-sample generators and one shared generator, the released loop)
    and the training forward and backward with a host-known mask count run without a single host read."""
    model = _model(3, head_type=head_type)
    labels = torch.tensor([0, 7, 10])
    with _NoHostReads():
        for order in ("random", "raster", "confidence"):
            gens = [torch.Generator().manual_seed(i) for i in range(3)]
            model.generate(labels, num_iter=4, cfg=2.5, order=order, generator=gens)
        model.generate(labels, num_iter=3, order="random", generator=torch.Generator().manual_seed(0), official=True)
        out = model(torch.randn(3, 4, 4, 4), labels, num_masked=12)
        out["loss"].backward()
        mask = MAR.mask_from_orders(torch.rand(3, 16).argsort(dim=1), 5)
        model(torch.randn(3, 4, 4, 4), labels, mask, num_masked=5)["loss"].backward()
