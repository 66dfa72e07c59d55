import torch

from titanlite.optim.adamw import AdamW


def _make_params(seed: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(17, 5)), torch.nn.Parameter(torch.randn(4)),
            torch.nn.Parameter(torch.randn(3, 2, 6))]


def _grads(step: int, params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * (0.1 + step) for p in params]


def test_matches_torch_adamw_step_for_step_with_changing_lr():
    ours, ref = _make_params(0), _make_params(0)
    settings = [dict(lr=0.03, betas=(0.8, 0.95), weight_decay=0.01), dict(lr=0.5, betas=(0.96, 0.995),
                                                                         weight_decay=0.0)]
    opt = AdamW([dict(params=ours[:2], name="a", **settings[0]), dict(params=ours[2:], name="b", **settings[1])],
                eps=1e-10)
    torch_opt = torch.optim.AdamW([dict(params=ref[:2], **settings[0]), dict(params=ref[2:], **settings[1])],
                                  eps=1e-10, foreach=False)
    for step in range(12):
        lr_multiplier = min(1.0, (step + 1) / 4)  # schedules change lr between steps
        for o in (opt, torch_opt):
            for group, s in zip(o.param_groups, settings):
                group["lr"] = s["lr"] * lr_multiplier
        for params in (ours, ref):
            for p, g in zip(params, _grads(step, params)):
                p.grad = g.clone()
        opt.step()
        torch_opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_decay_is_applied_before_the_update_and_skips_params_without_grad():
    p = torch.nn.Parameter(torch.full((3,), 2.0))
    frozen = torch.nn.Parameter(torch.full((2,), 5.0))
    opt = AdamW([dict(params=[p, frozen], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)])
    p.grad = torch.ones(3)
    opt.step()
    # decay 2 * (1 - 0.05) = 1.9, then the first bias-corrected Adam step is exactly -lr * sign(g).
    torch.testing.assert_close(p.detach(), torch.full((3,), 1.9 - 0.1), atol=1e-6, rtol=0)
    assert torch.equal(frozen.detach(), torch.full((2,), 5.0))
    assert opt.state[frozen]["step"] == 0 and opt.state[p]["step"] == 1


def test_bf16_param_keeps_fp32_moments():
    p = torch.nn.Parameter(torch.randn(8, 4).to(torch.bfloat16))
    opt = AdamW([dict(params=[p], lr=0.01)])
    p.grad = torch.randn(8, 4).to(torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_state_dict_resume_continues_identically():
    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, _grads(step, params)):
                p.grad = g
            opt.step()

    group = dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.1, name="g")
    straight = _make_params(3)
    opt = AdamW([dict(params=straight, **group)])
    run(straight, opt, range(6))

    first = _make_params(3)
    opt_first = AdamW([dict(params=first, **group)])
    run(first, opt_first, range(3))
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in opt_first.state_dict().items()}
    assert set(saved) == {"g.0", "g.1", "g.2"} and float(saved["g.0"]["step"]) == 3.0

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt_resumed = AdamW([dict(params=resumed, **group)])
    opt_resumed.load_state_dict(saved)
    run(resumed, opt_resumed, range(3, 6))
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
