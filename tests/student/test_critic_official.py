"""The holistic term replays the official SKD code (``irfanICMLL/structure_knowledge_distillation`` @ ce208e1).

An independent re-derivation of the official discriminator and its training step lives in this file,
written with plain torch ops and the official mechanism itself: the spectral norm's u and v are
non-trainable leaf tensors whose ``.data`` is rebound on every forward (``networks/spectral.py``), so
autograd's saved references see the newest values when a backward runs. A fixed critic state, saved in
the official checkpoint layout, is loaded into skd's :class:`~student.critic.Critic` and both run the
official call order of one training step:

1. the student's term ``λ_d·(−mean D(z_S))`` and its backward (``student_backward``);
2. ``D_solver.zero_grad()``; D on the teacher, on the student (detached), on the interpolation; the
   gradient penalty on the **sum** of the score map; backward; one SGD step (``discriminator_backward``).

Losses, score maps, the student's gradient, the critic's gradients, u/v, BatchNorm statistics and the
parameters after the step are compared for 65×65 (1×1 score) and 65×129 (1×5 score) maps.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from cache_tools.errors import WeightsError
from student import functional as SF
from student.critic import Critic, SelfAttention, load_official_critic, official_critic_state_dict
from student.losses import HolisticLoss

LAMBDA_D, LAMBDA_GP = 0.1, 10.0
LR, MOMENTUM, WD = 4e-4, 0.9, 5e-4
K, B = 19, 2
SN_LAYERS = ("l1", "l2", "l3", "l4")

# --------------------------------------------------------------------------------------------------
# The official discriminator, re-derived
# --------------------------------------------------------------------------------------------------


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm() + 1e-12)


def official_state(seed: int) -> OrderedDict:
    """A random discriminator state in the official layout (keys as ``Discriminator.state_dict()``)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    sd: OrderedDict = OrderedDict()
    sd["preprocess_additional.weight"] = 1 + rnd(K)
    sd["preprocess_additional.bias"] = rnd(K)
    sd["preprocess_additional.running_mean"] = rnd(K)
    sd["preprocess_additional.running_var"] = 1 + rnd(K).abs()
    sd["preprocess_additional.num_batches_tracked"] = torch.tensor(7)
    dims = (K, 64, 128, 256, 512)
    for i, name in enumerate(SN_LAYERS):
        c_in, c_out = dims[i], dims[i + 1]
        sd[f"{name}.0.module.bias"] = rnd(c_out)
        sd[f"{name}.0.module.weight_u"] = l2n(rnd(c_out, scale=1))
        sd[f"{name}.0.module.weight_v"] = l2n(rnd(c_in * 16, scale=1))
        sd[f"{name}.0.module.weight_bar"] = rnd(c_out, c_in, 4, 4)
    for name, c in (("attn1", 256), ("attn2", 512)):
        for conv, c_out in (("query_conv", c // 8), ("key_conv", c // 8), ("value_conv", c)):
            sd[f"{name}.{conv}.weight"] = rnd(c_out, c, 1, 1)
            sd[f"{name}.{conv}.bias"] = rnd(c_out)
        sd[f"{name}.gamma"] = torch.tensor([0.5 if name == "attn1" else -0.7], dtype=torch.float64)
    sd["last.0.weight"] = rnd(1, 512, 4, 4)
    sd["last.0.bias"] = rnd(1)
    # float32 values, as an official checkpoint holds: both precisions below start from the same numbers
    return OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in sd.items())


class OfficialD:
    """The official ``Discriminator`` forward (``preprocess_GAN_mode=1``, ``imsize=65``) in plain ops.

    Parameters are leaf tensors; u and v are non-trainable leaves rebound through ``.data`` on every
    forward, exactly as ``SpectralNorm._update_u_v`` does (``per_call=True`` snapshots them instead).
    """

    def __init__(self, sd: OrderedDict, dtype: torch.dtype, per_call: bool = False):
        self.per_call = per_call
        self.p = {}
        self.buf = {}
        for k, v in sd.items():
            t = v.to(dtype) if v.is_floating_point() else v.clone()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                self.buf[k] = t.clone()
            elif k.endswith(("weight_u", "weight_v")):
                self.buf[k] = nn.Parameter(t.clone(), requires_grad=False)
            else:
                self.p[k] = t.clone().requires_grad_(True)

    def sn_weight(self, name: str) -> torch.Tensor:
        w = self.p[f"{name}.0.module.weight_bar"]
        u, v = self.buf[f"{name}.0.module.weight_u"], self.buf[f"{name}.0.module.weight_v"]
        h = w.shape[0]
        v.data = l2n(torch.mv(torch.t(w.view(h, -1).data), u.data))
        u.data = l2n(torch.mv(w.view(h, -1).data, v.data))
        if self.per_call:
            u, v = u.detach().clone(), v.detach().clone()
        sigma = u.dot(w.view(h, -1).mv(v))
        return w / sigma.expand_as(w)

    def attn(self, name: str, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        b, c, width, height = x.size()
        q = F.conv2d(x, p[f"{name}.query_conv.weight"], p[f"{name}.query_conv.bias"])
        k = F.conv2d(x, p[f"{name}.key_conv.weight"], p[f"{name}.key_conv.bias"])
        v = F.conv2d(x, p[f"{name}.value_conv.weight"], p[f"{name}.value_conv.bias"])
        proj_query = q.view(b, -1, width * height).permute(0, 2, 1)
        energy = torch.bmm(proj_query, k.view(b, -1, width * height))
        attention = torch.softmax(energy, dim=-1)
        out = torch.bmm(v.view(b, -1, width * height), attention.permute(0, 2, 1)).view(b, c, width, height)
        return p[f"{name}.gamma"] * out + x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p, buf = self.p, self.buf
        buf["preprocess_additional.num_batches_tracked"] += 1
        out = F.batch_norm(
            x,
            buf["preprocess_additional.running_mean"],
            buf["preprocess_additional.running_var"],
            p["preprocess_additional.weight"],
            p["preprocess_additional.bias"],
            training=True,
            momentum=0.1,
            eps=1e-5,
        )
        for name in SN_LAYERS:
            out = F.conv2d(out, self.sn_weight(name), p[f"{name}.0.module.bias"], stride=2, padding=1)
            out = F.leaky_relu(out, 0.1)
            if name in ("l3", "l4"):
                out = self.attn("attn1" if name == "l3" else "attn2", out)
        return F.conv2d(out, p["last.0.weight"], p["last.0.bias"])


def official_step(d: OfficialD, teacher: torch.Tensor, student: torch.Tensor, alpha: torch.Tensor) -> dict:
    """One official training step's adversarial part (``kd_model.py``), returning every quantity."""
    res: dict = {}
    s = student.clone().requires_grad_(True)
    out_g = d(s)
    g_loss = LAMBDA_D * (-out_g.mean())
    g_loss.backward()
    res.update(g_loss=g_loss.detach(), score_g=out_g.detach(), student_grad=s.grad)
    for t in d.p.values():  # D_solver.zero_grad()
        t.grad = None
    d_out_t, d_out_s = d(teacher.detach()), d(student.detach())
    d_loss = LAMBDA_D * (-torch.mean(d_out_t) + d_out_s.mean())
    a = alpha.view(-1, 1, 1, 1).expand_as(teacher)
    interpolated = (a * teacher + (1 - a) * student).detach().requires_grad_(True)
    out = d(interpolated)
    grad = torch.autograd.grad(out, interpolated, torch.ones_like(out), retain_graph=True, create_graph=True)[0]
    grad = grad.view(grad.size(0), -1)
    gp = torch.mean((torch.sqrt(torch.sum(grad**2, dim=1)) - 1) ** 2)
    d_loss = d_loss + LAMBDA_D * LAMBDA_GP * gp
    d_loss.backward()
    res.update(d_loss=d_loss.detach(), gp=gp.detach(), score_t=d_out_t.detach(), score_s=d_out_s.detach())
    res["score_gp"] = out.detach()
    res["grads"] = {k: t.grad.clone() for k, t in d.p.items()}
    with torch.no_grad():  # SGD(momentum, weight_decay), first step: the momentum buffer is the gradient
        res["after"] = {k: t - LR * (t.grad + WD * t) for k, t in d.p.items()}
    res["buffers"] = {k: t.detach().clone() for k, t in d.buf.items()}
    return res


# --------------------------------------------------------------------------------------------------
# skd, through the official checkpoint layout and the trainer's calls
# --------------------------------------------------------------------------------------------------


def save_official_checkpoint(sd: OrderedDict, path) -> None:
    """As the official code would find it: a ``DataParallel`` state dict (u/v as frozen Parameters)."""
    state = OrderedDict()
    for k, v in sd.items():
        frozen = k.endswith(("weight_u", "weight_v"))
        state["module." + k] = nn.Parameter(v, requires_grad=False) if frozen else v
    torch.save({"epoch": 3, "best_mean_IU": 0.5, "state_dict": state}, path)


def skd_step(critic: Critic, teacher: torch.Tensor, student: torch.Tensor, alpha: torch.Tensor) -> dict:
    """The same step through HolisticLoss and an SGD optimizer, as ``student/train.py`` calls them."""
    holistic = HolisticLoss(critic, "wgan-gp", LAMBDA_GP)
    scores: list[torch.Tensor] = []
    hook = critic.last.register_forward_hook(lambda m, i, o: scores.append(o.detach()))
    res: dict = {}
    s = student.clone().requires_grad_(True)
    g_loss = LAMBDA_D * holistic.generator_term(s, tuple(teacher.shape[-2:]))
    g_loss.backward()
    res.update(g_loss=g_loss.detach(), student_grad=s.grad)
    opt = torch.optim.SGD(critic.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    opt.zero_grad(set_to_none=True)
    d_loss, parts = holistic.critic_term(student, teacher, alpha=alpha)
    d_loss = LAMBDA_D * d_loss
    d_loss.backward()
    hook.remove()
    res.update(d_loss=d_loss.detach(), gp=parts["gp"])
    res.update(score_g=scores[0], score_t=scores[1], score_s=scores[2], score_gp=scores[3])
    res["grads"] = {k: p.grad.clone() for k, p in critic.named_parameters()}
    opt.step()
    sd = critic.state_dict()
    res["after"] = {k: p.detach().clone() for k, p in critic.named_parameters()}
    res["buffers"] = {k: v.clone() for k, v in sd.items() if k not in res["after"]}
    return res


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 when both are 0)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def group_err(ours: dict, ref: dict, zero_tol: float) -> float:
    """Worst per-tensor relative error over a group of critic tensors.

    Some gradients are analytically zero (key-conv biases shift every energy of a softmax row; the
    value-conv bias of the last attention shifts D by a constant that cancels in −D(T) + D(S) and has no
    input gradient); in both codes they are round-off (≈ 1e-17 of the largest). Those are held to an
    absolute bound relative to the group's largest entry instead.
    """
    assert set(ours) == set(ref)
    scale = max(t.abs().max().item() for t in ref.values())
    worst = 0.0
    for k, b in ref.items():
        if b.abs().max().item() <= zero_tol * scale:
            assert (ours[k] - b).abs().max().item() <= zero_tol * scale, k
            continue
        worst = max(worst, rel_err(ours[k], b))
    return worst


def compare(ours: dict, ref: dict, before: dict, zero_tol: float) -> dict[str, float]:
    """Max relative error per quantity (the critic's groups of tensors take their worst member)."""
    errs = {k: rel_err(ours[k], ref[k]) for k in ("g_loss", "d_loss", "gp", "student_grad")}
    for k in ("score_g", "score_t", "score_s", "score_gp"):
        errs[k] = rel_err(ours[k], ref[k])
    errs["critic_grads"] = group_err(ours["grads"], ref["grads"], zero_tol)
    uv = [k for k in ref["buffers"] if k.endswith(("_u", "_v"))]
    errs["u_v"] = max(rel_err(ours["buffers"][k], ref["buffers"][k]) for k in uv)
    bn = [k for k in ref["buffers"] if k.endswith(("running_mean", "running_var"))]
    errs["bn_stats"] = max(rel_err(ours["buffers"][k], ref["buffers"][k]) for k in bn)
    nbt = "preprocess_additional.num_batches_tracked"
    assert torch.equal(ours["buffers"][nbt], ref["buffers"][nbt])
    errs["params_after"] = group_err(ours["after"], ref["after"], zero_tol)
    # in float64 also the step itself (after − before), which a 4e-4 learning rate makes tiny; in
    # float32 that difference is mostly the parameters' own rounding
    if next(iter(ref["after"].values())).dtype != torch.float64:
        return errs
    step_ours = {k: ours["after"][k] - before[k].to(ours["after"][k].dtype) for k in ref["after"]}
    step_ref = {k: ref["after"][k] - before[k].to(ref["after"][k].dtype) for k in ref["after"]}
    errs["sgd_step"] = group_err(step_ours, step_ref, zero_tol)
    return errs


def inputs(grid: tuple[int, int], dtype: torch.dtype):
    g = torch.Generator().manual_seed(11)
    teacher = (3 * torch.randn(B, K, *grid, generator=g, dtype=torch.float64)).to(dtype)
    student = (2 * torch.randn(B, K, *grid, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    alpha = torch.tensor([0.3, 0.8], dtype=dtype)
    return teacher, student, alpha


def run_both(tmp_path, grid, dtype, uv_in_backward="last", per_call_ref=False):
    sd = official_state(seed=5)
    path = tmp_path / "model_best.pth.tar"
    save_official_checkpoint(sd, path)
    critic = load_official_critic(Critic(K, input_size=grid, uv_in_backward=uv_in_backward), path).to(dtype)
    teacher, student, alpha = inputs(grid, dtype)
    ours = skd_step(critic, teacher, student, alpha)
    ref = official_step(OfficialD(sd, dtype, per_call=per_call_ref), teacher, student, alpha)
    ours["before"] = sd
    return ours, ref


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("grid", [(65, 65), (65, 129)], ids=["65x65", "65x129"])
def test_one_step_replays_the_official_code_in_float64(tmp_path, grid):
    ours, ref = run_both(tmp_path, grid, torch.float64)
    assert ref["score_t"].shape == (B, 1, 1, 1 if grid[1] == 65 else 5)
    errs = compare(ours, ref, ours["before"], zero_tol=1e-12)
    print(f"\n{grid} float64 max relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < 1e-9, errs


@pytest.mark.parametrize("grid", [(65, 65), (65, 129)], ids=["65x65", "65x129"])
def test_one_step_replays_the_official_code_in_float32(tmp_path, grid):
    ours, ref = run_both(tmp_path, grid, torch.float32)
    errs = compare(ours, ref, ours["before"], zero_tol=1e-5)
    print(f"\n{grid} float32 max relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.slow
def test_the_replay_tells_the_uv_semantics_apart(tmp_path):
    """The comparison is sensitive: per-call u/v move the critic's weight gradients by ~0.2–0.7 %, 1000×
    the float32 agreement above, and a per-call replay of the official code matches them again."""
    grid = (65, 129)
    ours_call, ref_last = run_both(tmp_path, grid, torch.float32, uv_in_backward="call")
    for name in SN_LAYERS:
        key = f"{name}.0.module.weight_bar"
        assert rel_err(ours_call["grads"][key], ref_last["grads"][key]) > 1e-3, key
    ours_call, ref_call = run_both(tmp_path, grid, torch.float32, uv_in_backward="call", per_call_ref=True)
    assert max(compare(ours_call, ref_call, ours_call["before"], zero_tol=1e-5).values()) < 1e-4


def test_gradient_penalty_is_on_the_sum_of_the_score_map():
    """For a 1×5 map the penalty uses ∇ of the map's sum, 5× the gradient of the mean skd used before."""
    torch.manual_seed(0)
    critic = Critic(K, input_size=(65, 129)).double()
    twin = copy.deepcopy(critic)  # same weights, u/v and BatchNorm state for the by-hand value
    real = torch.randn(B, K, 65, 129, dtype=torch.float64)
    gp = SF.gradient_penalty(critic, real, torch.zeros_like(real), alpha=torch.ones(B, dtype=torch.float64))
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(twin.score_map(x).sum(), x)
    norms = grad.flatten(1).norm(dim=1)
    torch.testing.assert_close(gp, ((norms - 1) ** 2).mean(), rtol=1e-12, atol=0)
    assert not torch.allclose(gp, ((norms / 5 - 1) ** 2).mean())


# --------------------------------------------------------------------------------------------------
# Layouts: official checkpoints, skd's own, and skd's earlier critic files
# --------------------------------------------------------------------------------------------------


def test_skd_state_dict_has_the_official_layout():
    official = official_state(seed=1)
    ours = Critic(K, input_size=65).state_dict()
    assert set(ours) == set(official)
    assert all(ours[k].shape == official[k].shape for k in official)


def test_official_loader_refuses_what_is_not_a_discriminator(tmp_path):
    with pytest.raises(WeightsError, match="not an official"):
        official_critic_state_dict({"state_dict": {"conv1.weight": torch.zeros(1)}})
    path = tmp_path / "d.pth"
    torch.save({"state_dict": official_state(seed=1)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        load_official_critic(Critic(K, input_size=17), path)  # no l4 in a 17-grid critic
    with pytest.raises(WeightsError, match="does not exist"):
        load_official_critic(Critic(K), tmp_path / "missing.pth")


class _LegacyCritic(nn.Module):
    """skd's critic before this change: torch's parametrized spectral norm, ``input_bn`` and ``last``."""

    def __init__(self):
        super().__init__()
        self.input_bn = nn.BatchNorm2d(K)
        dims = (K, 64, 128, 256, 512)
        for i, name in enumerate(("l1", "l2", "l3")):
            setattr(
                self, name, nn.Sequential(spectral_norm(nn.Conv2d(dims[i], dims[i + 1], 4, 2, 1)), nn.LeakyReLU(0.1))
            )
        self.attn1 = SelfAttention(256)
        self.l4 = nn.Sequential(spectral_norm(nn.Conv2d(256, 512, 4, 2, 1)), nn.LeakyReLU(0.1))
        self.attn2 = SelfAttention(512)
        self.last = nn.Conv2d(512, 1, 4)


def test_earlier_skd_critic_files_are_renamed_on_load():
    torch.manual_seed(0)
    legacy = _LegacyCritic()
    old = legacy.state_dict()
    assert any(".parametrizations." in k for k in old)
    critic = Critic(K, input_size=65)
    critic.load_state_dict(old)  # strict: every key renamed
    new = critic.state_dict()
    for k, v in old.items():
        k2 = re.sub(r"parametrizations\.weight\.original", "module.weight_bar", k)
        k2 = re.sub(r"parametrizations\.weight\.0\._([uv])", r"module.weight_\1", k2)
        k2 = re.sub(r"^(l\d)\.0\.bias", r"\1.0.module.bias", k2)
        k2 = k2.replace("input_bn.", "preprocess_additional.").replace("last.", "last.0.")
        assert torch.equal(new[k2], v), k
    # parameters() keep their order, so an earlier critic optimizer state lines up on --resume
    old_shapes = [p.shape for p in legacy.parameters()]
    assert [p.shape for p in critic.parameters()] == old_shapes
    opt_old = torch.optim.SGD(legacy.parameters(), lr=0.1, momentum=0.9)
    torch.optim.SGD(critic.parameters(), lr=0.1, momentum=0.9).load_state_dict(opt_old.state_dict())
