"""BRAIn: Bayesian Reward-conditioned Amortized Inference, a minimal reference.

Pandey et al., "BRAIn: Bayesian Reward-conditioned Amortized Inference for natural language
generation from feedback", ICML 2024 (arXiv 2402.02479). One step of the method:

    x       = B prompts;   y_1..y_n ~ q'(.|x)                  # the proposal: SFT model or policy
    log p~  = log p_sft(y_i|x) + r(x, y_i) / beta              # 1. the posterior, unnormalised
    alpha^  = softmax_i(log p~ - log q'(y_i|x))                # 2. the targets
    beta^   = softmax_i(log q_theta(y_i|x) - log q'(y_i|x))    # 2. the policy's own weights
    loss    = KL(alpha^ || beta^)                              # 3. its gradient: -sum_i
    loss.backward(); optimizer.step()                          #  (alpha^_i - beta^_i) grad log q

Part I (this half) is the method in the paper's order, the training loop, the exact evaluation on
an embedded toy world and the default run. Part II, after its banner, holds the tools around it:
--compare, real Hugging Face models (--model), --bench and the command line; a reader may skip it.
Comments tag whose each choice is: (paper), (authors' code: their public toy code), (ours).
This is a teaching reference, not a library: copy what you need.

    python brain.py          # BRAIn on the embedded world: offline, CPU, about 16 s
    python brain.py --help   # every flag (--compare, --model, --bench), with its default
"""

import argparse
import contextlib
import copy
import functools
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

METHODS = ("brain", "dpg", "gdcpp", "dpo")
ALL = slice(None)  # the whole batch: one process


def arg(default, help):  # a Config field with its command-line help
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every hyperparameter, once: field n_samples is flag --n-samples (Part II: Args adds more)."""

    # the method (paper §4-§5)
    method: str = arg("brain", "the estimator that trains the policy: " + ", ".join(METHODS))
    beta: float = arg(1.0, "posterior temperature (> 0): log p(G=1|x,y) = r(x,y) / beta")
    n_samples: int = arg(8, "n: completions sampled per prompt (>= 2)")
    refresh_every: int | None = arg(None, "K: q' := the policy every K steps (0: the SFT model)")
    dpo_labels: str = arg("argmax", "DPO pairs: argmax (best vs worst), bt (Bradley-Terry coin)")
    # training (ours)
    steps: int = arg(200, "optimizer steps")
    prompts_per_step: int = arg(16, "B: prompts per step, drawn uniformly with replacement")
    lr: float | None = arg(None, "Adam learning rate")
    seed: int = arg(0, "the one seed: corpus, SFT pretraining, prompts, samples")
    device: str = arg("auto", "auto (CUDA when there is a GPU), cpu or cuda")
    # the embedded world
    sft_steps: int = arg(300, "Adam steps that pretrain the toy SFT prior")
    sft_batch: int = arg(256, "sequences per SFT pretraining step")

    def __post_init__(self):
        # the defaults of lr and K (with --model, Part II's Args sets its own first)
        self.lr = 1e-3 if self.lr is None else self.lr
        self.refresh_every = 0 if self.refresh_every is None else self.refresh_every

    def validate(self):
        """One clear message for the first bad option, before any work starts."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 (self-normalisation), got {self.n_samples}")
        if self.steps < 1 or self.prompts_per_step < 1:
            raise ValueError(
                f"steps must be >= 1 and prompts_per_step >= 1, got {self.steps} and "
                f"{self.prompts_per_step}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
        if self.dpo_labels not in ("argmax", "bt"):
            raise ValueError(f"dpo_labels must be 'argmax' or 'bt', got {self.dpo_labels!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA GPU (use --device cpu or auto)")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.sft_steps < 1 or self.sft_batch < 1:
            raise ValueError("sft_steps and sft_batch must be >= 1")
        return self


# 1. The reward-conditioned posterior (paper §4) ---------------------------------------------------
def log_goodness(reward, beta):
    """log p(G=1 | x, y) = r(x, y) / beta (ours, after the paper's Bradley-Terry case). Any
    log-likelihood of "good" gives a valid Bayesian posterior: swap in log 1[y satisfies c] (GDC's
    target; each prompt then needs a sample that satisfies c) and the rest works unchanged."""
    return reward / beta


def log_posterior(sft_logp, reward, beta):
    """Unnormalised log p(y | x, G=1) = log p_sft(y|x) + log p(G=1|x,y) (paper §4, Bayes' rule).
    With log p(G=1|x,y) = r/beta this is the optimum of KL-regularised reward
    maximisation, the PPO-optimal policy. log Z(x) is left out: self-normalisation cancels it."""
    return sft_logp + log_goodness(reward, beta)


# 2. Self-normalised importance weights (paper §4) -------------------------------------------------
#    For the n samples y_1..y_n ~ q'(.|x) of one prompt, in log space:
#      log alpha_i = log p~(y_i|x, G=1) - log q'(y_i|x)    alpha_hat = softmax_i(log alpha)
#      log b_i     = log q_theta(y_i|x) - log q'(y_i|x)    beta_hat  = softmax_i(log b)
#    Scores are (B, n) tensors: B prompts, n samples each; the softmax runs over the n samples.
#    (beta_hat is the paper's name for the policy's weights; it has nothing to do with beta.)
def log_alpha_hat(target_logp, proposal_logp):  # log alpha_hat: the targets, (B, n)
    return torch.log_softmax(target_logp - proposal_logp, dim=-1)


def log_beta_hat(policy_logp, proposal_logp):  # log beta_hat: the policy's weights, (B, n)
    return torch.log_softmax(policy_logp - proposal_logp, dim=-1)


def alpha_hat(target_logp, proposal_logp):
    return torch.softmax(target_logp - proposal_logp, dim=-1)  # = log_alpha_hat(...).exp()


def beta_hat(policy_logp, proposal_logp):
    return torch.softmax(policy_logp - proposal_logp, dim=-1)  # = log_beta_hat(...).exp()


# 3. The BRAIn loss and its self-normalised baseline (paper §4, Theorem 4.2; authors' code) --------
def brain_loss(policy_logp, proposal_logp, target_logp, check=True):
    """L = KL(alpha_hat || beta_hat(theta)), averaged over prompts; differentiable through
    policy_logp only. check=False skips the input checks (the training loop's own inputs).
    (authors' code) The ascent direction is sum_i (alpha_hat_i - beta_hat_i) grad log q_theta(y_i),
    where sum_i beta_hat_i grad log q_theta(y_i), the self-normalised baseline, estimates
    E_q[grad log q] = 0. (ours) Written as a loss: with alpha_hat held constant,
        -grad KL(alpha_hat || beta_hat) = sum_i alpha_hat_i grad log beta_hat_i
                                        = sum_i (alpha_hat_i - beta_hat_i) grad log q_theta(y_i).
    (paper, Theorem 4.2) This gradient is unbiased for the self-normalised KL
    E[KL(alpha_hat || beta_hat)], which is 0 if and only if q_theta is the posterior."""
    if check:
        check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    log_a = log_alpha_hat(target_logp.detach(), proposal_logp.detach())  # a constant
    log_b = log_beta_hat(policy_logp, proposal_logp.detach())
    kl_terms = log_a.exp() * (log_a - log_b)  # where alpha_hat_i = 0 exactly, the term is 0
    return torch.where(log_a == -math.inf, 0.0, kl_terms).sum(-1).mean()


# 4. Connections (paper §5). The same samples and the same alpha_hat; only the baseline differs:
#      DPG    weight alpha_hat_i                (no baseline; Khalifa et al. 2021)
#      GDC++  weight alpha_hat_i - b_i / n      (unnormalised baseline; Korbak et al. 2022)
#      BRAIn  weight alpha_hat_i - beta_hat_i   (self-normalised baseline)
#    DPG's and GDC++'s losses are -sum_i w_i log q_theta(y_i) with w held constant, so their
#    gradients are the estimators; the loss values are not comparable across methods.
def target_weights(proposal_logp, target_logp, log_z=None):
    """alpha_hat (Z estimated from the same samples), or, when log Z(x) is given (known, or a
    running estimate), the plain importance weights exp(log p~ - log Z - log q') / n."""
    if log_z is None:
        return alpha_hat(target_logp, proposal_logp)
    log_z = torch.as_tensor(log_z, dtype=target_logp.dtype, device=target_logp.device)
    if log_z.dim() > 1 or (log_z.dim() == 1 and log_z.shape[0] != target_logp.shape[0]):
        raise ValueError(f"log_z must be a scalar or have shape (B,), got {tuple(log_z.shape)}")
    if not torch.isfinite(log_z).all():
        raise ValueError("log_z contains NaN or inf")
    log_z = log_z[:, None] if log_z.dim() == 1 else log_z
    return torch.exp(target_logp - log_z - proposal_logp) / target_logp.shape[-1]


def dpg_loss(policy_logp, proposal_logp, target_logp, log_z=None, check=True):
    """DPG, "BRAIn without baseline": ascent direction sum_i w_i grad log q_theta(y_i), with
    w = alpha_hat, or the plain importance weights when log_z is given. (Khalifa et al., ICLR
    2021, §2.3; authors' code)"""
    if check:
        check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    w = target_weights(proposal_logp.detach(), target_logp.detach(), log_z)
    return -(w * policy_logp).sum(-1).mean()


def gdcpp_loss(policy_logp, proposal_logp, target_logp, log_z=None, check=True):
    """GDC++: ascent direction sum_i (w_i - b_i / n) grad log q_theta(y_i), b_i = q_theta(y_i) /
    q'(y_i) unnormalised (Korbak et al., NeurIPS 2022, Alg. 1; authors' code). On-policy b_i = 1
    and beta_hat_i = 1/n, so it equals BRAIn; off-policy it does not."""
    if check:
        check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    proposal_logp, target_logp = proposal_logp.detach(), target_logp.detach()
    w = target_weights(proposal_logp, target_logp, log_z)
    b = torch.exp(policy_logp.detach() - proposal_logp)
    return -((w - b / policy_logp.shape[-1]) * policy_logp).sum(-1).mean()


def dpo_loss(policy_logp, ref_logp, reward, beta=1.0, labels="argmax", coin=None, check=True):
    """DPO (Rafailov et al. 2023), one pair (y_w, y_l) per prompt:
        L = -log sigmoid(beta * [(log q(y_w) - log ref(y_w)) - (log q(y_l) - log ref(y_l))]).

    labels="argmax": the best and the worst of the n samples by reward. (paper §5) With n = 2
        and proposal = ref = SFT, this is BRAIn at beta = 1 with a one-hot on the winner in place
        of alpha_hat: an argmax for the softmax. Its target is no longer the posterior, and with a
        deterministic reward it over-optimises. Ties pair a sample with itself: zero gradient.
    labels="bt" (ours): the first two samples, labelled by a Bradley-Terry coin flip with
        P(y_1 wins) = sigmoid(r_1 - r_2); DPO's optimum is then the posterior ref * exp(r / beta).
        `coin`: (B,) uniforms, y_1 wins when coin < P (default: the global generator)."""
    if check:
        check_scores(policy_logp=policy_logp, ref_logp=ref_logp, reward=reward)
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"DPO beta must be a finite number > 0, got {beta}")
        if labels not in ("argmax", "bt"):
            raise ValueError(f"labels must be 'argmax' or 'bt', got {labels!r}")
    reward = reward.detach()
    if labels == "argmax":
        win, lose = reward.argmax(-1, keepdim=True), reward.argmin(-1, keepdim=True)
    else:
        if coin is None:
            coin = torch.rand(reward.shape[0], device=reward.device)
        first_wins = coin.view(-1, 1) < torch.sigmoid(reward[:, :1] - reward[:, 1:2])
        win, lose = torch.where(first_wins, 0, 1), torch.where(first_wins, 1, 0)
    h = policy_logp - ref_logp.detach()  # the policy's implicit reward / beta
    return -F.logsigmoid(beta * (h.gather(-1, win) - h.gather(-1, lose))).mean()


def method_loss(
    method,
    policy_logp,
    proposal_logp,
    sft_logp,
    reward,
    beta,
    labels="argmax",
    coin=None,
    check=True,
):
    """The loss of one method on (B, n) scores. DPO-sft's reference is the SFT model and its beta
    the posterior's, so that "bt" targets the same posterior (the paper's n = 2 case: beta = 1)."""
    if method == "dpo":
        return dpo_loss(policy_logp, sft_logp, reward, beta, labels, coin, check)
    if check:
        check_scores(
            policy_logp=policy_logp, proposal_logp=proposal_logp, sft_logp=sft_logp, reward=reward
        )
    target_logp = log_posterior(sft_logp, reward, beta)
    if method == "brain":
        return brain_loss(policy_logp, proposal_logp, target_logp, check=False)
    if method == "dpg":
        return dpg_loss(policy_logp, proposal_logp, target_logp, check=False)
    if method == "gdcpp":
        return gdcpp_loss(policy_logp, proposal_logp, target_logp, check=False)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


# 5. Language-model plumbing: sequence log-probs and exact sampling --------------------------------
#    Sequences are [prompt | completion]; prompts are left-padded, completions right-padded.
def positions(attention_mask):  # position ids that skip left padding
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def eos_tensor(eos_token_id, device):  # one EOS id, or a list of them (Llama-3 has two)
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    return torch.tensor(ids, device=device)


def sequence_logprobs(model, input_ids, attention_mask, completion_mask, eos_token_id=None):
    """log q(y|x) = sum_t log q(y_t | x, y_<t) over the completion's tokens, in fp32 (as the DPO
    reference code), masking prompt, padding and all after the first EOS, which counts (ours).
    input_ids, attention_mask, completion_mask: (N, L); completion_mask is 1 on completion
    tokens. eos_token_id (an id or a list) defaults to model.config's. Returns (N,)."""
    if completion_mask[:, 0].any():
        raise ValueError("completion_mask[:, 0] must be 0: the first token has no prediction")
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)
    ).logits
    logits = logits[:, :-1].float()  # position t predicts token t+1
    targets = input_ids[:, 1:]
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    mask = completion_mask[:, 1:].bool()
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    if eos is not None:
        is_eos = torch.isin(targets, eos_tensor(eos, input_ids.device)) & mask
        mask = mask & ((is_eos.long().cumsum(-1) - is_eos.long()) == 0)  # none after the first EOS
    return torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(-1)


@torch.no_grad()
def sample_completions(
    model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id=None, uniforms=None
):
    """Draw one completion per row exactly from the model: temperature 1, no top-k or top-p (ours:
    any truncation would make the importance weights wrong). Batched, with the KV cache.
    prompt_ids, prompt_mask: (N, P), left-padded. Returns the completions (N, T), their mask
    (1 up to and including the first EOS) and log q(y|x) of each draw (N,), in fp32, so that
    the proposal needs no second forward pass. Token t of row i inverts the CDF at uniforms[i, t]
    (N, T) when given (a batch split across processes then draws what the whole batch would),
    else at numbers from the global generator."""
    n, device = prompt_ids.shape[0], prompt_ids.device
    eos = eos_tensor(eos_token_id, device)
    pad = int(eos[0]) if pad_token_id is None else pad_token_id
    if uniforms is None:
        uniforms = torch.rand(n, max_new_tokens, device=device)
    attn = prompt_mask.long()
    pos = positions(attn)
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    next_pos = pos[:, -1:] + 1
    alive = torch.ones(n, dtype=torch.bool, device=device)
    logp_sum = torch.zeros(n, device=device)
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    masks = torch.zeros(n, max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        cdf = logp.double().exp().cumsum(-1)  # float64: exact enough for 100k+ vocabularies
        u = uniforms[:, t : t + 1].double() * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
        tok = torch.where(alive, tok, torch.full_like(tok, pad))
        token_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        logp_sum += torch.where(alive, token_logp, torch.zeros_like(logp_sum))
        tokens[:, t], masks[:, t] = tok, alive.long()
        alive = alive & ~torch.isin(tok, eos)
        if t + 1 == max_new_tokens or (t % 8 == 7 and not alive.any()):  # a sync every 8 tokens
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
        step_inputs = dict(attention_mask=attn, position_ids=next_pos, cache=out.cache)
        out = model(input_ids=tok[:, None], **step_inputs, use_cache=True)
        next_pos = next_pos + 1
    return tokens, masks, logp_sum


def join(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """[prompt | completion] as input_ids, attention_mask, completion_mask (sequence_logprobs)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)
    full_mask = torch.cat([torch.zeros_like(prompt_mask.long()), completion_mask.long()], dim=1)
    return input_ids, attention_mask, full_mask


# 6. Training (ours: choices that the paper leaves open) ------------------------------------------
#    Per step: B prompts -> n samples each, drawn exactly from the proposal q' (the SFT model, the
#    policy, or a copy of it refreshed every K steps) -> proposal, SFT and reward scores, without
#    gradients -> one Adam step on the method's loss.
def seed_everything(seed):  # the one place where the global generators are seeded
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):  # "auto": CUDA when there is a GPU
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def autocast(device):  # bf16 on CUDA, fp32 on the CPU; log-probs are always taken in fp32
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def frozen(model):  # a copy without gradients, in eval mode (no dropout)
    return copy.deepcopy(model).eval().requires_grad_(False)


def progress(iterable, desc, **kwargs):  # a bar on a terminal only (none in a log file)
    off = True if os.environ.get("TQDM_DISABLE", "") not in ("", "0") else None
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=off, **kwargs)


def sample_stream(seed, device):
    """Training's prompts and samples, from the run's seed alone: the same for every method."""
    return torch.Generator(device=device).manual_seed(seed)


def score_batch(cfg, proposal, sft, task, generator, device, shard=ALL):
    """Draw B prompts, sample n completions of each from the proposal and score them, without
    gradients. Returns the joined sequences and (B*n,) proposal log-probs, SFT log-probs and
    rewards. `shard`: the rows of the global batch this process keeps (Part II, torchrun)."""
    B, n, T = cfg.prompts_per_step, cfg.n_samples, task.max_new_tokens
    with torch.no_grad(), autocast(device):
        prompt_idx = torch.randint(len(task.prompt_ids), (B,), device=device, generator=generator)
        uniforms = torch.rand(B, n, T, device=device, generator=generator)
        prompt_idx, uniforms = prompt_idx[shard], uniforms[shard].reshape(-1, T)
        x = task.prompt_ids[prompt_idx].repeat_interleave(n, 0)
        xm = task.prompt_mask[prompt_idx].repeat_interleave(n, 0)
        y, ym, proposal_logp = sample_completions(
            proposal, x, xm, T, task.eos_id, task.pad_id, uniforms=uniforms
        )
        seqs = join(x, xm, y, ym)
        if device.type == "cuda":  # under bf16 a cached pass and a full one differ a little: score
            # the proposal as the policy is scored, so that q_theta = q' gives b_i = 1 exactly
            proposal_logp = sequence_logprobs(proposal, *seqs, task.eos_id)
        sft_logp = proposal_logp if proposal is sft else sequence_logprobs(sft, *seqs, task.eos_id)
        reward = task.reward(x, xm, y, ym).float()
    if not torch.isfinite(reward).all():
        raise ValueError("the reward function returned NaN or inf")
    return seqs, proposal_logp, sft_logp, reward


def policy_backward(policy, eos_id, device, seqs, loss_of):
    """loss_of(log q_theta(y|x)).backward() in one pass; returns the loss and the log-probs.
    (Part II passes its own: micro-batches, several processes.)"""
    with autocast(device):
        policy_logp = sequence_logprobs(policy, *seqs, eos_id)
        loss = loss_of(policy_logp)
    loss.backward()
    return loss.detach(), policy_logp.detach()


def batch_loss(cfg, proposal_logp, sft_logp, reward, coin, policy_logp):
    """The method's loss on one batch of scores, each (B*n,), as a function of the policy's."""
    shape = (-1, cfg.n_samples)  # (prompts, n)
    scores = (t.view(shape) for t in (policy_logp, proposal_logp, sft_logp, reward))
    return method_loss(cfg.method, *scores, cfg.beta, cfg.dpo_labels, coin=coin, check=False)


def train(cfg, sft, task, device, on_step=None, policy=None, state=None, backward=None, shard=ALL):
    """Train `policy` (default: a copy of `sft`; in eval mode, so that q_theta is what the sampler
    draws from) with cfg.method on `task`: prompt_ids, prompt_mask (left-padded), max_new_tokens,
    eos_id, pad_id, reward(x, x_mask, y, y_mask) -> (N,). on_step(step, policy, proposal, info)
    runs before the first step and after each; Part II passes `state`, `backward` and `shard`."""
    policy = (copy.deepcopy(sft) if policy is None else policy).eval().requires_grad_(True)
    K = cfg.refresh_every
    proposal = sft if K == 0 else policy if K == 1 else frozen(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)  # (ours) Adam, a constant lr
    stream = sample_stream(cfg.seed, device)
    start = 0 if state is None else restore(state, opt, stream, proposal)  # (Part II)
    backward = backward or functools.partial(policy_backward, policy, task.eos_id, device)
    info = {"optimizer": opt, "stream": stream, "loss": None}
    if on_step:
        on_step(start, policy, proposal, info)
    bar = progress(range(start, cfg.steps), f"train {cfg.method}", initial=start, total=cfg.steps)
    for step in bar:
        if K > 1 and step % K == 0:  # (ours) refresh the proposal (K = 1: it is the policy)
            proposal.load_state_dict(policy.state_dict())
        # ALGO LOGIC: B prompts, n samples of each from q', scored without gradients (5, 6)
        batch = score_batch(cfg, proposal, sft, task, stream, device, shard)
        seqs, proposal_logp, sft_logp, reward = batch
        coin = torch.rand(cfg.prompts_per_step, device=device, generator=stream)[shard]  # DPO-bt
        loss_of = functools.partial(batch_loss, cfg, proposal_logp, sft_logp, reward, coin)
        opt.zero_grad(set_to_none=True)
        loss, policy_logp = backward(seqs, loss_of)
        check_finite(step, loss, policy_logp, sft_logp, reward, cfg.beta)  # Part II
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:  # .item() waits for the device: not each step
            bar.set_postfix(loss=f"{loss.item():.3f}", reward=f"{reward.mean().item():+.2f}")
        if on_step:
            info.update(loss=loss, reward=reward, policy_logp=policy_logp, batch=batch, bar=bar)
            on_step(step + 1, policy, proposal, info)
    bar.close()
    return policy


# 7. Evaluation: exact, by enumerating every completion of every prompt (the embedded world) -------
#    KL(posterior || policy): how well the policy amortises the posterior (0 is perfect);
#    KL(policy || SFT) and E_policy[r]: the two axes of the reward-KL frontier.
def enumerate_logprobs(model, world, device, grad=False):
    """log q(y|x) of every completion y of every prompt x, a (prompts, completions) table. The
    completions form a tree, and a causal LM reads a prefix the same way whatever follows: one
    forward pass over the longest prefixes (1,000 3-word rows per prompt) gives the next-token
    distribution at every node; a completion's log-prob sums its tokens' along its path.
    grad=True keeps the graph (the exact gradient of KL(posterior || policy), for instance)."""
    model = model.eval()
    prefixes = world.prefix_ids.to(device)
    rows, depth = world.path_rows.to(device), torch.arange(world.max_new_tokens, device=device)
    completion_mask = world.completion_mask.to(device).bool()
    table = []
    for p in range(len(world.prompt_ids)):
        x = world.prompt_ids[p : p + 1].to(device).expand(len(prefixes), -1)
        ids = torch.cat([x, prefixes], dim=1)
        attn = torch.ones_like(ids)  # the toy prompts have no padding
        with torch.set_grad_enabled(grad), autocast(device):
            logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits
        next_logp = torch.log_softmax(logits[:, x.shape[1] - 1 :].float(), dim=-1)  # (rows, d, V)
        token_logp = next_logp[rows, depth, world.completion_ids.to(device)]  # (completions, d)
        table.append(torch.where(completion_mask, token_logp, torch.zeros_like(token_logp)).sum(-1))
    return torch.stack(table).cpu()


def kl(log_p, log_q):
    """KL(p || q) per row, from two tables of normalised log-probs over the same completions."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def posterior_table(log_sft, reward, beta):
    """The exact posterior, normalised over all completions (Z computed: here only)."""
    return torch.log_softmax(log_posterior(log_sft, reward, beta), dim=-1)


def exact_metrics(log_q, log_sft, log_post, reward):
    """Exact metrics of a distribution (a table of log-probs), averaged over prompts."""
    return {
        "reward": (log_q.exp() * reward).sum(-1).mean().item(),
        "kl_policy_sft": kl(log_q, log_sft).mean().item(),
        "kl_posterior_policy": kl(log_post, log_q).mean().item(),
    }


# The embedded toy world (not part of the method; ours) --------------------------------------------
#    Prompts "the <thing> was", completions of up to 4 words from a 10-word vocabulary, or EOS
#    ("."): 1 + 10 + 100 + 1000 + 10000 = 11,111 completions per prompt, few enough to enumerate.
#    A tiny GPT-2 (from a config, no download) learns a corpus of little reviews as the SFT prior;
#    the reward is a sentiment lexicon that understands "not" and "very".
EOS = "."
COMPLETION_WORDS = ["good", "great", "fun", "bad", "awful", "boring", "not", "very", "and", "but"]
# subject -> the share of positive reviews in the corpus
SUBJECTS = dict(
    plot=0.5, acting=0.7, music=0.8, ending=0.3, food=0.6, service=0.2, cast=0.75, story=0.4
)
VOCAB = [EOS] + COMPLETION_WORDS + ["the", "was"] + list(SUBJECTS)  # completion tokens first
LEXICON = {"great": 2.0, "good": 1.0, "fun": 1.0, "bad": -1.0, "boring": -1.0, "awful": -2.0}
MAX_NEW_TOKENS = 4  # completion length limit, EOS included


def review_reward(words):
    """The mean lexicon value of the adjectives (0 with none); "very" doubles the next, "not" flips
    and halves it: "not bad" = +0.5, "not very good" = -1, "very great" = +4 (the maximum)."""
    values, very, negated = [], False, False
    for w in words:
        if w == "not":
            negated = True
        elif w == "very":
            very = True
        elif w in LEXICON:
            values.append(LEXICON[w] * (2.0 if very else 1.0) * (-0.5 if negated else 1.0))
            very = negated = False
        else:  # "and", "but": a modifier does not reach across a conjunction
            very = negated = False
    return sum(values) / len(values) if values else 0.0


class ToyLM(torch.nn.Module):
    """A tiny GPT-2 whose next token is a completion token: every completion is enumerable."""

    def __init__(self, vocab_size, num_completion_tokens, eos_id):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        no_dropout = dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.0)
        special = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), eos_id)
        size = dict(vocab_size=vocab_size, n_positions=16, n_embd=64, n_layer=2, n_head=4)
        self.config = GPT2Config(**size, **no_dropout, **special)
        self.gpt = GPT2LMHeadModel(self.config)
        blocked = torch.ones(vocab_size, dtype=torch.bool)
        blocked[:num_completion_tokens] = False
        self.register_buffer("blocked", blocked, persistent=False)

    def forward(self, **kwargs):
        out = self.gpt(**kwargs)
        out.logits = out.logits.masked_fill(self.blocked, float("-inf"))
        return out


class ToyWorld:
    """The prompts, the reward and the enumerated completions (the SFT corpus: Part II)."""

    def __init__(self, device):
        self.vocab, self.index = VOCAB, {w: i for i, w in enumerate(VOCAB)}
        self.eos_id = self.pad_id = self.index[EOS]
        self.max_new_tokens = MAX_NEW_TOKENS
        self.subjects = list(SUBJECTS)
        self.prompts = [f"the {s} was" for s in self.subjects]
        self.prompt_ids = torch.tensor([self.encode(p) for p in self.prompts], device=device)
        self.prompt_mask = torch.ones_like(self.prompt_ids)
        # every completion: m words then EOS (m = 0..3), or 4 words; padded with EOS
        k = len(COMPLETION_WORDS) + 1  # 11 completion tokens: EOS is id 0, the words 1..10
        comps = [[]]
        for length in range(1, MAX_NEW_TOKENS + 1):
            comps += [list(c) for c in itertools.product(range(1, k), repeat=length)]
        seqs = [c + [self.eos_id] if len(c) < MAX_NEW_TOKENS else c for c in comps]
        pad = [MAX_NEW_TOKENS - len(s) for s in seqs]
        self.completion_ids = torch.tensor(
            [s + [self.eos_id] * p for s, p in zip(seqs, pad, strict=True)]
        )
        self.completion_mask = torch.tensor(
            [[1] * len(s) + [0] * p for s, p in zip(seqs, pad, strict=True)]
        )
        # For exact evaluation: every 3-word prefix (row r = the 3 digits of r, word id = digit
        # + 1) and, for each completion and depth d, the row of a prefix that starts with the
        # completion's first d words. E.g. "good fun ." = ids [1, 3, 0, 0] -> digits [0, 2, 0]
        # -> rows [0, 0, 20, 20] for d = 0..3: row 20 is "good fun good", which starts with
        # "good fun", so its third next-token distribution is p(. | good fun).
        self.prefix_ids = torch.tensor(
            list(itertools.product(range(1, k), repeat=MAX_NEW_TOKENS - 1))
        )
        digits = (self.completion_ids - 1).clamp(min=0)[:, : MAX_NEW_TOKENS - 1]
        place = (k - 1) ** torch.arange(MAX_NEW_TOKENS - 2, -1, -1)
        self.path_rows = torch.stack(
            [(digits[:, :d] * place[:d]).sum(-1) for d in range(MAX_NEW_TOKENS)], dim=1
        )
        rewards = torch.tensor([review_reward([VOCAB[t] for t in c]) for c in comps])
        self.reward_table = rewards.expand(len(self.prompts), -1).contiguous()  # (prompts, comps)
        # the reward of sampled completions: a dense table indexed by the base-k code of the ids
        self._code = k ** torch.arange(MAX_NEW_TOKENS - 1, -1, -1, device=device)
        lookup = torch.zeros(k**MAX_NEW_TOKENS)
        lookup[self._encode(self.completion_ids, self.completion_mask)] = rewards
        self._lookup = lookup.to(device)

    def encode(self, text):
        return [self.index[w] for w in text.split()]

    def decode(self, ids, mask):
        return " ".join(
            self.vocab[t] for t, m in zip(ids.tolist(), mask.tolist(), strict=True) if m
        )

    def _encode(self, ids, mask):
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # canonical: EOS after the end
        return (ids * self._code.to(ids.device)).sum(-1)

    def reward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """r(x, y) of sampled completions (the same for every prompt: the review's sentiment)."""
        return self._lookup[self._encode(completion_ids, completion_mask)]

    def new_model(self):
        return ToyLM(len(self.vocab), len(COMPLETION_WORDS) + 1, self.eos_id)


# The default run: python brain.py -----------------------------------------------------------------
def run(cfg, show=True):
    """Pretrain the SFT prior, train the policy, evaluate every distribution exactly."""
    cfg.validate()
    t0 = time.time()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    world = ToyWorld(device)
    sft = pretrain_sft(world, cfg, device)  # the toy corpus and its pretraining: Part II
    log_sft = enumerate_logprobs(sft, world, device)
    log_post = posterior_table(log_sft, world.reward_table, cfg.beta)
    policy = train(cfg, sft, world, device)
    log_policy = enumerate_logprobs(policy, world, device)
    results = {
        "sft": exact_metrics(log_sft, log_sft, log_post, world.reward_table),
        "policy": exact_metrics(log_policy, log_sft, log_post, world.reward_table),
        "posterior": exact_metrics(log_post, log_sft, log_post, world.reward_table),
        "config": asdict(cfg),
        "device": str(device),
        "wall_s": round(time.time() - t0, 2),
    }
    if show:
        print_run(results, cfg, world, sft, policy, device)  # (Part II)
    return results


# Part II: tools around the method — you can stop reading here
#    --compare, real models (--model, checkpoints, resume, torchrun), --bench, the command line
# ================================================================================================


# ------------------------------------------------------------------------------------------------
# Checks (Part I calls them): the losses' inputs from outside, and a non-finite training loss
# ------------------------------------------------------------------------------------------------
def check_scores(**named):
    """The losses' inputs, checked when called from outside (the training loop makes its own):
    tensors of one shape (B, n), B prompts with n >= 2 samples each, all finite."""
    for name, x in named.items():
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[-1] < 2:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(
                f"{name} must have shape (B, n): B prompts, n >= 2 samples each; got {shape}"
            )
    if len({tuple(x.shape) for x in named.values()}) != 1:
        raise ValueError(f"shapes differ: { {k: tuple(x.shape) for k, x in named.items()} }")
    bad = [name for name, x in named.items() if not torch.isfinite(x.detach()).all()]
    if bad:
        raise ValueError(f"{', '.join(bad)} contains NaN or inf")


def check_finite(step, loss, policy_logp, sft_logp, reward, beta):
    """Stop at the first non-finite loss, before the step corrupts the weights, saying what went
    non-finite and which flag is the likely cause. (ours)"""
    if not torch.isfinite(loss):
        target_logp = log_posterior(sft_logp, reward, beta)  # only to say what went wrong
        what = (
            "the policy's log-probs (its weights diverged: try a smaller --lr)"
            if not torch.isfinite(policy_logp).all()
            else "the posterior's log-weights log p_sft + r/beta (try a larger --beta)"
            if not torch.isfinite(target_logp).all()
            else "the loss"
        )
        raise ValueError(f"step {step + 1}: {what} went NaN or inf")


# ------------------------------------------------------------------------------------------------
# The embedded world's SFT prior: a corpus of little reviews, and maximum likelihood on it (ours)
# ------------------------------------------------------------------------------------------------
POSITIVE, NEGATIVE = ["good", "great", "fun"], ["bad", "boring", "awful"]


def corpus_review(rng, positive_share):
    """One review of the toy grammar: a phrase, sometimes "and"/"but" and a second phrase."""

    def phrase(positive):
        r = rng.random()
        if r < 0.15:  # a negated opposite: "not bad" is positive
            return ["not", rng.choice(NEGATIVE if positive else POSITIVE)]
        adjective = rng.choices(POSITIVE if positive else NEGATIVE, weights=[5, 3, 2])[0]
        return ["very", adjective] if r < 0.35 else [adjective]

    positive = rng.random() < positive_share
    words = phrase(positive)
    if rng.random() < 0.35:
        conj = rng.choice(["and", "but"])
        second = phrase(positive if conj == "and" else not positive)
        if len(words) + 1 + len(second) <= MAX_NEW_TOKENS:
            words = words + [conj] + second
    return words + [EOS] if len(words) < MAX_NEW_TOKENS else words


def toy_corpus(world, size, rng):
    """`size` (prompt, review) pairs as (input_ids, attention_mask, completion_mask)."""
    ids, mask = [], []
    for _ in range(size):
        subject = rng.choice(world.subjects)
        words = corpus_review(rng, SUBJECTS[subject])
        pad = MAX_NEW_TOKENS - len(words)
        review = [world.index[w] for w in words] + [world.eos_id] * pad
        ids.append(world.encode(f"the {subject} was") + review)
        mask.append([0, 0, 0] + [1] * len(words) + [0] * pad)
    ids, cmask = torch.tensor(ids), torch.tensor(mask)
    attn = torch.ones_like(ids)
    attn[:, 3:] = cmask[:, 3:]
    return ids, attn, cmask


def pretrain_sft(world, cfg, device):
    """The SFT prior: maximum likelihood on the corpus (a fresh batch of reviews every step)."""
    rng = random.Random(cfg.seed)
    model = world.new_model().to(device)
    corpus = toy_corpus(world, cfg.sft_steps * cfg.sft_batch // 4, rng)
    ids, attn, cmask = (t.to(device) for t in corpus)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in progress(range(cfg.sft_steps), "pretrain SFT prior"):
        batch = torch.randint(len(ids), (cfg.sft_batch,), device=device)
        with autocast(device):
            logp = sequence_logprobs(model, ids[batch], attn[batch], cmask[batch], world.eos_id)
        nll = -logp.mean()
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
    return frozen(model)


def print_run(results, cfg, world, sft, policy, device):
    """The default run's table and a few samples of the SFT model and of the policy."""
    print(
        f"\nExact metrics on the embedded world (beta = {cfg.beta}, {cfg.steps} steps, "
        f"B = {cfg.prompts_per_step}, n = {cfg.n_samples}, {results['wall_s']:.1f} s on {device})"
    )
    print(f"{'':22s}{'E[r]':>8s}{'KL(. || SFT)':>15s}{'KL(posterior || .)':>21s}")
    for key, label in (
        ("sft", "SFT prior"),
        ("policy", f"policy ({cfg.method})"),
        ("posterior", "posterior (target)"),
    ):
        m = results[key]
        print(
            f"{label:22s}{m['reward']:+8.3f}{m['kl_policy_sft']:15.3f}"
            f"{m['kl_posterior_policy']:21.3f}"
        )
    show_samples(world, sft, device, "\nSFT samples:")
    show_samples(world, policy, device, f"Policy samples ({cfg.method}):")


def show_samples(world, model, device, title, per_prompt=2, prompts=(0, 5)):
    print(title)
    with torch.no_grad(), autocast(device):
        for p in prompts:
            x = world.prompt_ids[p : p + 1].expand(per_prompt, -1)
            xm = world.prompt_mask[p : p + 1].expand(per_prompt, -1)
            y, ym, _ = sample_completions(model, x, xm, world.max_new_tokens, world.eos_id)
            r = world.reward(x, xm, y, ym)
            for i in range(per_prompt):
                text = world.decode(y[i], ym[i])
                print(f"  {world.prompts[p]} | {text:<24s} r = {r[i].item():+.1f}")


# ------------------------------------------------------------------------------------------------
# Comparing the estimators on equal footing (python brain.py --compare; our protocol)
#    Every method trains from the same SFT prior on the same sample stream: same seed, prompts,
#    proposal schedule, steps, optimizer, learning rate and beta. At fixed steps the policy is
#    frozen, K fresh batches are drawn from the current proposal, and EVERY estimator's gradient
#    is computed on those same batches at that same policy: the trace of the covariance of the
#    K gradients is the estimator's variance, the norm of their mean its signal.
# ------------------------------------------------------------------------------------------------
VARIANTS = {  # name -> (method, DPO labels); DPO runs with DPO's beta = the posterior's beta
    "brain": ("brain", "argmax"),
    "gdcpp": ("gdcpp", "argmax"),
    "dpg": ("dpg", "argmax"),
    "dpo-argmax": ("dpo", "argmax"),
    "dpo-bt": ("dpo", "bt"),
}


def estimator_gradients(cfg, policy, proposal, sft, task, variants, batches, generator, device):
    """{variant: (batches, num_params)}: each estimator's gradient on the same fresh batches."""
    params = [p for p in policy.parameters() if p.requires_grad]
    shape = (cfg.prompts_per_step, cfg.n_samples)
    grads = {v: [] for v in variants}
    for _ in range(batches):
        seqs, proposal_logp, sft_logp, reward = score_batch(
            cfg, proposal, sft, task, generator, device
        )
        coin = torch.rand(cfg.prompts_per_step, device=device, generator=generator)
        with autocast(device):
            policy_logp = sequence_logprobs(policy, *seqs, task.eos_id).view(shape)
        scores = [t.view(shape) for t in (proposal_logp, sft_logp, reward)]
        for v in variants:
            method, labels = VARIANTS[v]
            loss = method_loss(method, policy_logp, *scores, cfg.beta, labels, coin=coin)
            g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flat = [
                (torch.zeros_like(p) if x is None else x).reshape(-1)
                for x, p in zip(g, params, strict=True)
            ]
            grads[v].append(torch.cat(flat))
    return {v: torch.stack(g).float() for v, g in grads.items()}


def variance_stats(grads):
    """Trace of the covariance of K gradient draws (unbiased), and the norm of their mean."""
    mean = grads.mean(0)
    return {
        "trace_cov": ((grads - mean) ** 2).sum().item() / (len(grads) - 1),
        "mean_norm": mean.norm().item(),
    }


def brain_gdcpp_gap(cfg, policy, sft, task, generator, device):
    """||g_BRAIn - g_GDC++|| / ||g_BRAIn|| on one batch, on-policy (proposal = a copy of the
    policy) and off-policy (proposal = SFT). On-policy b_i = 1 and beta_hat_i = 1/n: the two
    estimators coincide (up to float rounding); off-policy they do not."""
    gap = {}
    for name, proposal in (("on_policy", frozen(policy)), ("off_policy_sft", sft)):
        g = estimator_gradients(
            cfg, policy, proposal, sft, task, ("brain", "gdcpp"), 1, generator, device
        )
        gap[name] = ((g["brain"] - g["gdcpp"]).norm() / g["brain"].norm().clamp(min=1e-30)).item()
    return gap


def reward_kl_frontier(log_sft, reward, betas):
    """The exact reward-KL frontier: for each beta, the posterior's (E[r], KL(posterior || SFT)).
    No policy can reach more reward at the same KL to the SFT model."""
    points = []
    for beta in betas:
        log_post = posterior_table(log_sft, reward, beta)
        m = exact_metrics(log_post, log_sft, log_post, reward)
        points.append({"beta": beta, "reward": m["reward"], "kl_policy_sft": m["kl_policy_sft"]})
    return points


def compare(
    cfg,
    seeds=3,
    variants=tuple(VARIANTS),
    curve_every=20,
    variance_every=50,
    variance_batches=16,
    show=True,
):
    """Train every variant on identical sample streams for `seeds` seeds; exact metrics along the
    way (every curve_every steps) and estimator variances (every variance_every steps)."""
    cfg.validate()
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}"
        )
    if seeds < 1 or variance_batches < 2:
        raise ValueError("compare needs seeds >= 1 and variance_batches >= 2")
    device = pick_device(cfg.device)
    runs = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        seed_everything(seed)
        world = ToyWorld(device)
        sft = pretrain_sft(world, replace(cfg, seed=seed), device)
        log_sft = enumerate_logprobs(sft, world, device)
        log_post = posterior_table(log_sft, world.reward_table, cfg.beta)
        for name, log_q in (("sft", log_sft), ("posterior", log_post)):
            final = exact_metrics(log_q, log_sft, log_post, world.reward_table)
            runs.append({"method": name, "seed": seed, "final": final})
        for v in variants:
            method, labels = VARIANTS[v]
            run_cfg = replace(cfg, method=method, dpo_labels=labels, seed=seed)
            record = {"method": v, "seed": seed, "curve": [], "variance": []}
            probe = torch.Generator(device=device).manual_seed(1_000_003 + seed)  # apart
            hook_s = 0.0

            def on_step(step, policy, proposal, info):
                nonlocal hook_s
                t, last = time.time(), step == cfg.steps
                curve, var = step % curve_every == 0 or last, step % variance_every == 0 or last
                if curve or var:
                    log_q = enumerate_logprobs(policy, world, device)
                    m = exact_metrics(log_q, log_sft, log_post, world.reward_table)
                    if curve:
                        record["curve"].append({"step": step, **m})
                    if var:
                        g = estimator_gradients(
                            run_cfg,
                            policy,
                            proposal,
                            sft,
                            world,
                            variants,
                            variance_batches,
                            probe,
                            device,
                        )
                        gap = brain_gdcpp_gap(run_cfg, policy, sft, world, probe, device)
                        record["variance"].append(
                            {
                                "step": step,
                                "kl_policy_sft": m["kl_policy_sft"],
                                "estimators": {u: variance_stats(gu) for u, gu in g.items()},
                                "brain_vs_gdcpp": gap,
                            }
                        )
                hook_s += time.time() - t

            t0 = time.time()
            train(run_cfg, sft, world, device, on_step)
            record["wall_s"] = time.time() - t0 - hook_s  # training alone, without measurements
            keys = ("reward", "kl_policy_sft", "kl_posterior_policy")
            record["final"] = {k: record["curve"][-1][k] for k in keys}
            record["grad_var"] = record["variance"][-1]["estimators"][v]["trace_cov"]
            runs.append(record)
    result = {
        "config": asdict(cfg),
        "seeds": seeds,
        "variants": list(variants),
        "device": str(device),
        "variance_batches": variance_batches,
        "runs": runs,
    }
    if show:
        print_comparison(result)
    return result


def mean_std(xs):
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    xs = np.asarray(xs, dtype=np.float64)
    return xs.mean(), (xs.std(ddof=1) if len(xs) > 1 else 0.0)


def print_comparison(result):
    cfg, runs, variants = result["config"], result["runs"], result["variants"]
    K = cfg["refresh_every"]
    schedule = "SFT (fixed)" if K == 0 else f"policy, refreshed every {K} steps"
    print(
        f"\nEqual footing: {cfg['steps']} steps, B = {cfg['prompts_per_step']}, "
        f"n = {cfg['n_samples']}, lr = {cfg['lr']}, beta = {cfg['beta']}, proposal = "
        f"{schedule}; mean +- std over {result['seeds']} seed(s)"
    )
    print(
        f"{'method':14s}{'KL(post || .)':>17s}{'KL(. || SFT)':>17s}{'E[r]':>17s}"
        f"{'grad var':>19s}{'train s':>9s}"
    )
    for name in ["sft", *variants, "posterior"]:
        rs = [r for r in runs if r["method"] == name]
        cells = [
            " {:7.3f} +- {:5.3f}".format(*mean_std([r["final"][k] for r in rs]))
            for k in ("kl_posterior_policy", "kl_policy_sft", "reward")
        ]
        var = (
            " {:9.3g} +- {:7.2g}".format(*mean_std([r["grad_var"] for r in rs]))
            if "grad_var" in rs[0]
            else " " * 19
        )
        wall = f"{mean_std([r['wall_s'] for r in rs])[0]:9.1f}" if "wall_s" in rs[0] else ""
        print(f"{name:14s}" + "".join(cells) + var + wall)
    print(
        "grad var: trace of the covariance of the method's own gradient over "
        f"{result['variance_batches']} fresh batches, at its final policy."
    )
    if "brain" in variants:
        rs = [r for r in runs if r["method"] == "brain"]
        print(
            "\nEstimator variance at the same frozen policies (brain's checkpoints, mean over "
            "seeds):"
        )
        print(
            f"{'step':>6s}{'KL(. || SFT)':>14s}"
            + "".join(f"{v:>12s}" for v in variants)
            + f"{'BRAIn/GDC++ gap: on-policy':>30s}{'off-policy':>12s}"
        )
        for i, point in enumerate(rs[0]["variance"]):
            at = [r["variance"][i] for r in rs]
            row = f"{point['step']:6d}{mean_std([a['kl_policy_sft'] for a in at])[0]:14.3f}"
            row += "".join(
                f"{mean_std([a['estimators'][v]['trace_cov'] for a in at])[0]:12.3g}"
                for v in variants
            )
            row += f"{max(a['brain_vs_gdcpp']['on_policy'] for a in at):30.1e}"
            row += f"{mean_std([a['brain_vs_gdcpp']['off_policy_sft'] for a in at])[0]:12.2f}"
            print(row)
    print("gap: ||g_BRAIn - g_GDC++|| / ||g_BRAIn|| on one batch (on-policy: largest over seeds).")
    print(
        "BRAIn, GDC++ and DPG estimate gradients of the same target; DPO's estimate another "
        "objective,\nso their variances are shown for scale, not as a like-for-like comparison."
    )


# ------------------------------------------------------------------------------------------------
# Real models (--model): any Hugging Face causal LM as the prior, a sequence-classification reward
#    model, prompts from a JSON-lines file, checkpoints, resume, several processes with torchrun.
#    The same train() and the same losses as Part I; only the task and the bookkeeping change.
# ------------------------------------------------------------------------------------------------
BUILTIN_PROMPTS = [
    "Summarize: The city council approved a new park on the east side after months of debate.",
    "Write a friendly reply to a customer whose order arrived late.",
    "Explain in one sentence why the sky is blue.",
    "Give one tip for a good night's sleep.",
    "Describe a rainy morning in two sentences.",
    "Summarize: The team shipped the release on time despite a last-minute bug.",
    "Suggest a name for a small coffee shop.",
    "Tell a short story about a lost cat finding its way home.",
]


def load_prompts(path):
    """Rows {"prompt", "reference" (or None), "line"} from a JSON-lines file, or the built-in
    examples; a prompt that appears twice is kept once (it would land in both splits)."""
    if path is None:
        return [
            {"prompt": p, "reference": None, "line": i + 1} for i, p in enumerate(BUILTIN_PROMPTS)
        ]
    if not os.path.isfile(path):
        raise ValueError(f"--prompts: no such file: {path}")
    rows, seen, dropped = [], set(), 0
    with open(path, "rb") as f:
        for k, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(
                    f"{path}: line {k}: not UTF-8 text (save the file as UTF-8)"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {k}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise ValueError(
                    f'{path}: line {k}: no "prompt" field (each line is '
                    '{"prompt": ..., "reference": ...})'
                )
            if not isinstance(obj["prompt"], str):
                raise ValueError(
                    f'{path}: line {k}: "prompt" must be a string, got '
                    f"{type(obj['prompt']).__name__}"
                )
            if not obj["prompt"].strip():
                raise ValueError(f"{path}: line {k}: empty prompt")
            ref = obj.get("reference")
            if ref is not None and not isinstance(ref, str):
                raise ValueError(f'{path}: line {k}: "reference" must be a string')
            if obj["prompt"] in seen:
                dropped += 1
                continue
            seen.add(obj["prompt"])
            rows.append({"prompt": obj["prompt"], "reference": ref, "line": k})
    if not rows:
        raise ValueError(f"{path}: no prompts in the file")
    if dropped:
        print(f"note: {path}: {dropped} duplicate prompt(s) dropped (each is kept once)")
    return rows


def first_line(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def model_source(name, flag):
    """A folder's normalised path, or a Hub name; one clear line when it is neither."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(
                f"{flag} {name!r} is a folder without config.json: not a saved Hugging Face model"
            )
        return os.path.abspath(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"{flag} {name!r}: no such folder, and not a Hub name (owner/model)")
    return name


def load_pretrained(model_class, name, what, flag, trust_remote_code=False):
    """A model and its tokenizer from a Hub name or a folder, in fp32, with one-line errors.
    Weights missing from the checkpoint are an error: transformers would fill them with random
    ones (a causal LM loaded as a classifier gets a random head), which must never pass silently."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError...: one line
        raise ValueError(
            f"cannot load {what} and its tokenizer from {name!r}: {first_line(e)}"
        ) from None
    archs = getattr(config, "architectures", None) or []
    classifier = [a.endswith("ForSequenceClassification") for a in archs]
    wants_classifier = model_class.__name__.endswith("ForSequenceClassification")
    if archs and not any(c == wants_classifier for c in classifier):
        raise ValueError(f"cannot load {what} from {name!r} ({flag}): it is a {archs[0]}")
    try:
        model, info = model_class.from_pretrained(
            name, trust_remote_code=trust_remote_code, dtype=torch.float32, output_loading_info=True
        )
    except Exception as e:
        raise ValueError(f"cannot load {what} from {name!r}: {first_line(e)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"cannot load {what} from {name!r}: the checkpoint lacks "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            "(they would be random)"
        )
    return model, tokenizer


def load_causal_lm(name, trust_remote_code=False, quiet=False):
    """The SFT prior (and the policy's start) and its tokenizer, from a Hub name or a folder."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_pretrained(
        AutoModelForCausalLM, name, "a causal LM", "--model", trust_remote_code
    )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name!r} has no EOS token: completions could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        if not quiet:
            print(
                f"note: the tokenizer of {name} has no pad token; using its EOS token "
                f"{tokenizer.eos_token!r} as pad"
            )
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def eos_ids_of(model, tokenizer):
    """Every id that ends a completion: the generation config's (Llama-3: two), the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
    return sorted(set(ids) | {tokenizer.eos_token_id})


def model_context(model):
    """The longest sequence the model takes, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class RewardModel:
    """r(x, y) = one logit of an AutoModelForSequenceClassification on the decoded text x + y,
    re-encoded with the reward model's own tokenizer. A text longer than the reward model takes
    (its tokenizer's model_max_length or its own position limit, whichever is smaller) loses
    its start: the prompt's beginning is cut, never the completion."""

    def __init__(self, name, label=None, trust_remote_code=False, device="cpu"):
        from transformers import AutoModelForSequenceClassification

        self.model, self.tokenizer = load_pretrained(
            AutoModelForSequenceClassification,
            name,
            "a reward model (sequence classification)",
            "--reward-model",
            trust_remote_code,
        )
        config = self.model.config
        labels = [config.id2label.get(i, str(i)) for i in range(config.num_labels)]
        if len(labels) == 1 and label is None:
            self.index = 0
        elif label is None:
            raise ValueError(
                f"the reward model {name!r} has {len(labels)} labels "
                f"({', '.join(labels)}); choose the one that means 'good' with "
                "--reward-label"
            )
        elif label in labels:
            self.index = labels.index(label)
        elif label.isdigit() and int(label) < len(labels):
            self.index = int(label)
        else:
            raise ValueError(
                f"--reward-label {label!r} is not a label of {name!r}: {', '.join(labels)}"
            )
        tok = self.tokenizer
        if tok.pad_token_id is None:
            if (tok.eos_token or tok.unk_token) is None:
                raise ValueError(
                    f"the tokenizer of the reward model {name!r} has no pad, EOS or "
                    "unknown token to pad with"
                )
            tok.pad_token = tok.eos_token or tok.unk_token
        tok.truncation_side = "left"  # too long: cut the prompt's start, never the completion
        limits = [n for n in (tok.model_max_length, model_context(self.model)) if n and n < 10**6]
        self.max_length = min(limits) if limits else None  # transformers' "no limit" is huge
        config.pad_token_id = tok.pad_token_id  # models that read the last non-pad token
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, texts):
        truncate = self.max_length is not None
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=truncate,
            max_length=self.max_length,
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with autocast(self.device):
            return self.model(**enc).logits[:, self.index].float()


class TextTask:
    """Prompts tokenized once (left-padded) and the reward model, in the form train() expects."""

    def __init__(self, rows, tokenizer, reward_model, max_new_tokens, eos_ids, device):
        self.tokenizer, self.rm, self.rows = tokenizer, reward_model, rows
        self.max_new_tokens, self.eos_id, self.pad_id = (
            max_new_tokens,
            eos_ids,
            tokenizer.pad_token_id,
        )
        enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        self.prompt_ids, self.prompt_mask = (
            enc["input_ids"].to(device),
            enc["attention_mask"].to(device),
        )

    def texts(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """[prompt | completion] decoded as one sequence per row (decoding the two apart would
        lose the space between them with SentencePiece tokenizers)."""
        ids = torch.cat(
            [
                torch.where(prompt_mask.bool(), prompt_ids, self.pad_id),
                torch.where(completion_mask.bool(), completion_ids, self.pad_id),
            ],
            dim=1,
        )
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def reward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        texts = self.texts(prompt_ids, prompt_mask, completion_ids, completion_mask)
        return self.rm.score(texts).to(prompt_ids.device)

    def reference_texts(self, rows):
        """prompt + reference, through the same tokenizer and decoding as the samples."""
        tok = self.tokenizer
        ids = [
            tok(r["prompt"])["input_ids"]
            + tok(r["reference"], add_special_tokens=False)["input_ids"]
            for r in rows
        ]
        return tok.batch_decode(ids, skip_special_tokens=True)


def check_prompt_lengths(rows, tokenizer, max_new_tokens, context, source):
    """Every prompt is some tokens, and fits the model's context with max_new_tokens more."""
    encoded = tokenizer([r["prompt"] for r in rows])["input_ids"]
    for row, ids in zip(rows, encoded, strict=True):
        if len(ids) == 0:
            raise ValueError(f"{source}: line {row['line']}: the prompt encodes to no tokens")
        if context and len(ids) + max_new_tokens > context:
            raise ValueError(
                f"{source}: line {row['line']}: the prompt is {len(ids)} tokens; with "
                f"--max-new-tokens {max_new_tokens} it exceeds the model's context of "
                f"{context} tokens"
            )


# Checkpoints: a run writes checkpoint-NNNNNN/ (safetensors, tokenizer, trainer state), `latest`
# and metrics.jsonl, and only ever deletes a checkpoint that it wrote itself.
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_NAME = re.compile(r"checkpoint-\d{6}$")
# what a resumed run must share with the run it continues (the rest may change: steps, device...)
RESUME_KEYS = (
    "method",
    "prompts_per_step",
    "n_samples",
    "beta",
    "lr",
    "refresh_every",
    "dpo_labels",
    "seed",
    "model",
    "reward_model",
    "reward_label",
    "prompts",
    "prompts_sha256",
    "max_new_tokens",
)


class Interrupted(Exception):
    """Ctrl-C: the run stopped after a whole step (checkpointed when there is an output folder)."""


@contextlib.contextmanager
def stop_after_step_on_ctrl_c():
    """The first Ctrl-C asks the run to stop once the step in progress is done (a step cut in
    the middle could not be resumed exactly); a second one stops at once."""
    asked = {"stop": False}

    def handler(signum, frame):
        asked["stop"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: stopping after this step (Ctrl-C again: at once)", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        yield asked
        return
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def save_checkpoint(out_dir, step, policy, proposal, sft, tokenizer, info, run_keys):
    """Write the policy to a temporary folder and rename it, so a crash never leaves a broken
    checkpoint; point `latest` at it; then drop the checkpoint that `latest` named before (ours).
    The trainer state (optimizer, sample stream, a refreshed proposal, the settings) makes
    --resume exact."""
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    previous = latest_checkpoint(out_dir)
    tmp = tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=out_dir)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    own_proposal = proposal is not sft and proposal is not policy  # a refreshed copy
    torch.save(
        {
            "step": step,
            "optimizer": info["optimizer"].state_dict(),
            "stream": info["stream"].get_state(),
            "proposal": proposal.state_dict() if own_proposal else None,
            "config": run_keys,
        },
        os.path.join(tmp, TRAINER_STATE),
    )
    if os.path.isdir(final):  # ours (checked before the run): the same step written again
        shutil.rmtree(final)
    os.replace(tmp, final)
    with open(os.path.join(out_dir, ".latest.tmp"), "w") as f:
        f.write(os.path.basename(final) + "\n")
    os.replace(os.path.join(out_dir, ".latest.tmp"), os.path.join(out_dir, "latest"))
    if previous and os.path.abspath(previous) != os.path.abspath(final):
        shutil.rmtree(previous)
    return final


def latest_checkpoint(out_dir):
    """The checkpoint folder that out_dir/latest names, or None."""
    path = os.path.join(out_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    folder = os.path.join(out_dir, name)  # a name in out_dir, never a path elsewhere
    if not (CHECKPOINT_NAME.match(name) and os.path.isfile(os.path.join(folder, TRAINER_STATE))):
        raise ValueError(f"{path} points to {folder}, which is not a complete checkpoint")
    return folder


def load_trainer_state(folder, run_keys, steps):
    path = os.path.join(folder, TRAINER_STATE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, step = state["config"], state["step"]
    except Exception as e:
        raise ValueError(
            f"{path} is damaged ({first_line(e)}); resume from another "
            "checkpoint or start again in a new --output-dir"
        ) from None
    changed = [f"{k} ({saved.get(k)!r} -> {v!r})" for k, v in run_keys.items() if saved.get(k) != v]
    if changed:
        raise ValueError(
            f"--resume with other settings than the checkpoint's: {', '.join(changed)}"
        )
    if steps <= step:
        raise ValueError(
            f"--steps {steps}: the checkpoint is already at step {step}; nothing to "
            "do (pass a larger --steps to train on)"
        )
    return state


def restore(state, opt, stream, proposal):
    """A checkpoint's optimizer, sample stream and refreshed proposal; returns its step."""
    opt.load_state_dict(state["optimizer"])
    try:
        stream.set_state(state["stream"])
    except RuntimeError:  # a generator's state is tied to the device type
        raise ValueError(
            "the checkpoint's sample stream is from another device type (CPU or "
            "CUDA): resume it with the --device it was trained on"
        ) from None
    if state["proposal"] is not None:
        proposal.load_state_dict(state["proposal"])
    return state["step"]


def check_writable(path, flag, folder=False):
    """`path` (a folder, or a file) can be written, found out before any model is loaded."""
    if os.path.exists(path) and not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise ValueError(f"{flag} {path}: exists and is not a {'folder' if folder else 'file'}")
    parent = path if folder else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from None


def prepare_output_dir(cfg, run_keys, writer=True):
    """What the output folder holds decides, before any model is loaded, how the run goes on:
    returns the checkpoint's trainer state to resume from, or None for a fresh start."""
    out = cfg.output_dir
    check_writable(out, "--output-dir", folder=True)
    metrics = os.path.join(out, "metrics.jsonl")
    resume_from = latest_checkpoint(out) if os.path.isdir(out) else None
    if resume_from and not cfg.resume:
        raise ValueError(
            f"{out} already holds a checkpoint; pass --resume to continue it, or "
            "choose another --output-dir"
        )
    if resume_from:
        return load_trainer_state(resume_from, run_keys, cfg.steps), resume_from
    ours = [n for n in (os.listdir(out) if os.path.isdir(out) else []) if CHECKPOINT_NAME.match(n)]
    if ours:
        raise ValueError(
            f"{out} holds {ours[0]} but no `latest` checkpoint of a run of this "
            "program; choose another --output-dir"
        )
    if cfg.resume and not os.path.exists(metrics) and writer:  # (rank 0 decides; it may rename)
        raise ValueError(f"--resume: no checkpoint in {out}")
    if os.path.exists(metrics) and writer:  # a run stopped before its first checkpoint: restart
        os.replace(metrics, metrics + ".interrupted")
        print(
            f"note: {out} holds no checkpoint yet, only the log of a run that stopped before "
            "its first; starting from step 0 (its log is kept as metrics.jsonl.interrupted)"
        )
    return None, None


def trim_metrics(path, step):
    """Keep the log lines up to the checkpoint's step; a torn last line (a crash while writing)
    is dropped with a note."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for k, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if k < len(lines):
                raise ValueError(f"{path}: line {k} is not JSON; fix or remove the file") from None
            print(f"note: {path}: dropped a torn last line (a crash while it was written)")
            continue
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(kept)


def prompts_hash(rows):
    """The prompts' content, so a resume notices a file that changed under the same path."""
    import hashlib

    return hashlib.sha256(json.dumps([r["prompt"] for r in rows]).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate_text(policy, sft, task, rows, cfg, device):
    """Held-out prompts, cfg.eval_samples completions each from the policy and from the SFT model:
    mean rewards, win rates judged by the reward model (ties count half), and a Monte Carlo
    estimate of KL(policy || SFT) = E_policy[log q(y|x) - log p(y|x)] with its standard error."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    enc = task.tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    k, T = cfg.eval_samples, task.max_new_tokens
    x = enc["input_ids"].to(device).repeat_interleave(k, 0)
    xm = enc["attention_mask"].to(device).repeat_interleave(k, 0)
    with autocast(device):
        u = torch.rand(len(x), T, device=device, generator=gen)
        y, ym, policy_logp = sample_completions(policy, x, xm, T, task.eos_id, task.pad_id, u)
        u = torch.rand(len(x), T, device=device, generator=gen)
        y0, ym0, _ = sample_completions(sft, x, xm, T, task.eos_id, task.pad_id, u)
        sft_logp = sequence_logprobs(sft, *join(x, xm, y, ym), task.eos_id)
        if device.type == "cuda":  # under bf16 the sampler's cached pass differs a little from a
            policy_logp = sequence_logprobs(policy, *join(x, xm, y, ym), task.eos_id)  # full one
    r_policy, r_sft = task.reward(x, xm, y, ym), task.reward(x, xm, y0, ym0)

    def wins(a, b):
        return ((a > b).float() + 0.5 * (a == b).float()).mean().item()

    log_ratio = (policy_logp - sft_logp).double()
    out = {
        "prompts": len(rows),
        "samples_per_prompt": k,
        "reward_policy": r_policy.mean().item(),
        "reward_sft": r_sft.mean().item(),
        "win_rate_vs_sft": wins(r_policy, r_sft),
        "kl_policy_sft_mc": log_ratio.mean().item(),
        "kl_policy_sft_mc_se": (log_ratio.std() / len(log_ratio) ** 0.5).item()
        if len(log_ratio) > 1
        else 0.0,
    }
    with_ref = [i for i, r in enumerate(rows) if r["reference"]]
    if with_ref:
        r_ref = task.rm.score(task.reference_texts([rows[i] for i in with_ref])).to(device)
        r_pol = r_policy.view(len(rows), k)[with_ref]
        out["win_rate_vs_reference"] = wins(r_pol, r_ref[:, None].expand_as(r_pol))
        out["reward_reference"] = r_ref.mean().item()
    texts = task.texts(x, xm, y, ym)
    out["examples"] = [
        {"prompt": rows[i // k]["prompt"], "text": t} for i, t in enumerate(texts) if i % k == 0
    ][:4]
    return out


def print_text_results(res):
    print(
        f"\nHeld-out evaluation ({res['prompts']} prompts x {res['samples_per_prompt']} samples, "
        "judged by the reward model)"
    )
    print(f"  mean reward   policy {res['reward_policy']:+.3f}   SFT {res['reward_sft']:+.3f}")
    print(f"  win rate of the policy over the SFT model: {res['win_rate_vs_sft']:.1%}")
    if "win_rate_vs_reference" in res:
        print(f"  win rate of the policy over the references: {res['win_rate_vs_reference']:.1%}")
    print(
        f"  KL(policy || SFT), a Monte Carlo estimate: {res['kl_policy_sft_mc']:.3f} "
        f"+- {res['kl_policy_sft_mc_se']:.3f} nats (standard error; it can dip below 0)"
    )
    for ex in res["examples"]:
        print(f"  {ex['prompt']!r} -> {ex['text']!r}")


def setup_distributed(cfg):
    """torchrun sets WORLD_SIZE: then one process per device, NCCL on GPUs, gloo on CPUs.
    Returns (device, rank, number of processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return pick_device(cfg.device), 0, 1
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, n_procs = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank:
        os.environ["TQDM_DISABLE"] = "1"  # one progress bar, rank 0's
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device()), rank, n_procs
    return torch.device("cpu"), rank, n_procs


def backward_policy_loss(model, eos_id, micro_batch, device, seqs, loss_of):
    """Part I's policy_backward for several processes (model wrapped in DDP, which averages the
    gradients) and for micro-batches of `micro_batch` samples (gradient accumulation).

    Every loss here depends on theta only through the (B, n) log-probs, so
    grad L = sum_i (dL / d log q_i) grad log q_i: the coefficients come from one no-grad pass
    over all samples, then sum_i coef_i * log q_i is backpropagated chunk by chunk. Exact for any
    chunking (a test checks it against the one-pass gradient)."""
    n_total = seqs[0].shape[0]
    if not micro_batch or micro_batch >= n_total:
        return policy_backward(model, eos_id, device, seqs, loss_of)
    chunks = [slice(s, s + micro_batch) for s in range(0, n_total, micro_batch)]
    plain = getattr(model, "module", model)  # the no-grad pass needs no DDP hooks
    with torch.no_grad(), autocast(device):
        logp = torch.cat([sequence_logprobs(plain, *(t[c] for t in seqs), eos_id) for c in chunks])
    logp.requires_grad_(True)
    loss = loss_of(logp)
    (coef,) = torch.autograd.grad(loss, logp)
    for i, c in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = (
            contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        )
        with sync, autocast(device):
            (coef[c] * sequence_logprobs(model, *(t[c] for t in seqs), eos_id)).sum().backward()
    return loss.detach(), logp.detach()


def samples_from(cfg):
    """Which distribution drew the step's samples (when q' = SFT, not the policy's reward)."""
    K = cfg.refresh_every
    return "sft" if K == 0 else "policy" if K == 1 else f"policy, refreshed every {K} steps"


def step_diagnostics(cfg, info, stop, n_procs):
    """A step's figures from what the step computed anyway (no extra forward pass): the loss; the
    samples' mean reward and its spread; a self-normalised estimate of KL(policy || SFT),
    sum_i beta_hat_i (log q_theta(y_i) - log p_sft(y_i)), from the proposal's samples; and the
    effective sample size of alpha_hat, 1 / sum_i alpha_hat_i^2, as a fraction of n. Averaged
    over this process's prompts, then over the processes."""
    _, proposal_logp, sft_logp, reward = info["batch"]
    shape = (-1, cfg.n_samples)
    pol, prop, sft = (t.view(shape) for t in (info["policy_logp"], proposal_logp, sft_logp))
    log_a = log_alpha_hat(log_posterior(sft, reward.view(shape), cfg.beta), prop)
    kl = (log_beta_hat(pol, prop).exp() * (pol - sft)).sum(-1).mean()
    ess = (1 / log_a.exp().pow(2).sum(-1)).mean() / cfg.n_samples
    stats = torch.stack([info["loss"], reward.mean(), reward.pow(2).mean(), kl, ess, stop])
    if n_procs > 1:  # the global batch's averages, not this process's
        torch.distributed.all_reduce(stats)
        stats /= n_procs
    loss, r, r2, kl, ess, stop = stats.tolist()
    return {
        "loss": loss,
        "reward": r,
        "reward_std": max(r2 - r * r, 0.0) ** 0.5,
        "kl": kl,
        "ess": ess,
        "stop": stop > 0,
    }


def grad_norm(policy):
    norms = [p.grad.norm() for p in policy.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def run_model(cfg):
    """--model: train a Hugging Face causal LM against a reward model, checkpoint, evaluate."""
    cfg.validate()
    # all that needs no model is checked before any is loaded (the prompts' lengths need the
    # tokenizer), and nothing is written before every check has passed
    run_keys = {k: getattr(cfg, k) for k in RESUME_KEYS if k != "prompts_sha256"}
    run_keys["model"] = model_source(cfg.model, "--model")
    run_keys["reward_model"] = model_source(cfg.reward_model, "--reward-model")
    if cfg.prompts:
        run_keys["prompts"] = os.path.abspath(cfg.prompts)
    rows = load_prompts(cfg.prompts)
    run_keys["prompts_sha256"] = prompts_hash(rows)
    device, rank, n_procs = setup_distributed(cfg)
    if cfg.prompts_per_step % n_procs:
        raise ValueError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the "
            f"number of processes ({n_procs})"
        )
    out_dir = cfg.output_dir
    state, resume_from = prepare_output_dir(cfg, run_keys, rank == 0) if out_dir else (None, None)
    seed_everything(cfg.seed)
    import transformers

    transformers.logging.set_verbosity_error()  # missing weights are our errors, not warnings
    transformers.logging.disable_progress_bar()
    sft, tokenizer = load_causal_lm(run_keys["model"], cfg.trust_remote_code, quiet=rank > 0)
    rm = RewardModel(run_keys["reward_model"], cfg.reward_label, cfg.trust_remote_code, device)
    held = max(1, len(rows) // 5)  # the last fifth of the prompts is held out for evaluation
    train_rows, eval_rows = (rows[:-held], rows[-held:]) if len(rows) > 1 else (rows, rows)
    source = cfg.prompts or "built-in prompts"
    check_prompt_lengths(rows, tokenizer, cfg.max_new_tokens, model_context(sft), source)
    task = TextTask(
        train_rows, tokenizer, rm, cfg.max_new_tokens, eos_ids_of(sft, tokenizer), device
    )
    sft = frozen(sft.to(device))
    if resume_from:
        policy = load_causal_lm(resume_from, cfg.trust_remote_code, quiet=True)[0]
    else:
        policy = copy.deepcopy(sft)
    policy = policy.to(device).eval().requires_grad_(True)
    model = policy
    if n_procs > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=ids)
    B = cfg.prompts_per_step
    shard = slice(rank * B // n_procs, (rank + 1) * B // n_procs)  # this process's prompts
    backward = functools.partial(backward_policy_loss, model, task.eos_id, cfg.micro_batch, device)
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if out_dir and rank == 0:  # from here on we write: a new folder, or a checkpoint's own
        os.makedirs(out_dir, exist_ok=True)
        for stale in os.listdir(out_dir):  # a crash's half-written checkpoint (ours)
            if stale.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(out_dir, stale))
        if state:
            trim_metrics(metrics_path, state["step"])
    t0 = time.time()

    with stop_after_step_on_ctrl_c() as ctrl_c:
        last = {"time": time.time(), "final": None}

        def on_step(step, policy, proposal, info):
            if info["loss"] is None:
                return
            stop = torch.tensor(float(ctrl_c["stop"]), device=device)
            stats = step_diagnostics(cfg, info, stop, n_procs)
            if rank == 0:
                now = time.time()
                stats.update(
                    samples_from=samples_from(cfg),
                    grad_norm=grad_norm(policy),
                    step_s=round(now - last["time"], 3),
                    seconds=round(now - t0, 3),
                )
                last["time"] = now
                info["bar"].set_postfix(
                    reward=f"{stats['reward']:+.2f}",
                    kl=f"{stats['kl']:.2f}",
                    ess=f"{stats['ess']:.2f}",
                    refresh=False,
                )
                held_out = last["final"] = None
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    last["final"] = evaluate_text(policy, sft, task, eval_rows, cfg, device)
                    held_out = {k: v for k, v in last["final"].items() if k != "examples"}
                    last["time"] = time.time()  # the evaluation's time is not the step's
                if out_dir:
                    log = {"step": step, **{k: v for k, v in stats.items() if k != "stop"}}
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(log) + "\n")
                        if held_out:
                            f.write(json.dumps({"step": step, "held_out": held_out}) + "\n")
                    save = (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps
                    if save or stats["stop"]:
                        save_checkpoint(
                            out_dir, step, policy, proposal, sft, tokenizer, info, run_keys
                        )
            if stats["stop"] and step < cfg.steps:  # every rank agrees (step_diagnostics)
                if n_procs > 1:
                    torch.distributed.barrier()  # rank 0 has saved the checkpoint
                raise Interrupted(step)

        if rank == 0:
            start = state["step"] if state else 0
            split = (
                f"held out: {len(eval_rows)}"
                if len(rows) > 1
                else "one prompt: evaluated on it, none held out"
            )
            print(
                f"training {cfg.model} with {cfg.method} on {len(train_rows)} prompts "
                f"({split}), steps {start} -> {cfg.steps}, {n_procs} process(es) on {device}"
            )
        try:
            policy = train(cfg, sft, task, device, on_step, policy, state, backward, shard)
        except Interrupted as stopped:
            where = f"; checkpoint saved in {out_dir}, go on with --resume" if out_dir else ""
            raise Interrupted(f"interrupted after step {stopped}{where}") from None
    results = None
    if rank == 0:  # the held-out evaluation (done already when --eval-every reached the end)
        results = last["final"] or evaluate_text(policy, sft, task, eval_rows, cfg, device)
        results["config"] = asdict(cfg)
        results["train_s"] = round(time.time() - t0, 2)
        print_text_results(results)
        if out_dir:
            with open(os.path.join(out_dir, "eval.json"), "w") as f:
                json.dump(results, f, indent=2)
    if n_procs > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


# ------------------------------------------------------------------------------------------------
# Benchmark (python brain.py --bench): is a BRAIn step as cheap as fine-tuning on the samples?
#     Ratios on the same machine, so that machine noise cancels.
# ------------------------------------------------------------------------------------------------
def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_model(name, model, prompt_ids, B, n, T, device, reward_fn, steps=20, warmup=3):
    """One row of the benchmark for `model` (a Hugging Face causal LM), B prompts x n samples."""
    model = model.to(device).eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    N, P = B * n, prompt_ids.shape[1]
    x = prompt_ids.to(device).repeat_interleave(n, 0)
    xm = torch.ones_like(x)
    g = torch.Generator(device=device).manual_seed(0)

    def uniforms():
        return torch.rand(N, T, device=device, generator=g)

    # 1. one optimizer step on a fixed batch: BRAIn (scores precomputed) against cross-entropy
    with torch.no_grad(), autocast(device):
        y, _, proposal_logp = sample_completions(model, x, xm, T, -1, uniforms=uniforms())
    ids, attn, cmask = join(x, xm, y, torch.ones_like(y))  # T tokens each: no EOS (-1)
    proposal_logp = proposal_logp.view(B, n)
    target_logp = proposal_logp + torch.randn(B, n, device=device, generator=g)
    targets = torch.where(cmask[:, 1:].bool(), ids[:, 1:], -100)

    def brain_step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            policy_logp = sequence_logprobs(model, ids, attn, cmask, eos_token_id=-1)
        brain_loss(policy_logp.view(B, n), proposal_logp, target_logp).backward()
        opt.step()

    def ce_step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
        ).backward()
        opt.step()

    times = {"brain": [], "ce": []}
    for i in progress(range(warmup + steps), f"bench {name}"):
        pair = (("brain", brain_step), ("ce", ce_step))
        for key, fn in pair if i % 2 else pair[::-1]:  # interleaved, in turns: drift hits both
            t = timed(fn, device)
            if i >= warmup:
                times[key].append(t)

    # 2. sampling: the loop's sampler against a bare generate() of the same shape and settings
    def ours():
        sample_completions(model, x, xm, T, -1, uniforms=uniforms())

    def bare():
        model.generate(
            input_ids=x,
            attention_mask=xm,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=T,
            min_new_tokens=T,
            pad_token_id=0,
        )

    sampling = {"ours": [], "generate": []}
    with torch.no_grad(), autocast(device):
        for i in range(2 + 5):
            for key, fn in (("ours", ours), ("generate", bare)):
                t = timed(fn, device)
                if i >= 2:
                    sampling[key].append(t)
    # 3. where a training step's time goes (proposal = the policy: the SFT model is scored too)
    sft = frozen(model)
    phases = {"sampling": [], "scoring": [], "update": []}
    for i in range(2 + 5):
        with torch.no_grad(), autocast(device):
            out = {}
            t_sample = timed(
                lambda: out.update(s=sample_completions(model, x, xm, T, -1, uniforms=uniforms())),
                device,
            )
            yy, yym, lq = out["s"]
            seqs = join(x, xm, yy, yym)

            def score():
                out.update(sft=sequence_logprobs(sft, *seqs, -1), r=reward_fn(x, xm, yy, yym))

            t_score = timed(score, device)
        loss_of = functools.partial(batch_loss, Config(n_samples=n), lq, out["sft"], out["r"], None)

        def update():
            opt.zero_grad(set_to_none=True)
            policy_backward(model, -1, device, seqs, loss_of)
            opt.step()

        t_update = timed(update, device)
        if i >= 2:
            for k, t in zip(phases, (t_sample, t_score, t_update), strict=True):
                phases[k].append(t)
    step_s = {k: float(np.median(v)) for k, v in phases.items()}
    total = sum(step_s.values())
    row = {
        "model": name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "B": B,
        "n": n,
        "prompt_tokens": P,
        "new_tokens": T,
        "brain_step_s": float(np.median(times["brain"])),
        "ce_step_s": float(np.median(times["ce"])),
        "sampler_tok_s": N * T / np.median(sampling["ours"]),
        "generate_tok_s": N * T / np.median(sampling["generate"]),
        "share": {k: v / total for k, v in step_s.items()},
        "train_step_s": total,
    }
    row["step_ratio"] = row["brain_step_s"] / row["ce_step_s"]
    row["sampler_ratio"] = row["sampler_tok_s"] / row["generate_tok_s"]
    return row


def bench(cfg, show=True):
    """The benchmark table: the embedded model and a GPT-2-small-sized model built from a config."""
    import resource

    from transformers import GPT2Config, GPT2LMHeadModel

    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    world = ToyWorld(device)
    prompts = world.prompt_ids[torch.arange(16) % 8]
    rows = [
        bench_model(
            "embedded GPT-2 (toy)",
            world.new_model().gpt,
            prompts,
            16,
            8,
            MAX_NEW_TOKENS,
            device,
            lambda x, xm, y, ym: world.reward(x, xm, y.clamp(max=10), ym),
        )
    ]
    # GPT-2 small on a CPU takes seconds a step: a smaller batch there (the ratios are what count)
    big_B, big_n, big_P, big_T = (16, 8, 16, 64) if device.type == "cuda" else (2, 2, 8, 16)
    gpt2 = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, 768 wide, 124M, random weights
    prompts = torch.randint(0, gpt2.config.vocab_size, (big_B, big_P))
    token_score = torch.randn(gpt2.config.vocab_size, device=device)  # a synthetic reward
    rows.append(
        bench_model(
            "GPT-2-small-sized",
            gpt2,
            prompts,
            big_B,
            big_n,
            big_T,
            device,
            lambda x, xm, y, ym: token_score[y].mean(-1),
        )
    )
    result = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if show:
        print_bench(result)
    return result


def print_bench(result):
    print(
        f"\nBenchmark on {result['device']} (torch {result['torch']}, {result['threads']} "
        "threads); medians"
    )
    print(
        f"{'model':24s}{'params':>8s}{'B x n':>8s}{'tokens':>8s}{'BRAIn step':>12s}"
        f"{'CE step':>10s}{'ratio':>7s}{'sampler tok/s':>15s}{'generate':>10s}{'ratio':>7s}"
        "   step: sample / score / update"
    )
    for r in result["rows"]:
        sh = r["share"]
        print(
            f"{r['model']:24s}{r['params_m']:7.1f}M{r['B']:>4d} x{r['n']:<2d}"
            f"{r['prompt_tokens']:>4d}+{r['new_tokens']:<3d}{r['brain_step_s'] * 1e3:10.1f}ms"
            f"{r['ce_step_s'] * 1e3:8.1f}ms{r['step_ratio']:7.3f}{r['sampler_tok_s']:15.0f}"
            f"{r['generate_tok_s']:10.0f}{r['sampler_ratio']:7.3f}   {sh['sampling']:.0%} / "
            f"{sh['scoring']:.0%} / {sh['update']:.0%} of {r['train_step_s'] * 1e3:.0f} ms"
        )
    gpu = f", {result['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in result else ""
    print(f"peak memory: {result['peak_rss_mb']:.0f} MB RSS{gpu}")
    print(
        "ratio (step): BRAIn step / plain cross-entropy step on the same tokens; ratio (sampler): "
        "our sampler's tokens/s / generate()'s."
    )


# ------------------------------------------------------------------------------------------------
# The command line: one flag per field of Args (Config and the options below), help from the field
# ------------------------------------------------------------------------------------------------
@dataclass
class Args(Config):
    """Config, plus the options of real models (--model) and of the commands."""

    # real models (--model)
    model: str | None = arg(None, "causal LM (Hub name or folder): the SFT prior and the start")
    reward_model: str | None = arg(None, "sequence-classification reward model (name or folder)")
    reward_label: str | None = arg(None, "the reward model's label whose logit is the reward")
    prompts: str | None = arg(
        None, 'JSON lines {"prompt": ..., "reference": ...} (default: 8 built-in examples)'
    )
    max_new_tokens: int = arg(32, "completion length limit, EOS included")
    output_dir: str | None = arg(None, "checkpoints, metrics.jsonl and eval.json go here")
    save_every: int = arg(0, "checkpoint every K steps (0: at the end only)")
    resume: bool = arg(False, "continue from the last checkpoint in --output-dir")
    eval_samples: int = arg(4, "completions per held-out prompt in the evaluation")
    eval_every: int = arg(0, "evaluate on the held-out prompts every K steps too (0: at the end)")
    micro_batch: int = arg(0, "samples per forward/backward, to save memory (0: all at once)")
    trust_remote_code: bool = arg(False, "let transformers run code shipped with the model")
    # commands
    compare: bool = arg(False, "train every estimator on identical sample streams (--methods)")
    methods: str | None = arg(
        None,
        "with --compare only: a comma-separated subset of "
        + ", ".join(VARIANTS)
        + " (default: all)",
    )
    seeds: int = arg(3, "with --compare: seeds seed, seed+1, ...")
    bench: bool = arg(
        False, "time a BRAIn step against plain fine-tuning, the sampler against generate()"
    )
    json: str | None = arg(None, "write the results as JSON to this file")

    def __post_init__(self):
        if self.model:  # (ours) a pretrained LM needs a far gentler step, and on-policy samples
            self.lr = 1e-5 if self.lr is None else self.lr  # (README, "Real models": measured)
            self.refresh_every = 1 if self.refresh_every is None else self.refresh_every
        super().__post_init__()

    def validate(self):
        super().validate()
        model_only = {
            "--reward-model": self.reward_model,
            "--reward-label": self.reward_label,
            "--prompts": self.prompts,
            "--output-dir": self.output_dir,
            "--resume": self.resume,
            "--micro-batch": self.micro_batch,
            "--eval-every": self.eval_every,
            "--save-every": self.save_every,
        }
        given = [flag for flag, value in model_only.items() if value]
        if self.model is None and given:
            raise ValueError(f"{', '.join(given)} go(es) with --model (a real model run)")
        if self.model is not None and self.reward_model is None:
            raise ValueError(
                "--model needs --reward-model (a sequence-classification model that "
                "scores the text)"
            )
        if self.resume and not self.output_dir:
            raise ValueError("--resume needs --output-dir (where the checkpoint is)")
        if (
            self.max_new_tokens < 1
            or self.eval_samples < 1
            or min(self.save_every, self.eval_every) < 0
        ):
            raise ValueError(
                "max_new_tokens and eval_samples must be >= 1, save_every and eval_every >= 0"
            )
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0: all at once), got {self.micro_batch}")
        if self.compare and self.model:
            raise ValueError(
                "--compare runs on the embedded world (exact metrics); it does not take --model"
            )
        if self.bench and (self.compare or self.model):
            raise ValueError(
                "--bench runs alone (it builds its own models); drop --compare / --model"
            )
        if self.methods is not None and not self.compare:
            raise ValueError("--methods goes with --compare (for a single run, use --method)")
        unknown = [m for m in self.variants() if m not in VARIANTS]
        if unknown or not self.variants():
            raise ValueError(
                f"unknown method(s) in --methods: {', '.join(unknown) or '(none)'}; "
                f"choose from {', '.join(VARIANTS)}"
            )
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if not self.model and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "several processes (torchrun) are for --model runs; the embedded world runs in one"
            )
        if self.json:
            check_writable(self.json, "--json")
        return self

    def variants(self):
        if self.methods is None:
            return list(VARIANTS)
        return [m.strip() for m in self.methods.split(",") if m.strip()]


EXAMPLES = """examples:
  python brain.py                                   BRAIn on the embedded world (exact metrics)
  python brain.py --method gdcpp --beta 0.5         another estimator, another temperature
  python brain.py --compare --methods brain,dpg     estimators on identical sample streams
  python brain.py --model DIR --reward-model DIR --prompts p.jsonl --output-dir out
  torchrun --nproc_per_node=2 brain.py --model ...  the same, data-parallel
  python brain.py --bench                           a BRAIn step against plain fine-tuning"""

GROUPS = {
    "method": "the method",
    "steps": "training",
    "sft_steps": "the embedded world",
    "model": "real models (--model)",
    "compare": "commands",
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    p = Parser(
        prog="brain.py",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="BRAIn (Pandey et al., ICML 2024): the embedded toy world by default "
        "(offline, CPU or CUDA); --model for Hugging Face models.",
    )
    group = p
    for f in fields(Args):
        if f.name in GROUPS:
            group = p.add_argument_group(GROUPS[f.name])
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            group.add_argument(flag, action="store_true", help=help)
            continue
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)
        plain, with_model = getattr(Args(), f.name), getattr(Args(model="m"), f.name)
        other = f"; {with_model} with --model" if with_model != plain else ""
        default = f" (default: {plain}{other})" if plain is not None else ""
        group.add_argument(
            flag, type=kind, default=f.default, help=help + default, metavar=f.name.upper()
        )
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = Args(**vars(parser.parse_args(argv)))
    try:
        return args.validate()
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.bench:
            results = bench(args)
        elif args.model:
            results = run_model(args)
        elif args.compare:
            results = compare(args, args.seeds, args.variants())
        else:
            results = run(args)
    except (ValueError, Interrupted) as e:  # our checks, a stop: one line, no traceback
        print(f"brain.py: {'error: ' if isinstance(e, ValueError) else ''}{e}", file=sys.stderr)
        return 1 if isinstance(e, ValueError) else 130
    except KeyboardInterrupt:
        print("brain.py: interrupted", file=sys.stderr)
        return 130
    if args.json and results is not None:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nmetrics written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
