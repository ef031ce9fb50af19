"""Tests for brain.py. Each checks the code against an independent computation:
identities by hand, gradients against analytic formulas on a small categorical space,
log-probs token by token, exact evaluation against Monte Carlo.

    python -m pytest -q test_brain.py
"""

import json
import math
import os
import subprocess
import sys

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


def test_brain_loss_is_kl_between_the_two_softmaxes():
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
    assert brain.brain_loss(pol, prop, tgt).item() == pytest.approx(expected, rel=1e-10)


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


def test_policy_away_from_posterior_gives_positive_loss():
    w = categorical(5)
    y = draw(w["proposal"], 3, 6, w["g"])
    loss = brain.brain_loss(
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
    br = brain.brain_loss(pol, sft, one_hot)
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


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------
def test_short_run_lowers_kl_and_is_deterministic():
    cfg = brain.Config(steps=60, sft_steps=150, device="cpu")
    first = brain.run(cfg, show=False)
    second = brain.run(brain.Config(steps=60, sft_steps=150, device="cpu"), show=False)
    assert first["policy"]["kl_posterior_policy"] < 0.7 * first["sft"]["kl_posterior_policy"]
    assert first["policy"]["reward"] > first["sft"]["reward"]
    assert first["posterior"]["kl_posterior_policy"] == 0.0
    for key in ("sft", "policy", "posterior"):
        assert first[key] == second[key]


@pytest.mark.parametrize("method", ["brain", "gdcpp", "dpo"])
def test_micro_batches_give_the_one_pass_gradient(method, world_and_sft):
    world, sft, _ = world_and_sft
    cfg = brain.Config(method=method, prompts_per_step=4, n_samples=4, refresh_every=1)
    proposal = brain.frozen(sft)
    policy = brain.frozen(sft)
    with torch.no_grad():  # move the policy away from the proposal so that every term matters
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in policy.parameters():
        p.requires_grad_(True)
    seqs, prop, sft_lp, reward = brain.score_batch(
        cfg, proposal, sft, world, torch.Generator().manual_seed(0), torch.device("cpu")
    )

    def loss_of(lp):
        return brain.method_loss(
            method, lp.view(4, 4), prop.view(4, 4), sft_lp.view(4, 4), reward.view(4, 4), 1.0
        )

    grads = []
    for micro in (0, 3, 5):  # one pass; chunks that cut through a prompt's samples
        policy.zero_grad()
        torch.manual_seed(0)
        brain.backward_policy_loss(policy, world.eos_id, micro, torch.device("cpu"), seqs, loss_of)
        grads.append(torch.cat([p.grad.reshape(-1) for p in policy.parameters()]))
    assert grads[0].norm() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["dpg", "gdcpp", "dpo"])
def test_every_method_trains(method, world_and_sft):
    world, sft, log_sft = world_and_sft
    cfg = brain.Config(method=method, steps=15, device="cpu")
    brain.seed_everything(0)
    policy = brain.train(cfg, sft, world, torch.device("cpu"))
    log_pol = brain.enumerate_logprobs(policy, world, torch.device("cpu"))
    assert brain.kl(log_pol, log_sft).mean().item() > 1e-4  # it moved
    torch.testing.assert_close(log_pol.exp().sum(-1), torch.ones(len(world.prompts)))


def test_refreshed_proposal_trains(world_and_sft):
    world, sft, log_sft = world_and_sft
    cfg = brain.Config(steps=20, refresh_every=5, device="cpu")
    log_post = brain.posterior_table(log_sft, world.reward_table, cfg.beta)
    policy = brain.train(cfg, sft, world, torch.device("cpu"))
    log_pol = brain.enumerate_logprobs(policy, world, torch.device("cpu"))
    assert brain.kl(log_post, log_pol).mean() < brain.kl(log_post, log_sft).mean()


# ------------------------------------------------------------------------------------------
# Bad input: a clear message, never a traceback from inside torch
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beta", "0"], "beta must be"),
        (["--beta", "-1"], "beta must be"),
        (["--beta", "nan"], "beta must be"),
        (["--n-samples", "1"], "n_samples must be >= 2"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--method", "ppo"], "unknown method 'ppo'"),
        (["--dpo-labels", "coin"], "dpo_labels must be"),
    ],
)
def test_cli_rejects_bad_hyperparameters(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        brain.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_error_has_no_traceback():
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "brain.py"), "--n-samples", "1"],
        capture_output=True,
        text=True,
        cwd=HERE,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "n_samples must be >= 2" in out.stderr


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
        brain.train(brain.Config(steps=2, device="cpu"), sft, NaNReward(), torch.device("cpu"))


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
# Real models (--model): tiny Hugging Face models built here and saved with save_pretrained
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A GPT-2 and a Llama with a word-level tokenizer (no pad token), and two GPT-2 reward
    models with a character-level tokenizer (one logit; two labels)."""
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


def weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("arch, schedule", [("gpt2", ["--refresh-every", "2"]), ("llama", [])])
def test_model_cli_trains_checkpoints_and_resumes(arch, schedule, tiny_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert (
        brain.main(
            tiny_argv(tiny_models, out, "--save-every", "2", "--steps", "2", *schedule, model=arch)
        )
        == 0
    )
    assert (out / "latest").read_text().strip() == "checkpoint-000002"
    assert (
        brain.main(
            tiny_argv(tiny_models, out, "--save-every", "2", "--resume", *schedule, model=arch)
        )
        == 0
    )  # 2 -> 4
    text = capsys.readouterr().out
    assert "steps 2 -> 4" in text and "win rate of the policy over the SFT model" in text
    assert "over the references" in text  # two prompts have a "reference"; one of them is held out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["reward"]) for m in lines)
    ckpt = out / "checkpoint-000004"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-000004"
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    # the resumed run is the uninterrupted run: same weights after 4 steps
    straight = tmp_path / "straight"
    assert brain.main(tiny_argv(tiny_models, straight, *schedule, model=arch)) == 0
    a, b = weights(ckpt), weights(straight / "checkpoint-000004")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(
        (a[k] - weights(tiny_models / arch)[k]).abs().max() > 1e-4 for k in a
    )  # and it trained
    # the checkpoint is a model that from_pretrained loads and that generates
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    ids = tok("the cat", return_tensors="pt")["input_ids"]
    assert (
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=1).shape[1]
        > ids.shape[1]
    )
    assert json.loads((out / "eval.json").read_text())["prompts"] == 1


def test_model_cli_micro_batches_and_pad_note(tiny_models, tmp_path, capsys):
    assert (
        brain.main(tiny_argv(tiny_models, tmp_path / "mb", "--micro-batch", "5", "--steps", "1"))
        == 0
    )
    assert "no pad token; using its EOS token" in capsys.readouterr().out


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "malformed",
        "no_prompt",
        "empty",
        "too_long",
        "labels",
        "bad_label",
        "not_a_model",
        "not_a_reward_model",
    ],
)
def test_model_cli_bad_input_is_one_clear_line(case, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    argv = tiny_argv(tiny_models, out)
    at = argv.index
    expected = {
        "missing": "no such file",
        "malformed": "line 2: not valid JSON",
        "no_prompt": 'line 3: no "prompt" field',
        "empty": "line 1: empty prompt",
        "too_long": "line 2: the prompt is 30 tokens; with --max-new-tokens 6 it exceeds the "
        "model's context of 32",
        "labels": "has 2 labels (bad, good); choose the one that means 'good' with --reward-label",
        "bad_label": "--reward-label 'nice' is not a label",
        "not_a_model": "folder without config.json",
        "not_a_reward_model": "cannot load a reward model",
    }[case]
    if case == "missing":
        argv[at("--prompts") + 1] = str(tmp_path / "nope.jsonl")
    elif case == "malformed":
        argv[at("--prompts") + 1] = write(
            tmp_path / "p.jsonl", '{"prompt": "the cat"}\n{"prompt": "the dog"\n'
        )
    elif case == "no_prompt":
        argv[at("--prompts") + 1] = write(
            tmp_path / "p.jsonl", '{"prompt": "a"}\n\n{"text": "the dog"}\n'
        )
    elif case == "empty":
        argv[at("--prompts") + 1] = write(tmp_path / "p.jsonl", '{"prompt": "  "}\n')
    elif case == "too_long":
        argv[at("--prompts") + 1] = write(
            tmp_path / "p.jsonl",
            '{"prompt": "a"}\n' + json.dumps({"prompt": "the cat " * 15}) + "\n",
        )
    elif case in ("labels", "bad_label"):
        argv[at("--reward-model") + 1] = str(tiny_models / "rm2")
        argv += ["--reward-label", "nice"] if case == "bad_label" else []
    elif case == "not_a_model":
        argv[at("--model") + 1] = str(tmp_path)
    elif case == "not_a_reward_model":
        argv[at("--reward-model") + 1] = str(tiny_models / "gpt2")
    assert brain.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, nothing lost


def test_model_cli_keeps_an_existing_checkpoint(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert brain.main(tiny_argv(tiny_models, out, "--steps", "1")) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert (
        brain.main(tiny_argv(tiny_models, out, "--steps", "1")) == 1
    )  # no --resume: refuse, touch nothing
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (
        brain.main(tiny_argv(tiny_models, out, "--steps", "3", "--resume", "--beta", "2")) == 1
    )  # other settings
    assert (
        "--resume with other settings than the checkpoint's: beta (1.0 -> 2.0)"
        in capsys.readouterr().err
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before


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


def test_bench_row_measures_both_sides(tiny_gpt2):
    row = brain.bench_model(
        "tiny",
        tiny_gpt2,
        torch.randint(2, 11, (2, 3)),
        2,
        2,
        4,
        torch.device("cpu"),
        lambda x, xm, y, ym: y.float().mean(-1),
        steps=2,
        warmup=1,
    )
    assert (
        row["brain_step_s"] > 0
        and row["ce_step_s"] > 0
        and row["sampler_tok_s"] > 0
        and row["generate_tok_s"] > 0
    )
    assert sum(row["share"].values()) == pytest.approx(1.0)
    assert row["step_ratio"] == pytest.approx(row["brain_step_s"] / row["ce_step_s"])


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

        brain.train(
            brain.Config(method=method, steps=4, seed=5, device="cpu"),
            sft,
            Recording(),
            torch.device("cpu"),
        )
        seen[method] = batches
    for method in ("dpg", "dpo"):
        assert len(seen[method]) == 4
        for (x1, y1), (x2, y2) in zip(seen["brain"], seen[method], strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_variance_stats_is_trace_of_covariance():
    g = torch.Generator().manual_seed(11)
    grads = torch.randn(7, 5, generator=g, dtype=torch.float64) * torch.arange(1, 6)
    stats = brain.variance_stats(grads)
    assert stats["trace_cov"] == pytest.approx(torch.cov(grads.T).trace().item(), rel=1e-10)
    assert stats["mean_norm"] == pytest.approx(grads.mean(0).norm().item(), rel=1e-10)


def test_compare_runs_every_method_on_equal_footing():
    out = brain.compare(
        brain.Config(steps=4, sft_steps=20, device="cpu"),
        seeds=1,
        variants=("brain", "gdcpp", "dpo-bt"),
        curve_every=2,
        variance_every=2,
        variance_batches=2,
        show=False,
    )
    runs = {r["method"]: r for r in out["runs"]}
    assert set(runs) == {"sft", "posterior", "brain", "gdcpp", "dpo-bt"}
    for v in ("brain", "gdcpp", "dpo-bt"):
        assert [c["step"] for c in runs[v]["curve"]] == [0, 2, 4]
        assert [p["step"] for p in runs[v]["variance"]] == [0, 2, 4]
        for p in runs[v]["variance"]:
            assert p["brain_vs_gdcpp"]["on_policy"] < 1e-4  # the two coincide on-policy
    # at step 0 every run has the same policy (SFT) and the same probe batches (and coin flips)
    assert runs["brain"]["variance"][0]["estimators"] == runs["gdcpp"]["variance"][0]["estimators"]
    assert runs["brain"]["variance"][0]["estimators"] == runs["dpo-bt"]["variance"][0]["estimators"]
    assert runs["brain"]["curve"][0] == runs["gdcpp"]["curve"][0]
    assert runs["sft"]["final"]["kl_posterior_policy"] == pytest.approx(
        runs["brain"]["curve"][0]["kl_posterior_policy"]
    )


def test_posterior_is_the_reward_kl_frontier(world_and_sft):
    # Gibbs: the posterior maximises E_q[r] - beta KL(q || SFT) over all q; no q lies above it
    world, _, log_sft = world_and_sft
    g = torch.Generator().manual_seed(12)
    points = brain.reward_kl_frontier(log_sft, world.reward_table, [0.5, 1.0, 2.0])
    assert [p["reward"] for p in points] == sorted([p["reward"] for p in points], reverse=True)
    for p in points:
        best = p["reward"] - p["beta"] * p["kl_policy_sft"]
        for _ in range(5):
            log_q = torch.log_softmax(log_sft + torch.randn(log_sft.shape, generator=g), -1)
            r_q = (log_q.exp() * world.reward_table).sum(-1).mean().item()
            assert r_q - p["beta"] * brain.kl(log_q, log_sft).mean().item() < best


# ------------------------------------------------------------------------------------------
# The notebooks (notebooks/*.ipynb) run top to bottom, in their FAST mode, in a kernel of this
# very interpreter; the committed copies keep their outputs (plots visible without running).
# Needs the test extras: nbclient, nbformat, ipykernel, matplotlib (requirements-test.txt).
# ------------------------------------------------------------------------------------------
NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notebooks")
NOTEBOOKS = ("gradient_variance.ipynb", "reproduce_paper.ipynb")


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
    assert len(_outputs(nb, "image/png")) >= 4  # every section drew its plot
    summary = _outputs(nb, "text/markdown")[-1]  # the last table: one verdict per claim
    assert "| claim |" in summary and "reproduced" in summary
    print(f"{name}: FAST mode in {wall:.1f} s")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_keep_their_outputs(name):
    import nbformat

    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    nbformat.validate(nb)
    assert len(_outputs(nb, "image/png")) >= 4, "commit the notebook with its outputs (plots)"
    assert not any(
        out.get("output_type") == "error"
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.get("outputs", [])
    )
    first = "".join(_outputs(nb, "stdout")[:1])
    assert "mode: " in first  # the stored outputs say which mode made them
