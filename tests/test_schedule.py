"""The learning-rate schedule and the time budget: every run ends at lr * lrf, on a fast machine and a slow one."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import TINY, make_folder, newest_run, run_cli
from sedense import trainer as sedense_trainer
from sedense.training.ema import ema_update
from sedense.training.resizing import progressive_size, progressive_sizes
from sedense.training.schedule import WarmupCosine, cosine_factor
from sedense.training.time_plan import StepTimes, TimePlan


def budgeted(steps_per_epoch: int, warmup_steps: int, lrf: float):
    """A time plan and the schedule it drives, on an optimiser of lr 1 (its rate is the schedule's factor)."""
    plan = TimePlan(steps_per_epoch, warmup_steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return plan, opt, WarmupCosine(opt, warmup_steps, lrf, plan.progress)


def simulate(epoch_seconds, budget: float, steps_per_epoch: int = 10, warmup_epochs: int = 1, lrf: float = 0.01):
    """Run a plan against a clock: ``epoch_seconds(e)`` is how long epoch ``e`` takes. Returns the factors per step,
    the epochs run and the seconds used."""
    plan, opt, scheduler = budgeted(steps_per_epoch, warmup_epochs * steps_per_epoch, lrf)
    factors, used, epoch = [], 0.0, 0
    while True:
        for _ in range(steps_per_epoch):
            factors.append(opt.param_groups[0]["lr"])
            scheduler.step()
        used += epoch_seconds(epoch)
        epoch += 1
        if epoch >= plan.replan(epoch, scheduler.last_epoch, epoch_seconds(epoch - 1), budget - used):
            factors.append(opt.param_groups[0]["lr"])  # the rate the run ends with
            return factors, epoch, used


@pytest.mark.parametrize("machine, seconds", [("fast", 1.0), ("slow", 2.7)])
def test_a_time_budget_ends_at_the_floor_within_the_budget(machine, seconds):
    compile_first = lambda e: seconds * (6 if e == 0 else 1)  # noqa: E731 - the first epoch compiles
    factors, epochs, used = simulate(compile_first, budget=100.0)
    assert factors[-1] == pytest.approx(0.01)  # exactly lr * lrf at the end
    assert used <= 100.0 < used + 1.5 * seconds  # within the budget, and no room for another epoch (and margin)
    assert all(b <= a + 1e-12 for a, b in zip(factors[10:], factors[11:]))  # after the warm-up, never up again
    assert epochs == 1 + math.floor((100 - 6 * seconds) / seconds - 0.5)  # more epochs on a faster machine


def test_a_machine_that_slows_down_mid_run_still_ends_at_the_floor():
    factors, epochs, used = simulate(lambda e: 1.0 if e < 20 else 3.0, budget=80.0)
    assert factors[-1] == pytest.approx(0.01) and used <= 80.0
    assert all(b <= a + 1e-12 for a, b in zip(factors[10:], factors[11:]))


def test_the_steps_one_off_costs_are_not_planned_with():
    steps, batch = StepTimes(), (8, 3, 64, 64)
    steps.start_epoch()
    for seconds, shape in [(9.0, batch), (1.0, batch), (1.2, batch), (0.8, batch), (0.3, (2, 3, 64, 64))]:
        steps.add(seconds, shape)
    # The first step beyond the median of the others; the first partial batch, shorter, costs nothing more
    assert steps.one_off() == pytest.approx(8.0)
    plan = TimePlan(steps_per_epoch=5, warmup_steps=5)
    assert plan.replan(1, 5, 12.3, 50.0, end_seconds=1.0, one_off_seconds=steps.one_off()) == 1 + 11  # 4.3 s each
    assert TimePlan(5, 5).replan(1, 5, 12.3, 50.0, end_seconds=1.0) == 1 + 3  # planned with them: 12.3 s each
    # The first step at a new size (progressive resizing compiles again), before the epoch has another to compare
    # with: the plan's step time stands in; then the epoch's own
    steps.start_epoch()
    steps.add(6.0, (8, 3, 80, 80))
    assert steps.one_off() == 0.0 and steps.one_off(fallback=1.5) == pytest.approx(4.5)
    steps.add(2.0, (8, 3, 80, 80))
    steps.add(1.0, batch)
    assert steps.one_off(fallback=1.5) == pytest.approx(6.0 - 1.5)  # the median of 2.0 and 1.0
    steps.start_epoch()  # later epochs: every shape seen, nothing one-off
    for seconds in (3.0, 1.0, 1.0):
        steps.add(seconds, batch)
    assert steps.one_off() == 0.0


def run_against_clock(step_seconds, budget: float, hold: bool, steps_per_epoch: int = 10, lrf: float = 0.01,
                      end_seconds=lambda epoch, plan: 0.0):
    """Steps against a clock that stops the run at ``budget`` (checked after every step, as Lightning's Timer does);
    ``step_seconds(epoch, plan)`` is how long a step takes, ``end_seconds(epoch, plan)`` the work after an epoch's
    last step (validation, reports). Returns the last rate, epochs started and seconds used."""
    plan, opt, scheduler = budgeted(steps_per_epoch, steps_per_epoch, lrf)
    used, epoch = 0.0, 0
    while True:
        start = used
        for done in range(1, steps_per_epoch + 1):
            used += step_seconds(epoch, plan)
            opt.step()
            scheduler.step()
            if hold:  # at this epoch's mean step, as the module does
                plan.hold_to_clock(scheduler.last_epoch, budget - used, (used - start) / done,
                                   (epoch + 1) * steps_per_epoch)
            if used >= budget:
                return opt.param_groups[0]["lr"], epoch + 1, used
        after = end_seconds(epoch, plan)
        used += after
        epoch += 1
        if epoch >= plan.replan(epoch, scheduler.last_epoch, used - start, budget - used, after):
            return opt.param_groups[0]["lr"], epoch, used


def stalls_in_the_last_epoch(epoch: int, plan: TimePlan) -> float:
    return 0.5 if plan.planned_epochs == epoch + 1 else 0.1  # 5x slower once the plan can no longer adapt


def test_a_machine_that_stalls_in_the_last_epoch_still_ends_at_the_floor():
    steady, _, _ = run_against_clock(lambda e, plan: 0.1, budget=30.0, hold=True)
    assert steady == pytest.approx(0.01)  # the plan alone ends at the floor; holding it to the clock changes nothing
    assert run_against_clock(lambda e, plan: 0.1, budget=30.0, hold=False)[0] == steady
    cut, epochs, used = run_against_clock(stalls_in_the_last_epoch, budget=30.0, hold=False)
    assert cut > 0.0105 and used >= 30.0  # without it the budget stops the run above the floor
    held, epochs, used = run_against_clock(stalls_in_the_last_epoch, budget=30.0, hold=True)
    assert held == pytest.approx(0.01) and used >= 30.0  # stopped by the budget, at the floor


@pytest.mark.parametrize("slow_from", [10, 20, 25, 27])
@pytest.mark.parametrize("factor", [1.3, 1.6, 2.0, 3.0])
def test_whenever_a_machine_slows_down_the_run_ends_at_the_floor(slow_from, factor):
    # Late slowdowns leave no room for a whole epoch more while the cosine is still above its floor: the plan
    # then runs one more, which the clock check bends to the floor (the budget may stop it in the middle).
    lr, epochs, used = run_against_clock(lambda e, plan: 0.1 if e < slow_from else 0.1 * factor, 30.0, hold=True)
    assert lr == pytest.approx(0.01) and used < 30.0 + 0.1 * factor


@pytest.mark.parametrize("factor", [1.5, 2.0, 2.6, 3.0, 4.0])
@pytest.mark.parametrize("slowed", ["steps and validation", "validation only"])
def test_one_slow_epoch_near_the_end_still_ends_at_the_floor(slowed, factor):
    # Tiny epochs against an 8-s budget, as in the CLI test: 2 steps, then validation and reports, which may take
    # most of an epoch. One epoch late in the run is slower (a loaded machine). After it there was no room for
    # another *epoch*, and the plan stopped above the floor (7 of these 110 runs did) even where a step or two
    # fitted. Now an epoch whose steps are slow enough is made the last, ending at the floor; and when one more
    # epoch's steps fit, it runs. Only a validation that itself runs past the budget still ends above the floor.
    step, end = (0.1, 0.33) if slowed == "steps and validation" else (0.02, 0.5)
    for slow in range(3, 14):
        def times(seconds: float, slow: int = slow, factor: float = factor):
            return lambda epoch, plan: seconds * (factor if epoch == slow else 1.0)

        steps = times(step) if slowed == "steps and validation" else (lambda epoch, plan: step)
        lr, epochs, used = run_against_clock(steps, 8.0, hold=True, steps_per_epoch=2, end_seconds=times(end))
        assert lr == pytest.approx(0.01) or used >= 8.0, f"slow epoch {slow}: ended at {lr:.4f} after {used:.2f} s"


def test_an_unfrozen_group_follows_the_schedule_and_no_function_is_saved():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": [params[0]]}], lr=0.1)
    scheduler = WarmupCosine(opt, 0, 0.01, lambda step: step / 10)
    for _ in range(5):
        scheduler.step()
    opt.add_param_group({"params": [params[1]], "lr": 0.0, "initial_lr": 0.01})  # as the finetuning callback does
    scheduler.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * cosine_factor(0.6, 0.01))
    assert "progress" not in scheduler.state_dict()


def test_progressive_sizes_move_in_16_px_steps_to_the_full_size_at_three_quarters():
    # The recipe's 0.5 of 112 px is 56, which rounds to the 64-px step: the sizes it trains at, as documented.
    sizes = [progressive_size(112, 0.5, p) for p in (0.0, 0.2, 0.3, 0.5, 0.75, 1.0)]
    assert sizes == [64, 64, 80, 96, 112, 112]
    assert progressive_size(128, 0.5, 0.0) == 64 and progressive_size(32, 0.25, 0.0) == 16  # never below 16
    assert progressive_sizes(112, 0.5) == [64, 80, 96, 112] and progressive_sizes(32, 1.0) == [32]


def test_the_ema_warm_up_forgets_the_first_weights():
    def averaged(update, n: int) -> list:
        averages = [torch.zeros(3), torch.zeros(2, 2)]
        update(averages, [torch.ones(3), torch.ones(2, 2)], torch.tensor(n))
        return averages

    plain, warm = ema_update(0.997), ema_update(0.997, warmup=True)
    assert all(torch.allclose(a, torch.full_like(a, 0.003)) for a in averaged(plain, 1))
    assert all(torch.allclose(a, torch.full_like(a, 1 - 2 / 11)) for a in averaged(warm, 1))
    assert all(torch.equal(a, b) for a, b in zip(averaged(warm, 10**6), averaged(plain, 10**6)))
    counts = [torch.tensor(7)]  # an integer buffer (BatchNorm's num_batches_tracked) follows the model's
    warm(counts, [torch.tensor(12)], torch.tensor(3))
    assert counts[0].item() == 12 and counts[0].dtype == torch.int64


def test_the_ema_of_a_network_with_norms_follows_the_formula_through_averaged_model():
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = AveragedModel(net, multi_avg_fn=ema_update(0.9, warmup=True), use_buffers=True)
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(8, 3))  # training mode: the norm's running statistics and batch count move
        state = {k: v.clone() for k, v in net.state_dict().items()}
        if expected is None:
            expected = state  # the first update copies
        else:
            d = min(0.9, (1 + n) / (10 + n))  # the n-th update, n updates done before it
            expected = {k: v if not v.is_floating_point() else expected[k] + (v - expected[k]) * (1 - d)
                        for k, v in state.items()}
        average.update_parameters(net)
    for key, value in average.module.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert average.module.state_dict()["1.num_batches_tracked"].item() == 6


def results(run) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_budgeted_run_ends_at_the_floor_and_a_slower_one_runs_fewer_epochs(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})
    budget = ["--model.schedule", "time", "--trainer.max_time", "00:00:00:08", "--model.warmup_epochs", "1",
              "--model.lr", "0.002", "--model.lrf", "0.01"]
    run_cli(["fit", *TINY, "--data.root", "data", *budget], tmp_path)
    fast = results(newest_run(tmp_path))
    run_cli(["fit", *TINY, "--data.root", "data", *budget, "--trainer.callbacks+=inject.SlowDown",
             "--trainer.callbacks.seconds=0.4"], tmp_path)
    slow = results(newest_run(tmp_path))
    for rows in (fast, slow):
        assert float(rows[-1]["lr"]) == pytest.approx(0.002 * 0.01)  # the floor, on both machines
        # ... at the end of the schedule, not early: the first epoch's one-off costs (its first step, the first
        # pictures) once made a plan of two epochs, and the run spent the rest of its budget at the floor (2 of 3
        # epochs, 20 of 21). A stall that makes an epoch the last may leave time for one more at the floor.
        at_floor = [float(r["lr"]) <= 1.1 * 0.002 * 0.01 for r in rows]
        assert sum(at_floor) <= max(1, len(rows) // 3), [r["lr"] for r in rows]
        # Within the budget; a run the budget stopped mid-epoch (a loaded machine) validates after it
        assert float(rows[-1]["time"]) <= 8.0 + 1.0
        assert [float(r["time"]) for r in rows] == sorted(float(r["time"]) for r in rows)
    # Each of the slowed run's two steps an epoch takes 0.4 s more, several times a tiny epoch's own time: the
    # fast run holds at least twice its epochs. (When every epoch drew its pictures, 1.5-2.5 s of them, the
    # two runs held 3 and 2, or 2 and 2, epochs.)
    assert len(fast) >= 2 * len(slow), (len(fast), len(slow))


def test_a_first_step_as_long_as_a_compilation_is_not_planned_with(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})
    # The first step takes 3 s more, as torch.compile's does: planned with, the first epoch would leave room for
    # one more in the 8-s budget, that one would end at the floor, and every later epoch would train there.
    run_cli(["fit", *TINY, "--data.root", "data", "--model.schedule", "time", "--trainer.max_time", "00:00:00:08",
             "--model.warmup_epochs", "1", "--model.lr", "0.002", "--model.lrf", "0.01",
             "--trainer.callbacks+=inject.SlowFirstStep", "--trainer.callbacks.seconds=3.0"], tmp_path)
    rows = results(newest_run(tmp_path))
    assert float(rows[-1]["lr"]) == pytest.approx(0.002 * 0.01)
    at_floor = [float(r["lr"]) <= 1.1 * 0.002 * 0.01 for r in rows]
    assert len(rows) >= 3 and sum(at_floor) <= max(1, len(rows) // 3), [r["lr"] for r in rows]


def test_a_run_that_stalls_mid_plan_is_stopped_at_the_floor(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})
    # 5 batches an epoch; from the third epoch on each takes 3.5 s more: the budget runs out inside that epoch,
    # long before the end the plan made from the first two.
    run_cli(["fit", *TINY, "--data.root", "data", "--data.batch_size", "4", "--model.schedule", "time",
             "--trainer.max_time", "00:00:00:12", "--model.warmup_epochs", "1", "--model.lr", "0.002",
             "--model.lrf", "0.01", "--trainer.callbacks+=inject.SlowDown", "--trainer.callbacks.seconds=3.5",
             "--trainer.callbacks.from_epoch=2"], tmp_path)
    run = newest_run(tmp_path)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    plan = last["callbacks"]["TimeBudget"]["plan"]
    assert last["global_step"] < plan["planned_epochs"] * plan["steps_per_epoch"]  # the budget stopped it mid-plan
    rows = results(run)
    assert float(rows[-1]["lr"]) == pytest.approx(0.002 * 0.01)  # yet at the floor, and the weights validated


def test_a_resumed_budget_counts_the_time_already_spent(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})
    budget = ["fit", *TINY, "--data.root", "data", "--model.schedule", "time", "--trainer.max_time", "00:00:00:08",
              "--model.warmup_epochs", "1", "--model.lr", "0.002"]
    stopped = run_cli([*budget, "--trainer.callbacks+=inject.InterruptAfter", "--trainer.callbacks.batches=3"],
                      tmp_path, check=False)
    assert stopped.returncode == 130
    before = results(newest_run(tmp_path))
    run_cli([*budget, "--ckpt_path", "last"], tmp_path)
    rows = results(newest_run(tmp_path))
    assert [int(r["epoch"]) for r in rows] == list(range(len(rows))) and len(rows) > len(before)
    assert float(rows[-1]["lr"]) == pytest.approx(0.002 * 0.01)
    # The time before the interruption counted: a fresh budget would end after 8 s more than that time.
    assert float(rows[-1]["time"]) < 8.0 + float(before[-1]["time"]) / 2


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16"}, "bf16-mixed"), ({"amx_bf16"}, "bf16-mixed"),
                                             ({"avx512f", "avx2"}, "32-true")])
def test_automatic_precision_follows_the_cpu(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sedense_trainer, "cpu_flags", lambda: flags)
    precision, why = sedense_trainer.automatic_precision("auto")
    assert precision == expected and ("emulated" in why) == (expected == "32-true")


def test_precision_auto_says_what_it_chose(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    out = run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "1", "--trainer.precision", "auto"],
                  tmp_path).stdout
    precision, why = sedense_trainer.automatic_precision("cpu")
    assert f"Precision: {precision}, chosen automatically: {why}" in out
    assert not math.isnan(float(results(newest_run(tmp_path))[-1]["train_loss"]))
