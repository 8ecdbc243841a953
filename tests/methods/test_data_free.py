"""DFAD and MAD: losses and their signs by hand; each update moves only what it trains (parameters and BatchNorm
buffers); the teacher stays in eval mode; the generator's per-peer parts sum to the joint gradient (in one process
and across three gloo processes); the EMA generator's update is exact and survives a resume; a staged run (teacher
on real data, then distillation without data) works end to end."""

from __future__ import annotations

import copy
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kdray
from kdray.checkpoint import load_checkpoint
from kdray.config import load_config
from kdray.errors import ConfigError
from kdray.methods.base import PeerContext
from kdray.methods.dfad import sample_diagnostics
from kdray.metrics import MetricSums
from kdray.population import Population
from kdray.step import StepRunner

SMALL = {"arch": "resnet8", "arch_kwargs": {"width": 4}}
GEN = {"nz": 8, "ngf": 4}  # a tiny generator: the maths does not depend on its size


def _tiny() -> dict:
    """tests/conftest.py's TINY (by path: several conftest.py files share the module name), for module fixtures and
    spawned processes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("kdray_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return copy.deepcopy(module.TINY)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A kdray checkpoint of a tiny teacher, trained for 3 steps on the synthetic set."""
    raw = _tiny()
    raw["peers"] = [{"name": "net", **SMALL}]
    raw["method"] = {"name": "independent"}
    raw["train"]["steps_per_epoch"] = 3
    out = tmp_path_factory.mktemp("teacher") / "run"
    kdray.train(raw, out=out)
    return str(out)


def _raw(base: dict, ckpt: str, method: str = "dfad", students: int = 1, **kw) -> dict:
    raw = copy.deepcopy(base)
    raw["peers"] = [{"name": "teacher", **SMALL, "frozen": True, "checkpoint": ckpt}] + [
        {"name": f"s{i}", **SMALL} for i in range(students)
    ]
    raw["method"] = {"name": method, **GEN, "student_steps": 2, **kw}
    raw["train"].update(steps_per_epoch=3, epochs=2)
    return raw


def _pop(raw: dict, float64: bool = False) -> Population:
    raw = copy.deepcopy(raw)
    if float64:
        raw["train"]["dtype"] = "float64"
    return Population(load_config(raw))


def _state(module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm statistics, num_batches_tracked)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _phase(pop: Population, name: str):
    i, phase = next((i, ph) for i, ph in enumerate(pop.method.phases()) if ph.name == name)
    return i, phase


def _run_phase(pop: Population, name: str, step: int = 0) -> MetricSums:
    i, phase = _phase(pop, name)
    metrics = MetricSums()
    rng = torch.Generator().manual_seed(step)
    StepRunner(pop)._run_phase(phase, (i, 0), None, 0, step, rng, None, metrics)
    return metrics


# ------------------------------------------------------------------------------------------- losses by hand
S = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
T = torch.tensor(
    [[0.0, 2.0], [1.0, 1.0]]
)  # |S - T| = [[1, 0], [1, 2]]: L1 = 1.0, sign(S - T) = [[1, 0], [-1, -1]]


def _ctx(phase: str, k: int, own, received: dict) -> PeerContext:
    return PeerContext(k, phase, {"logits": own}, {j: {"logits": v} for j, v in received.items()}, {}, None,
                       torch.zeros(len(own), 1, 4, 4), None, None, 0, 0)  # fmt: skip


@pytest.mark.parametrize("students", [1, 2])
def test_dfad_losses_and_their_signs_by_hand(tiny_raw, teacher_ckpt, students):
    """The student minimises L1(s, t) = mean |s - t| over batch and classes (gradient +sign(s - t) / 4); the
    generator's term is -L1/S in the student's part (gradient -sign(s - t) / (4S)) and 0 in value in the teacher's,
    whose gradient is -sum_k d L1(s_k, t)/dt / S. A flipped sign, a sum instead of a mean or a part carrying the
    value twice fails."""
    method = _pop(_raw(tiny_raw, teacher_ckpt, students=students)).method
    student_phase, gen_phase = _phase_objs(method)
    s = S.clone().requires_grad_(True)
    terms = method.loss(student_phase, _ctx("student", 1, s, {0: T}))
    assert set(terms) == {"student"} and terms["student"].item() == pytest.approx(1.0)
    terms["student"].backward()
    assert torch.equal(s.grad, torch.sign(S - T) / 4)

    s = S.clone().requires_grad_(True)
    gen = method.loss(gen_phase, _ctx("gen", 1, s, {0: T}))["gen"]
    assert gen.item() == pytest.approx(-1.0 / students)
    gen.backward()
    assert torch.allclose(s.grad, -torch.sign(S - T) / (4 * students))

    t = T.clone().requires_grad_(True)
    others = {k: S + k - 1 for k in range(1, students + 1)}  # student k's logits: S + (k - 1)
    gen_t = method.loss(gen_phase, _ctx("gen", 0, t, others))["gen"]
    assert gen_t.item() == 0.0  # the teacher's part carries gradient only
    gen_t.backward()
    expected = -sum(torch.sign(T - z) for z in others.values()) / (4 * students)
    assert torch.allclose(t.grad, expected)


def _phase_objs(method):
    phases = {ph.name: ph for ph in method.phases()}
    return phases["student"], phases["gen"]


def test_mad_student_loss_weighs_both_generators_by_hand(tiny_raw, teacher_ckpt):
    """The first half of the batch comes from G, the second from G~: ``student`` = L1 on the first half,
    ``student_ema`` on the second, each a mean over its own half."""
    method = _pop(_raw(tiny_raw, teacher_ckpt, "mad")).method
    student_phase, _ = _phase_objs(method)
    s = torch.cat([S, S + 3.0])  # the second half is 3 away from T's second half everywhere
    terms = method.loss(student_phase, _ctx("student", 1, s, {0: torch.cat([T, S])}))
    assert terms["student"].item() == pytest.approx(1.0)
    assert terms["student_ema"].item() == pytest.approx(3.0)
    assert method.weight("student") == 1.0 and method.weight("student_ema") == 1.0


def test_sample_diagnostics_by_hand():
    x = torch.zeros(4, 1, 2, 2)
    x[1] += 2.0  # d = 4 pixels; distances: |x1 - xj| = 4 for j != 1, 0 otherwise -> mean over 6 pairs = 2
    one_class = torch.tensor([[5.0, 0.0, 0.0]] * 4)
    d = sample_diagnostics(x, one_class, collapse_share=0.9)
    assert float(d["gen_diversity"]) == pytest.approx(2.0 / math.sqrt(4))
    assert float(d["gen_top_share"]) == 1.0 and float(d["collapse"]) == 1.0
    assert [float(d[f"gen_class{c}"]) for c in range(3)] == [1.0, 0.0, 0.0]  # the class histogram
    d = sample_diagnostics(
        torch.zeros(4, 1, 2, 2), torch.zeros(4, 3), collapse_share=0.9
    )  # uniform predictions
    assert float(d["gen_entropy"]) == pytest.approx(math.log(3))
    assert float(d["gen_diversity"]) == 0.0
    spread = torch.eye(4) * 5  # four classes, one sample each
    d = sample_diagnostics(x, spread, collapse_share=0.9)
    assert float(d["gen_top_share"]) == 0.25 and float(d["collapse"]) == 0.0
    assert [float(d[f"gen_class{c}"]) for c in range(4)] == [0.25] * 4


# -------------------------------------------------------------------------------- what each update moves
@pytest.mark.parametrize("method", ["dfad", "mad"])
def test_each_update_moves_only_what_it_trains(tiny_raw, teacher_ckpt, method):
    """A student update changes the students only (never the generator, its EMA copy or the teacher, BatchNorm
    statistics included); a generator update changes the generator only (and, for MAD, its EMA copy), not the
    students' parameters nor their BatchNorm statistics; the teacher stays in eval mode throughout."""
    pop = _pop(
        _raw(tiny_raw, teacher_ckpt, method, students=2, **({"conditional": True} if method == "mad" else {}))
    )
    teacher, students, shared = pop.peers[0], pop.peers[1:], pop.shared.module
    for p in pop.peers:
        p.train_mode()
    assert not teacher.net.training and all(s.net.training for s in students)
    t0, s0, g0 = _state(teacher.net), [_state(s.net) for s in students], _state(shared)

    _run_phase(pop, "student")
    s1 = [_state(s.net) for s in students]
    assert _same(_state(teacher.net), t0) and _same(_state(shared), g0)
    for a, b in zip(s0, s1):
        assert not _same(a, b)
        assert any(not torch.equal(a[k], b[k]) for k in a if "running_mean" in k)  # students' BN moved

    _run_phase(pop, "gen")
    assert _same(_state(teacher.net), t0)
    assert all(_same(_state(s.net), b) for s, b in zip(students, s1))
    g1 = _state(shared)
    for prefix in ("gen.", "ema.", "embed.") if method == "mad" else ("gen.",):
        assert any(not torch.equal(g0[k], g1[k]) for k in g0 if k.startswith(prefix)), prefix
    assert not teacher.net.training


def test_gen_bn_stats_update_lets_the_generator_update_move_the_students_statistics(tiny_raw, teacher_ckpt):
    """The authors' code leaves the student in train mode in the generator step: ``gen_bn_stats: update``."""
    pop = _pop(_raw(tiny_raw, teacher_ckpt, gen_bn_stats="update"))
    student = pop.peers[1]
    for p in pop.peers:
        p.train_mode()
    before = _state(student.net)
    _run_phase(pop, "gen")
    after = _state(student.net)
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "tracked" not in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)


def test_student_updates_draw_fresh_noise_deterministically(tiny_raw, teacher_ckpt):
    """Each of the ``student_steps`` updates of a step sees new images (successive draws of the step's generator),
    the generator update others again; a second population replays exactly the same draws."""

    def inputs_of_step(pop, step):
        seen = []
        original = pop.method.phase_inputs

        def spy(phase, batch, shared, rng):
            x = original(phase, batch, shared, rng)
            seen.append((phase.name, x.detach().clone()))
            return x

        pop.method.phase_inputs = spy
        StepRunner(pop).step(None, 0, step)
        return seen

    raw = _raw(tiny_raw, teacher_ckpt, student_steps=3)
    first = inputs_of_step(_pop(raw), 0)
    assert [name for name, _ in first] == ["student"] * 3 + ["gen"]
    xs = [x for _, x in first]
    assert all(not torch.allclose(xs[i], xs[j]) for i in range(4) for j in range(i))
    again = inputs_of_step(_pop(raw), 0)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    other_step = inputs_of_step(_pop(raw), 1)
    assert not torch.allclose(other_step[0][1], first[0][1])


# ------------------------------------------------------------------------------------ the generator's split
def _joint_and_split(pop: Population, conditional: bool = False):
    """The generator's gradient from the joint objective (every output live) and from the sum of the per-peer parts
    the method's loss returns (others detached, as each Ray worker computes them), on the same z."""
    method, shared = pop.method, pop.shared.module
    nets = [p.net for p in pop.peers]
    for n in nets:
        n.eval()  # identical networks in the two forwards below
    _, phase = _phase(pop, "gen")
    student_ids = method.students

    def grads():
        out = [p.grad.clone() for p in shared.parameters() if p.grad is not None]
        shared.zero_grad(set_to_none=True)
        return out

    def forward():
        x = method.phase_inputs(phase, None, shared, torch.Generator().manual_seed(7))
        return x, [n(x)["logits"] for n in nets]

    x, z = forward()
    t = z[method.teacher]
    joint = sum(method.discrepancy(z[k], t) for k in student_ids) / len(student_ids)
    objective = -method.weight("gen") * joint
    if conditional:
        objective = objective + method.weight("gen_label") * F.cross_entropy(t, method._gen_labels)
    objective.backward()
    g_joint = grads()

    x, z = forward()
    values, total = {}, 0
    for k in range(len(nets)):
        received = {j: z[j].detach() for j in method.phase_topology(phase).sources_of(k)}
        terms = method.loss(phase, _ctx("gen", k, z[k], received))
        for name, v in terms.items():
            values[name] = values.get(name, 0.0) + float(v.detach())
        total = total + sum(method.weight(n) * v for n, v in terms.items())
    total.backward()
    return g_joint, grads(), float(joint.detach()), values


@pytest.mark.parametrize(
    ("method", "kw"),
    [("dfad", {}), ("dfad", {"discrepancy": "kl", "temperature": 2.0}), ("mad", {"conditional": True})],
)
def test_generator_parts_sum_to_the_joint_gradient(tiny_raw, teacher_ckpt, method, kw):
    """Teacher + 2 students, float64: sum over peers of the parts' gradients = the joint objective's gradient, and
    the parts' logged values add up to -J (the objective, not a multiple of it)."""
    pop = _pop(_raw(tiny_raw, teacher_ckpt, method, students=2, **kw), float64=True)
    g_joint, g_split, joint, values = _joint_and_split(pop, conditional=kw.get("conditional", False))
    assert (
        len(g_joint)
        == len(g_split)
        == len(list(pop.shared.module.parameters()))
        - (len(list(pop.shared.module["ema"].parameters())) if method == "mad" else 0)
    )
    assert any(float(g.abs().max()) > 0 for g in g_joint)
    for a, b in zip(g_joint, g_split):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), (a - b).abs().max()
    assert values["gen"] == pytest.approx(-joint, rel=1e-12)


def test_logged_generator_loss_is_the_objective(tiny_raw, teacher_ckpt):
    """``shared/loss_gen`` is -J = -(1/S) sum_k L1(s_k, t), which the teacher's diagnostic computes from every
    output: not twice it (each term is in two parts), not S times it."""
    pop = _pop(_raw(tiny_raw, teacher_ckpt, students=2))
    m = StepRunner(pop).step(None, 0, 0).means()
    assert m["shared/loss_gen"] == pytest.approx(-m["teacher/gen_discrepancy"], rel=1e-6)
    assert m["teacher/gen_discrepancy"] > 0
    for key in ("gen_diversity", "gen_entropy", "gen_top_share", "collapse"):
        assert f"teacher/{key}" in m
    assert 0 < m["teacher/gen_diversity"] < 3 and 0 <= m["teacher/gen_entropy"] <= math.log(4) + 1e-6


# ------------------------------------------------------------------------------------------------------ MAD
def test_mad_ema_update_is_exact_and_outside_every_optimizer(tiny_raw, teacher_ckpt):
    """After the generator step: theta~ = m theta~_before + (1 - m) theta_after, for parameters and BatchNorm
    statistics (float64); the EMA copy has no gradient and is in no optimizer."""
    pop = _pop(_raw(tiny_raw, teacher_ckpt, "mad", momentum=0.95), float64=True)
    shared = pop.shared.module
    ema = shared["ema"]
    optimised = {id(p) for g in pop.shared.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in shared["gen"].parameters()}
    assert all(not p.requires_grad for p in ema.parameters())
    before = _state(ema)
    StepRunner(pop).step(None, 0, 0)
    after, gen = _state(ema), _state(shared["gen"])
    assert not _same(before, after)
    for k, v in after.items():
        if v.is_floating_point():
            expected = 0.95 * before[k] + 0.05 * gen[k]
            assert torch.allclose(v, expected, rtol=1e-14, atol=1e-15), k
            assert v.dtype == torch.float64
        else:
            assert torch.equal(v, gen[k]), k


@pytest.mark.parametrize("conditional", [False, True])
def test_mad_second_half_is_g_tilde_output_for_the_second_draw(tiny_raw, teacher_ckpt, conditional):
    """A student update's inputs are ``[G(z [+ e_y]), G~(z' [+ e_y'])]``: z (and y) drawn first from the step's
    generator, then z' (and y'). Recomputed here from the same draws, with G~ set far from G so that sampling G twice
    (or G~ twice, or swapping the halves) cannot pass; ``ema_batch: half`` gives batch_size / 2 of each."""
    pop = _pop(_raw(tiny_raw, teacher_ckpt, "mad", conditional=conditional, ema_batch="half"), float64=True)
    method, shared = pop.method, pop.shared.module
    with torch.no_grad():
        for p in shared["ema"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=p.dtype))
    _, student_phase = _phase(pop, "student")
    x = method.phase_inputs(student_phase, None, shared, torch.Generator().manual_seed(3))
    n = 8  # batch_size 16, ema_batch: half
    assert x.shape[0] == 2 * n

    rng = torch.Generator().manual_seed(3)

    def draw():
        z = torch.randn(n, GEN["nz"], generator=rng).double()  # drawn in float32, as the method does
        if conditional:
            z = z + shared["embed"](torch.randint(4, (n,), generator=rng))
        return z

    z, z2 = draw(), draw()
    with torch.no_grad():
        assert torch.allclose(x[:n], shared["gen"](z), rtol=1e-12, atol=1e-12)
        assert torch.allclose(x[n:], shared["ema"](z2), rtol=1e-12, atol=1e-12)
        # G~ and G differ here, so the check bites
        assert not torch.allclose(x[n:], shared["gen"](z2), atol=1e-3)


def test_mad_resumes_exactly_mid_epoch(tiny_raw, teacher_ckpt, tmp_path):
    """Stopped after 4 of 6 steps and resumed: the generator, its EMA copy, the embeddings and every network equal an
    uninterrupted run's, bit for bit."""
    from tests.helpers import train_until_stopped

    raw = _raw(tiny_raw, teacher_ckpt, "mad", conditional=True)
    full = load_checkpoint(kdray.train(raw, out=tmp_path / "full").checkpoint)
    part = copy.deepcopy(raw)
    part["train"]["checkpoint_every_steps"] = 1
    train_until_stopped(part, tmp_path / "part", steps_done=4)
    resumed = load_checkpoint(kdray.train(raw, resume=tmp_path / "part").checkpoint)
    assert any(k.startswith("ema.") for k in full["shared"]["module"])
    for key, value in full["shared"]["module"].items():
        assert torch.equal(resumed["shared"]["module"][key], value), key
    for name in full["peers"]:
        for key, value in full["peers"][name]["net"].items():
            assert torch.equal(resumed["peers"][name]["net"][key], value), key


# ------------------------------------------------------------------------------------------- end to end
def test_a_staged_run_trains_a_teacher_on_data_then_distils_without_it(tiny_raw, tmp_path):
    """Stage 1: the teacher on the (synthetic) training set; stage 2: DFAD from its final weights, no training set.
    The teacher is stage 1's final weights, bit for bit, after stage 2 (eval mode: BN statistics unchanged)."""
    raw = copy.deepcopy(tiny_raw)
    raw.pop("peers")
    raw.pop("method")
    raw["train"].update(epochs=1, steps_per_epoch=3)
    raw["stages"] = [
        {"name": "teacher", "method": {"name": "independent"}, "peers": [{"name": "net", **SMALL}]},
        {
            "name": "student",
            "method": {"name": "dfad", **GEN, "student_steps": 2},
            "train": {"epochs": 2},
            "peers": [
                {"name": "teacher", "frozen": True, "from_stage": "teacher", **SMALL},
                {"name": "student", **SMALL},
            ],
        },
    ]
    result = kdray.train(raw, out=tmp_path / "run")
    out = tmp_path / "run" / "stages"
    teacher = load_checkpoint(out / "teacher" / "checkpoints" / "last.pt")["peers"]["net"]["net"]
    after = load_checkpoint(out / "student" / "checkpoints" / "last.pt")["peers"]["teacher"]["net"]
    assert all(torch.equal(teacher[k], after[k]) for k in teacher)
    last = result.summary["history"][-1]
    assert "shared/loss_gen" in last and "student/loss_student" in last and "teacher/collapse" in last
    assert "student/train_acc" not in last  # no training data
    assert result.summary["peers"][1]["test_acc"] is not None  # evaluated on real data


# ----------------------------------------------------------------------------------------------- config checks
def test_config_checks(tiny_raw, teacher_ckpt):
    raw = _raw(tiny_raw, teacher_ckpt, students=1)
    two = copy.deepcopy(raw)
    two["peers"][1].update(frozen=True, checkpoint=teacher_ckpt)
    two["peers"].append({"name": "s", **SMALL})
    with pytest.raises(ConfigError, match="one frozen teacher"):
        load_config(two)
    odd = copy.deepcopy(raw)
    odd["data"]["synthetic"]["image_size"] = 10
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_config(odd)
    none = copy.deepcopy(raw)
    none["train"]["steps_per_epoch"] = None
    with pytest.raises(ConfigError, match="steps"):
        load_config(none)
    bad = copy.deepcopy(raw)
    bad["method"]["weights"] = {"student_ema": 1.0}  # a MAD term given to DFAD
    with pytest.raises(ConfigError, match="student_ema"):
        load_config(bad)


# --------------------------------------------------------------------------------- three gloo processes
WORLD = 3


def _dist_raw(ckpt: str) -> dict:
    raw = _raw(_tiny(), ckpt, "mad", students=2, conditional=True)
    raw["engine"] = {"name": "ray", "exchange": "collective"}
    raw["train"]["dtype"] = "float64"  # the sums' order differs: compare far below float32's rounding
    return raw


def _generator_grads(raw: dict, ranks: list[int] | None) -> list[torch.Tensor]:
    """The shared generator's gradients as the step hands them to its optimizer (after the all-reduce), after the
    student updates of step 0: the whole population in one process (``ranks=None``), or one peer per process."""
    from kdray.exchange import Wiring, make_exchange
    from kdray.replicas import exchange_plan

    cfg = load_config(raw)
    pop = Population(cfg, local_ids=ranks)
    runner = StepRunner(pop)
    if ranks is not None:
        runner.exchange = make_exchange(cfg.engine.exchange, Wiring(ranks[0], WORLD, torch.device("cpu")))
        runner.exchange.attach(exchange_plan(pop))
    captured = []
    reduce = runner.exchange.reduce_shared_grads

    def spy(params):
        reduce(params)
        captured.append([q.grad.clone() if q.grad is not None else None for q in params])

    runner.exchange.reduce_shared_grads = spy
    runner.step(None, 0, 0)
    assert len(captured) == 1
    return captured[0]


def _rank_main(rank: int, init_file: str, raw: dict, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results[rank] = _generator_grads(raw, ranks=[rank])
    dist.destroy_process_group()


def test_generator_gradients_across_three_processes_equal_the_in_process_ones(teacher_ckpt):
    """The teacher and two students on three gloo processes (the Ray engine's collective exchange, without Ray):
    each back-propagates its own part of MAD's conditional generator loss, the all-reduce sums them; the sum equals
    one process's gradient through every part, after two student updates run the same way on both sides."""
    raw = _dist_raw(teacher_ckpt)
    torch.set_num_threads(1)
    whole = _generator_grads(raw, ranks=None)
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        # fork: the children inherit the imported modules (spawning three interpreters that import torch costs
        # 15-40 s on a busy 2-core machine); safe here, every process runs one torch thread
        mp.start_processes(
            _rank_main,
            args=(os.path.join(tmp, "pg"), raw, results),
            nprocs=WORLD,
            join=True,
            start_method="fork",
        )
        got = dict(results)
        manager.shutdown()
    assert any(g is not None and g.abs().sum() > 0 for g in whole)
    for rank in range(WORLD):
        assert len(got[rank]) == len(whole)
        for a, b in zip(got[rank], whole):
            assert (a is None) == (b is None)
            if b is not None:
                assert a.dtype == torch.float64
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), (rank, (a - b).abs().max())
