import pytest
import torch

from cosmos_train.optim import LambdaLinear, build_optimizer, build_scheduler, step_unless_nonfinite
from cosmos_train.spec import OptimizerSpec, SchedulerSpec


def test_lambdalinear_matches_design_formula_by_hand():
    f = LambdaLinear(SchedulerSpec(warm_up_steps=[10, 0], cycle_lengths=[110, 50],
                                   f_start=[0.0, 1.0], f_max=[1.0, 0.5], f_min=[0.2, 0.0]))
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)          # f_start + (f_max - f_start) * 5/10
    assert f(10) == pytest.approx(1.0)         # f_min + (f_max - f_min) * (110-10)/(110-10)
    assert f(60) == pytest.approx(0.2 + 0.8 * 50 / 100)
    assert f(110) == pytest.approx(0.5)        # second cycle starts at 110, no warm-up
    assert f(135) == pytest.approx(0.5 * 25 / 50)
    assert f(1000) == pytest.approx(0.0)       # past the last cycle: its f_min


def test_upstream_lora_schedule_decays_to_zero():
    f = LambdaLinear(SchedulerSpec(warm_up_steps=[0], cycle_lengths=[2000], f_start=[1e-6],
                                   f_max=[0.6], f_min=[0.0]))
    assert f(0) == pytest.approx(0.6) and f(1000) == pytest.approx(0.3) and f(2000) == 0.0


def test_scheduler_multiplies_base_lr_and_only_trainable_params_are_optimised():
    frozen, trained = torch.nn.Parameter(torch.ones(2), requires_grad=False), torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer(OptimizerSpec(lr=0.5), [frozen, trained])
    assert opt.param_groups[0]["params"] == [trained]
    sch = build_scheduler(SchedulerSpec(warm_up_steps=[4], cycle_lengths=[8], f_start=[0.0],
                                        f_max=[1.0], f_min=[0.0]), opt)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])


def test_no_trainable_params_is_a_clear_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(OptimizerSpec(), [torch.nn.Parameter(torch.ones(1), requires_grad=False)])


def test_scheduler_state_is_plain_counters_and_round_trips():
    p = torch.nn.Parameter(torch.ones(1))
    spec = SchedulerSpec(warm_up_steps=[4], cycle_lengths=[8], f_start=[0.0], f_max=[1.0], f_min=[0.0])
    opt = build_optimizer(OptimizerSpec(lr=1.0), [p])
    sch = build_scheduler(spec, opt)
    for _ in range(3):
        opt.step()
        sch.step()
    state = sch.state_dict()
    assert "lr_lambdas" not in state and state["last_epoch"] == 3
    opt2 = build_optimizer(OptimizerSpec(lr=1.0), [torch.nn.Parameter(torch.ones(1))])
    sch2 = build_scheduler(spec, opt2)
    sch2.load_state_dict(state)
    opt2.step()
    sch2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1.0)  # step 4: end of warm-up


@pytest.mark.parametrize("fused", ["on", "off"])
def test_nonfinite_step_is_skipped_and_fused_needs_no_host_read(fused, monkeypatch):
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(OptimizerSpec(lr=0.1, fused=fused), [p])
    p.grad = torch.ones(3)
    step_unless_nonfinite(opt, torch.tensor(1.0))
    after_one = p.detach().clone()
    assert not torch.equal(after_one, torch.ones(3))
    reads = []
    if fused == "on":  # the decision stays on the device
        monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self) or 0)
    p.grad = torch.full((3,), float("nan"))
    step_unless_nonfinite(opt, torch.tensor(float("nan")))
    monkeypatch.undo()
    assert torch.equal(p.detach(), after_one) and float(opt.state[p]["step"]) == 1.0 and not reads
