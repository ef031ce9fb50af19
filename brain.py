"""BRAIn: Bayesian Reward-conditioned Amortized Inference, a minimal reference.

Pandey et al., "BRAIn: Bayesian Reward-conditioned Amortized Inference for natural language
generation from feedback", ICML 2024 (arXiv 2402.02479).

BRAIn aligns a language model q_theta with a reward model r by distilling the posterior

    p(y | x, G=1)  proportional to  p_sft(y|x) * exp(r(x, y) / beta)

into q_theta, with self-normalised importance sampling from a proposal q' and a
self-normalised baseline. This file reads top to bottom in the paper's order:

    1. the posterior              (paper §4)
    2. the importance weights     (paper §4)
    3. the BRAIn loss / baseline  (paper §4, Theorem 4.2; authors' code)
    4. connections: DPG, GDC++, DPO (paper §5)
    5. language-model plumbing: log-probs and exact sampling
    6. training                   (our choices, where the paper's text was not available)
    7. evaluation                 (exact, by enumeration, on the embedded world)
    8. comparing the estimators   (--compare: equal footing, gradient variance)
    9. the embedded toy world     (not part of the method: a tiny GPT-2 and a review reward)
   10. real models                (--model: Hugging Face LMs, a reward model, checkpoints, torchrun)
   11. benchmark                  (--bench)
   12. the command line

Comments say which parts are from the paper, from the authors' public toy code, and our own
choice. This is a teaching reference, not a library.

    python brain.py                   # BRAIn on the embedded world (offline, CPU, well under a minute)
    python brain.py --method gdcpp    # the same run with GDC++'s estimator
    python brain.py --compare         # every estimator on identical sample streams, 3 seeds
    python brain.py --model DIR --reward-model DIR --prompts prompts.jsonl --output-dir out
"""

import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

METHODS = ("brain", "dpg", "gdcpp", "dpo")


# ------------------------------------------------------------------------------------------
# Hyperparameters (one place, one line each)
# ------------------------------------------------------------------------------------------
@dataclass
class Config:
    method: str = "brain"  # which estimator trains the policy: brain, dpg, gdcpp or dpo
    steps: int = 200  # optimizer steps
    prompts_per_step: int = 16  # B: prompts per step, drawn uniformly with replacement
    n_samples: int = 8  # n: completions sampled per prompt (n >= 2)
    beta: float = 1.0  # posterior temperature: log p(G=1|x,y) = r(x,y)/beta
    lr: float = 1e-3  # Adam learning rate of the policy
    refresh_every: int = 0  # K: proposal := copy of the policy every K steps (0: the SFT model)
    dpo_labels: str = "argmax"  # DPO pairs: "argmax" (best vs worst) or "bt" (Bradley-Terry coin)
    seed: int = 0  # the one seed: corpus, SFT pretraining, sampling
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    sft_steps: int = 300  # embedded world: Adam steps that pretrain the SFT prior
    sft_batch: int = 256  # embedded world: sequences per SFT pretraining step
    micro_batch: int = 0  # samples per forward/backward, to save memory (one extra no-grad pass); 0: all at once
    # real models (--model); the embedded world ignores these
    model: Optional[str] = None  # Hugging Face causal LM (Hub name or folder): the SFT prior and the policy's start
    reward_model: Optional[str] = None  # sequence-classification reward model (Hub name or folder)
    reward_label: Optional[str] = None  # which logit is the reward, when the reward model has several labels
    prompts: Optional[str] = None  # JSON lines {"prompt": ..., "reference": ...}; built-in examples if None
    max_new_tokens: int = 32  # completion length limit, EOS included
    output_dir: Optional[str] = None  # checkpoints (safetensors), metrics.jsonl, eval.json
    save_every: int = 0  # checkpoint every K steps (0: only at the end)
    resume: bool = False  # continue from the last checkpoint in output_dir
    eval_samples: int = 4  # completions per held-out prompt in the evaluation
    trust_remote_code: bool = False  # let transformers run code shipped with the model

    def validate(self):
        """A clear message for each bad hyperparameter, before any work starts."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 (self-normalisation needs two samples), got {self.n_samples}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0: the proposal stays the SFT model), got {self.refresh_every}")
        if self.dpo_labels not in ("argmax", "bt"):
            raise ValueError(f"dpo_labels must be 'argmax' or 'bt', got {self.dpo_labels!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0: no accumulation), got {self.micro_batch}")
        if self.model is not None and self.reward_model is None:
            raise ValueError("--model needs --reward-model (a sequence-classification model that scores the text)")
        if self.model is None and (self.reward_model or self.prompts or self.output_dir or self.resume):
            raise ValueError("--reward-model, --prompts, --output-dir and --resume go with --model")
        if self.resume and not self.output_dir:
            raise ValueError("--resume needs --output-dir (where the checkpoint is)")
        if self.max_new_tokens < 1 or self.eval_samples < 1 or self.save_every < 0:
            raise ValueError("max_new_tokens and eval_samples must be >= 1, save_every >= 0")
        if self.sft_steps < 1 or self.sft_batch < 1:
            raise ValueError("sft_steps and sft_batch must be >= 1")
        return self


def _check_scores(**named):
    """The estimators' common input contract: tensors of one shape (B, n), n >= 2, all finite."""
    shapes = {}
    for name, x in named.items():
        if not torch.is_tensor(x):
            raise ValueError(f"{name} must be a torch tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, n): B prompts, n samples each; got shape {tuple(x.shape)}")
        if x.shape[-1] < 2:
            raise ValueError(f"{name}: need n >= 2 samples per prompt, got n = {x.shape[-1]}")
        shapes[name] = tuple(x.shape)
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")
    finite = torch.stack([torch.isfinite(x.detach()).all() for x in named.values()])
    if not finite.all():  # one device sync for all inputs
        bad = [name for name, ok in zip(named, finite.tolist()) if not ok]
        raise ValueError(f"{', '.join(bad)} contains NaN or inf (check the reward model and the log-probs)")


# ------------------------------------------------------------------------------------------
# 1. The reward-conditioned posterior (paper §4)
# ------------------------------------------------------------------------------------------
def log_goodness(reward, beta):
    """log p(G=1 | x, y). Our choice, following the paper's Bradley-Terry case: r/beta.

    Any log-likelihood of "good" gives a valid Bayesian posterior: swap this line for,
    e.g., log 1[y satisfies c] (GDC's target) and everything below works unchanged."""
    return reward / beta


def log_posterior(sft_logp, reward, beta):
    """Unnormalised log p(y | x, G=1) = log p_sft(y|x) + log p(G=1|x,y)   (paper §4, Bayes' rule).

    Paper §4: with log p(G=1|x,y) = r/beta this is the optimum of KL-regularised reward
    maximisation (the PPO-optimal policy). log Z(x) is left out: it cancels under self-normalisation."""
    return sft_logp + log_goodness(reward, beta)


# ------------------------------------------------------------------------------------------
# 2. Self-normalised importance weights (paper §4)
#    For n samples y_1..y_n ~ q'(.|x) of one prompt, in log space:
#      log alpha_i = log p~(y_i|x,G=1) - log q'(y_i|x)    alpha_hat = softmax_i(log alpha)
#      log b_i     = log q_theta(y_i|x) - log q'(y_i|x)   beta_hat  = softmax_i(log b)
#    Tensors are (B, n): B prompts, n samples each; the softmax runs over the n samples.
# ------------------------------------------------------------------------------------------
def alpha_hat(target_logp, proposal_logp):
    """Self-normalised importance weights of the posterior (the targets), shape (B, n)."""
    return torch.softmax(target_logp - proposal_logp, dim=-1)


def beta_hat(policy_logp, proposal_logp):
    """Self-normalised importance weights of the policy q_theta, shape (B, n)."""
    return torch.softmax(policy_logp - proposal_logp, dim=-1)


# ------------------------------------------------------------------------------------------
# 3. The BRAIn loss and its self-normalised baseline (paper §4, Theorem 4.2; authors' code)
# ------------------------------------------------------------------------------------------
def brain_loss(policy_logp, proposal_logp, target_logp):
    """L = KL(alpha_hat || beta_hat(theta)), averaged over prompts. Differentiable through policy_logp only.

    Authors' code (gradient_estimators.py): the ascent direction is
        sum_i (alpha_hat_i - beta_hat_i) grad log q_theta(y_i|x),
    where sum_i beta_hat_i grad log q_theta(y_i) is the self-normalised baseline, an estimate of
    E_q[grad log q] = 0. Our choice: write it as a loss. With alpha_hat held constant,
        -grad KL(alpha_hat || beta_hat) = sum_i alpha_hat_i grad log beta_hat_i
                                        = sum_i (alpha_hat_i - beta_hat_i) grad log q_theta(y_i),
    so the loss is a cross-entropy between two softmaxes over the n samples (test_brain.py checks it).
    Paper, Theorem 4.2: its gradient is unbiased for the self-normalised KL E[KL(alpha_hat||beta_hat)],
    which is 0 if and only if q_theta is the posterior."""
    _check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    proposal_logp, target_logp = proposal_logp.detach(), target_logp.detach()
    log_a = torch.log_softmax(target_logp - proposal_logp, dim=-1)  # log alpha_hat (constant)
    log_b = torch.log_softmax(policy_logp - proposal_logp, dim=-1)  # log beta_hat(theta)
    return (log_a.exp() * (log_a - log_b)).sum(-1).mean()


# ------------------------------------------------------------------------------------------
# 4. Connections (paper §5). Same samples, same alpha_hat; only the baseline differs:
#      DPG    weight alpha_hat_i                 (no baseline; Khalifa et al. 2021)
#      GDC++  weight alpha_hat_i - b_i / n       (unnormalised baseline; Korbak et al. 2022)
#      BRAIn  weight alpha_hat_i - beta_hat_i    (self-normalised baseline)
#    DPG's and GDC++'s losses are -sum_i w_i log q_theta(y_i) with w held constant, so their
#    gradients are the estimators; BRAIn's gradient has the same form (section 3). The loss
#    values themselves are not comparable across methods.
# ------------------------------------------------------------------------------------------
def _target_weights(proposal_logp, target_logp, log_z):
    """alpha_hat (Z estimated from the same samples), or plain importance weights
    exp(log p~ - log Z - log q') / n when log Z is given (known, or a running estimate)."""
    if log_z is None:
        return alpha_hat(target_logp, proposal_logp)
    log_z = torch.as_tensor(log_z, dtype=target_logp.dtype, device=target_logp.device)
    if log_z.dim() == 1:
        if log_z.shape[0] != target_logp.shape[0]:
            raise ValueError(f"log_z must be a scalar or have shape (B,) = ({target_logp.shape[0]},), got {tuple(log_z.shape)}")
        log_z = log_z[:, None]
    elif log_z.dim() != 0:
        raise ValueError(f"log_z must be a scalar or have shape (B,), got {tuple(log_z.shape)}")
    if not torch.isfinite(log_z).all():
        raise ValueError("log_z contains NaN or inf")
    n = target_logp.shape[-1]
    return torch.exp(target_logp - log_z - proposal_logp) / n


def _weighted_logp_loss(weights, policy_logp):
    return -(weights.detach() * policy_logp).sum(-1).mean()


def dpg_loss(policy_logp, proposal_logp, target_logp, log_z=None):
    """DPG: ascent direction sum_i w_i grad log q_theta(y_i), no baseline ("BRAIn without baseline").
    Khalifa et al. (ICLR 2021) §2.3 and the authors' code; w_i = alpha_hat_i, or the plain
    importance weight when log_z (shape (B,) or scalar) is given."""
    _check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    w = _target_weights(proposal_logp.detach(), target_logp.detach(), log_z)
    return _weighted_logp_loss(w, policy_logp)


def gdcpp_loss(policy_logp, proposal_logp, target_logp, log_z=None):
    """GDC++: ascent direction sum_i (w_i - b_i / n) grad log q_theta(y_i), b_i = q_theta(y_i)/q'(y_i)
    unnormalised (Korbak et al., NeurIPS 2022, Alg. 1; the authors' code). On-policy b_i = 1 and
    this equals BRAIn; off-policy it does not."""
    _check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    proposal_logp, target_logp = proposal_logp.detach(), target_logp.detach()
    w = _target_weights(proposal_logp, target_logp, log_z)
    b = torch.exp(policy_logp.detach() - proposal_logp)
    return _weighted_logp_loss(w - b / policy_logp.shape[-1], policy_logp)


def dpo_loss(policy_logp, ref_logp, reward, beta=1.0, labels="argmax", coin=None):
    """DPO (Rafailov et al. 2023) on one pair per prompt:
        L = -log sigmoid(beta * [(log q(y_w) - log ref(y_w)) - (log q(y_l) - log ref(y_l))]).

    labels="argmax": y_w, y_l = the best and the worst of the n samples by reward. Paper §5:
        with n = 2, proposal = SFT = ref and beta = 1 this is BRAIn with alpha_hat replaced by a
        one-hot on the winner (an argmax in place of the softmax). With a deterministic reward it
        over-optimises: the target is no longer the posterior. Ties (all rewards equal) give a
        pair of one sample with itself: loss log 2, zero gradient.
    labels="bt" (our choice): the first two samples, labelled by a Bradley-Terry coin flip,
        P(y_1 wins) = sigmoid(r_1 - r_2), reading the reward as a BT logit. DPO's optimum is then
        ref * exp(r / beta): the same posterior as BRAIn's at the same beta. (BRAIN.md writes the
        coin as sigmoid((r_1 - r_2) / beta) with DPO's beta = 1: the same optimum.) `coin`: (B,)
        uniform numbers for the flips (y_1 wins when coin < P); default: the global generator."""
    _check_scores(policy_logp=policy_logp, ref_logp=ref_logp, reward=reward)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"DPO beta must be a finite number > 0, got {beta}")
    reward = reward.detach()
    if labels == "argmax":
        win, lose = reward.argmax(-1, keepdim=True), reward.argmin(-1, keepdim=True)
    elif labels == "bt":
        if coin is None:
            coin = torch.rand(reward.shape[0], device=reward.device)
        first_wins = coin.view(-1, 1) < torch.sigmoid(reward[:, :1] - reward[:, 1:2])
        win, lose = torch.where(first_wins, 0, 1), torch.where(first_wins, 1, 0)
    else:
        raise ValueError(f"labels must be 'argmax' or 'bt', got {labels!r}")
    h = policy_logp - ref_logp.detach()  # implicit reward / beta of the policy
    margin = h.gather(-1, win) - h.gather(-1, lose)
    return -F.logsigmoid(beta * margin).mean()


def method_loss(method, policy_logp, proposal_logp, sft_logp, reward, beta, dpo_labels="argmax", log_z=None, coin=None):
    """The loss of one method on one batch of (B, n) scores: the training loop's single entry point.
    DPO runs with DPO's beta = the posterior's beta (so "bt" targets the same posterior); the
    paper's n = 2 argmax special case is DPO's beta = 1."""
    if method == "dpo":  # DPO-sft: the SFT model is DPO's reference
        return dpo_loss(policy_logp, sft_logp, reward, beta=beta, labels=dpo_labels, coin=coin)
    target_logp = log_posterior(sft_logp, reward, beta)
    if method == "brain":
        return brain_loss(policy_logp, proposal_logp, target_logp)
    if method == "dpg":
        return dpg_loss(policy_logp, proposal_logp, target_logp, log_z)
    if method == "gdcpp":
        return gdcpp_loss(policy_logp, proposal_logp, target_logp, log_z)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------
# 5. Language-model plumbing: sequence log-probs and exact sampling
#    Sequences are [prompt | completion]; prompts are left-padded, completions right-padded.
# ------------------------------------------------------------------------------------------
def _positions(attention_mask):
    """Position ids that skip left padding (so a padded prompt is read like an unpadded one)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _eos_ids(model, eos_token_id, device):
    """The EOS id(s) as a tensor: given (an int or a list, e.g. Llama-3 has two), else from model.config."""
    eos = eos_token_id if eos_token_id is not None else getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return None
    return torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=device)


def sequence_logprobs(model, input_ids, attention_mask, completion_mask, eos_token_id=None):
    """log q(y|x) = sum_t log q(y_t | x, y_<t) over completion tokens, in fp32 (as the DPO reference code).

    input_ids, attention_mask, completion_mask: (N, L). completion_mask is 1 on completion tokens;
    prompt and padding are 0. Everything after the first EOS of the completion is masked too
    (the EOS itself counts); eos_token_id (an id or a list of ids) defaults to model.config's. Returns (N,)."""
    if completion_mask[:, 0].any():
        raise ValueError("completion_mask[:, 0] must be 0: the first token has no prediction (the prompt cannot be empty)")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask)).logits
    logits = logits[:, :-1].float()  # position t predicts token t+1
    targets = input_ids[:, 1:]
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    mask = completion_mask[:, 1:].bool()
    eos = _eos_ids(model, eos_token_id, input_ids.device)
    if eos is not None:
        is_eos = torch.isin(targets, eos) & mask
        mask = mask & ((is_eos.long().cumsum(-1) - is_eos.long()) == 0)  # drop tokens after the first EOS
    return torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(-1)


@torch.no_grad()
def sample_completions(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id=None,
                       generator=None, uniforms=None):
    """Draw one completion per row exactly from the model: temperature 1, no top-k/top-p
    (any truncation would make the importance weights wrong). Batched, with the KV cache.

    prompt_ids, prompt_mask: (N, P), left-padded. Returns completion ids (N, T), completion
    mask (N, T) (1 up to and including the first EOS) and log q(y|x) of each draw (N,), fp32:
    the log-probs the draws were made with, so the proposal needs no second forward pass.
    Each token is drawn by inverting the CDF at a uniform number: `uniforms` (N, T) when given
    (so that a batch split across processes draws what the whole batch would), else drawn
    from `generator` (default: the global one)."""
    n, device = prompt_ids.shape[0], prompt_ids.device
    eos = _eos_ids(None, eos_token_id, device)
    pad = int(eos[0]) if pad_token_id is None else pad_token_id
    if uniforms is None:
        uniforms = torch.rand(n, max_new_tokens, device=device, generator=generator)
    attn = prompt_mask.long()
    pos = _positions(attn)
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    next_pos = pos[:, -1:] + 1
    alive = torch.ones(n, dtype=torch.bool, device=device)
    logp_sum = torch.zeros(n, device=device)
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    masks = torch.zeros(n, max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        cdf = logp.double().exp().cumsum(-1)  # float64: exact enough for 100k+ vocabularies
        tok = torch.searchsorted(cdf, uniforms[:, t:t + 1].double() * cdf[:, -1:], right=True).squeeze(-1)
        tok = torch.where(alive, tok.clamp(max=cdf.shape[-1] - 1), torch.full_like(tok, pad))
        logp_sum += torch.where(alive, logp.gather(-1, tok[:, None]).squeeze(-1), torch.zeros_like(logp_sum))
        tokens[:, t], masks[:, t] = tok, alive.long()
        alive = alive & ~torch.isin(tok, eos)
        if t + 1 == max_new_tokens or (t % 8 == 7 and not alive.any()):  # a device sync every 8 tokens
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, cache=out.cache, use_cache=True)
        next_pos = next_pos + 1
    return tokens, masks, logp_sum


def join(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """[prompt | completion] as (input_ids, attention_mask, completion_mask) for sequence_logprobs."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)
    full_completion_mask = torch.cat([torch.zeros_like(prompt_mask.long()), completion_mask.long()], dim=1)
    return input_ids, attention_mask, full_completion_mask


# ------------------------------------------------------------------------------------------
# 6. Training (our choices where the paper's text was not available; see BRAIN.md)
#    Per step: B prompts -> n samples each, drawn exactly from the proposal q' (the SFT model,
#    or a copy of the policy refreshed every K steps) -> proposal, SFT and reward scores without
#    gradients -> one optimizer step on the chosen loss.
# ------------------------------------------------------------------------------------------
def seed_everything(seed):
    """The one place where randomness is seeded."""
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on CPU. Log-probs are always gathered in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def frozen(model):
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def rank_and_world():
    """(this process's rank, number of processes): (0, 1) unless torchrun started several."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def my_share(B):
    """The slice of a global batch of B prompts that this process handles."""
    rank, world = rank_and_world()
    return slice(rank * B // world, (rank + 1) * B // world)


def draw_coins(B, generator, device):
    """Uniform numbers for DPO's Bradley-Terry labels ("bt"), drawn for the global batch from the
    stream (so runs repeat exactly, on any number of processes); this process's share."""
    return torch.rand(B, device=device, generator=generator)[my_share(B)]


def score_batch(cfg, proposal, sft, task, generator, device):
    """Draw B prompts, sample n completions per prompt from the proposal and score them, all
    without gradients. Returns the joined sequences and the (B*n,) proposal log-probs,
    SFT log-probs and rewards. With several processes, every process draws the same global
    batch (prompts and uniforms) and keeps its own B / world_size prompts of it."""
    B, n, T = cfg.prompts_per_step, cfg.n_samples, task.max_new_tokens
    with torch.no_grad(), autocast(device):
        prompt_idx = torch.randint(len(task.prompt_ids), (B,), device=device, generator=generator)
        uniforms = torch.rand(B, n, T, device=device, generator=generator)
        prompt_idx, uniforms = prompt_idx[my_share(B)], uniforms[my_share(B)].reshape(-1, T)
        x = task.prompt_ids[prompt_idx].repeat_interleave(n, 0)
        xm = task.prompt_mask[prompt_idx].repeat_interleave(n, 0)
        y, ym, proposal_logp = sample_completions(proposal, x, xm, T, task.eos_id, task.pad_id, uniforms=uniforms)
        ids, attn, cmask = join(x, xm, y, ym)
        if device.type == "cuda":  # under bf16 the cached sampling pass and a full forward differ a
            # little: score the proposal the way the policy is scored, so that q_theta = q' gives b_i = 1
            proposal_logp = sequence_logprobs(proposal, ids, attn, cmask, task.eos_id)
        sft_logp = proposal_logp if proposal is sft else sequence_logprobs(sft, ids, attn, cmask, task.eos_id)
        reward = task.reward(x, xm, y, ym).float()
    if not torch.isfinite(reward).all():
        raise ValueError("the reward function returned NaN or inf")
    return (ids, attn, cmask), proposal_logp, sft_logp, reward


def sample_stream(seed, device):
    """The generator that draws prompts and samples in training: seeded by the run's seed alone,
    so that every method sees the same prompts and, with a fixed proposal, the same samples."""
    return torch.Generator(device=device).manual_seed(seed)


def backward_policy_loss(model, seqs, eos_id, loss_of, micro_batch, device):
    """loss_of(policy_logp).backward(), with the forward/backward split in micro-batches of
    `micro_batch` samples when asked (gradient accumulation, to save memory).

    Every loss here depends on theta only through the (B, n) log-probs, so
    grad L = sum_i (dL / d log q_i) grad log q_i: the coefficients come from one no-grad pass
    over all samples, then sum_i coef_i * log q_i is backpropagated chunk by chunk. Exact for
    any chunking (a test checks it against the one-pass gradient). Returns the loss."""
    n_total = seqs[0].shape[0]
    if not micro_batch or micro_batch >= n_total:
        with autocast(device):
            loss = loss_of(sequence_logprobs(model, *seqs, eos_id))
        loss.backward()
        return loss
    chunks = [slice(s, s + micro_batch) for s in range(0, n_total, micro_batch)]
    plain = getattr(model, "module", model)  # the no-grad pass needs no DDP hooks
    with torch.no_grad(), autocast(device):
        logp = torch.cat([sequence_logprobs(plain, *(t[c] for t in seqs), eos_id) for c in chunks])
    logp.requires_grad_(True)
    loss = loss_of(logp)
    (coef,) = torch.autograd.grad(loss, logp)
    for i, c in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast(device):
            (coef[c] * sequence_logprobs(model, *(t[c] for t in seqs), eos_id)).sum().backward()
    return loss.detach()


def train(cfg, sft, task, device, on_step=None, policy=None, state=None):
    """Train `policy` (default: a copy of `sft`) with cfg.method on `task`. Returns the policy.

    `task` needs: prompt_ids / prompt_mask (P, Lp) left-padded, max_new_tokens, eos_id, pad_id and
    reward(prompt_ids, prompt_mask, completion_ids, completion_mask) -> (N,) rewards.
    The policy runs in eval mode (no dropout), so log q_theta is the distribution it samples from.
    on_step(steps_done, policy, proposal, info) is called before the first step and after each
    one; info holds the optimizer, the sample stream and the step's loss and mean reward.
    `state` (from a checkpoint) restores the optimizer, the sample stream and the step count.
    Under torchrun the policy is wrapped in DistributedDataParallel: gradients are averaged."""
    sft = sft.eval()
    policy = (copy.deepcopy(sft) if policy is None else policy).eval()
    for p in policy.parameters():
        p.requires_grad_(True)
    model = policy
    if rank_and_world()[1] > 1:
        model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    proposal = sft if cfg.refresh_every == 0 else frozen(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    stream = sample_stream(cfg.seed, device)
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        stream.set_state(state["stream"])
        start = state["step"]
        if state.get("proposal") is not None:
            proposal.load_state_dict(state["proposal"])
    info = {"optimizer": opt, "stream": stream, "loss": None, "reward": None}
    if on_step is not None:
        on_step(start, policy, proposal, info)
    bar = tqdm(range(start, cfg.steps), desc=f"train {cfg.method}", leave=False, dynamic_ncols=True,
               initial=start, total=cfg.steps, disable=True if rank_and_world()[0] else None)
    for step in bar:
        if cfg.refresh_every and step % cfg.refresh_every == 0:  # (at step 0 a no-op: they are equal)
            proposal.load_state_dict(policy.state_dict())
        seqs, proposal_logp, sft_logp, reward = score_batch(cfg, proposal, sft, task, stream, device)
        coin = draw_coins(cfg.prompts_per_step, stream, device)
        shape = (-1, cfg.n_samples)  # (prompts of this process, n)

        def loss_of(policy_logp):
            return method_loss(cfg.method, policy_logp.view(shape), proposal_logp.view(shape), sft_logp.view(shape),
                               reward.view(shape), cfg.beta, cfg.dpo_labels, coin=coin)

        opt.zero_grad(set_to_none=True)
        loss = backward_policy_loss(model, seqs, task.eos_id, loss_of, cfg.micro_batch, device)
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:  # .item() waits for the device: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}", reward=f"{reward.mean().item():+.2f}")
        if on_step is not None:
            stats = torch.stack([loss.detach(), reward.mean()])
            if rank_and_world()[1] > 1:  # log the global batch's averages, not this process's
                torch.distributed.all_reduce(stats)
                stats /= rank_and_world()[1]
            info.update(loss=stats[0], reward=stats[1])
            on_step(step + 1, policy, proposal, info)
    bar.close()
    return policy


# ------------------------------------------------------------------------------------------
# 7. Evaluation: exact, by enumerating every completion of every prompt (embedded world)
#    KL(posterior || policy): how well the policy amortises the posterior (0 is perfect);
#    KL(policy || SFT) and E_policy[r]: the two axes of the reward-KL frontier.
# ------------------------------------------------------------------------------------------
def enumerate_logprobs(model, world, device, grad=False):
    """log q(y|x) of every completion y of every prompt x: a (num_prompts, num_completions) table.

    The completions form a tree, and a causal LM reads a prefix the same way whatever follows it:
    one forward pass over the longest prefixes (every 3-word sequence, 1,000 rows per prompt)
    gives the next-token distribution at every node of the tree. Each completion's log-prob is
    the sum of its tokens' log-probs along its path (test_brain.py checks it against
    sequence_logprobs and against sampling). grad=True keeps the graph, e.g. for the exact
    gradient of KL(posterior || policy) = -sum_y posterior(y) grad log q(y) + const."""
    model = model.eval()
    prefixes = world.prefix_ids.to(device)
    rows, steps = world.path_rows.to(device), torch.arange(world.max_new_tokens, device=device)
    table = []
    for p in range(len(world.prompt_ids)):
        x = world.prompt_ids[p:p + 1].to(device).expand(len(prefixes), -1)
        ids = torch.cat([x, prefixes], dim=1)
        attn = torch.cat([world.prompt_mask[p:p + 1].to(device).expand(len(prefixes), -1),
                          torch.ones_like(prefixes)], dim=1)
        with torch.set_grad_enabled(grad), autocast(device):
            logits = model(input_ids=ids, attention_mask=attn, position_ids=_positions(attn)).logits
        next_logp = torch.log_softmax(logits[:, x.shape[1] - 1:].float(), dim=-1)  # (prefixes, depth, vocab)
        token_logp = next_logp[rows, steps, world.completion_ids.to(device)]  # (completions, depth)
        table.append(torch.where(world.completion_mask.to(device).bool(), token_logp, torch.zeros_like(token_logp)).sum(-1))
    return torch.stack(table).cpu()


def kl(log_p, log_q):
    """KL(p || q) per row, from two tables of normalised log-probs over the same completions."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def exact_metrics(log_q, log_sft, log_post, reward):
    """Exact metrics of a distribution log_q (table), averaged over prompts (uniform)."""
    return {
        "reward": (log_q.exp() * reward).sum(-1).mean().item(),
        "kl_policy_sft": kl(log_q, log_sft).mean().item(),
        "kl_posterior_policy": kl(log_post, log_q).mean().item(),
    }


def posterior_table(log_sft, reward, beta):
    """The exact posterior: log_softmax over all completions of log p_sft + r/beta (Z computed, here only)."""
    return torch.log_softmax(log_posterior(log_sft, reward, beta), dim=-1)


def reward_kl_frontier(log_sft, reward, betas):
    """The exact reward-KL frontier: for each beta, the posterior's (E[r], KL(posterior || SFT)).
    No policy can reach more reward at the same KL to the SFT model."""
    points = []
    for beta in betas:
        log_post = posterior_table(log_sft, reward, beta)
        m = exact_metrics(log_post, log_sft, log_post, reward)
        points.append({"beta": beta, "reward": m["reward"], "kl_policy_sft": m["kl_policy_sft"]})
    return points


# ------------------------------------------------------------------------------------------
# 8. Comparing the estimators on equal footing (python brain.py --compare; our protocol)
#    Every method trains from the same SFT prior on the same sample stream: same seed, prompts,
#    proposal schedule, steps, optimizer, learning rate and beta. At fixed steps the policy is
#    frozen, K fresh batches are drawn from the current proposal, and EVERY estimator's gradient
#    is computed on those same batches at that same policy: the trace of the covariance of the
#    K gradients is the estimator's variance, the norm of their mean its signal.
# ------------------------------------------------------------------------------------------
VARIANTS = {  # name -> (method, DPO labels); DPO runs with DPO's beta = the posterior's beta
    "brain": ("brain", "argmax"), "gdcpp": ("gdcpp", "argmax"), "dpg": ("dpg", "argmax"),
    "dpo-argmax": ("dpo", "argmax"), "dpo-bt": ("dpo", "bt"),
}


def estimator_gradients(cfg, policy, proposal, sft, task, variants, batches, generator, device):
    """{variant: (batches, num_params)}: each estimator's gradient on the same fresh sample batches."""
    params = [p for p in policy.parameters() if p.requires_grad]
    shape = (cfg.prompts_per_step, cfg.n_samples)
    grads = {v: [] for v in variants}
    for _ in range(batches):
        seqs, proposal_logp, sft_logp, reward = score_batch(cfg, proposal, sft, task, generator, device)
        coin = draw_coins(cfg.prompts_per_step, generator, device)
        with autocast(device):
            policy_logp = sequence_logprobs(policy, *seqs, task.eos_id).view(shape)
        for v in variants:
            method, labels = VARIANTS[v]
            loss = method_loss(method, policy_logp, proposal_logp.view(shape), sft_logp.view(shape),
                               reward.view(shape), cfg.beta, labels, coin=coin)
            g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads[v].append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, params)]))
    return {v: torch.stack(g).float() for v, g in grads.items()}


def variance_stats(grads):
    """Trace of the covariance of K gradient draws (unbiased), and the norm of their mean."""
    mean = grads.mean(0)
    return {"trace_cov": ((grads - mean) ** 2).sum().item() / (len(grads) - 1), "mean_norm": mean.norm().item()}


def brain_gdcpp_gap(cfg, policy, sft, task, generator, device):
    """||g_BRAIn - g_GDC++|| / ||g_BRAIn|| on one batch, on-policy (proposal = a copy of the
    policy) and off-policy (proposal = SFT). On-policy b_i = 1 and beta_hat_i = 1/n: the two
    estimators coincide (up to float rounding); off-policy they do not."""
    gap = {}
    for name, proposal in (("on_policy", frozen(policy)), ("off_policy_sft", sft)):
        g = estimator_gradients(cfg, policy, proposal, sft, task, ("brain", "gdcpp"), 1, generator, device)
        gap[name] = ((g["brain"] - g["gdcpp"]).norm() / g["brain"].norm().clamp(min=1e-30)).item()
    return gap


def compare(cfg, seeds=3, variants=tuple(VARIANTS), curve_every=20, variance_every=50, variance_batches=16, show=True):
    """Train every variant on identical sample streams for `seeds` seeds; exact metrics along the
    way (every curve_every steps) and estimator variances (every variance_every steps)."""
    cfg.validate()
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
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
        runs.append({"method": "sft", "seed": seed, "final": exact_metrics(log_sft, log_sft, log_post, world.reward_table)})
        runs.append({"method": "posterior", "seed": seed, "final": exact_metrics(log_post, log_sft, log_post, world.reward_table)})
        for v in variants:
            method, labels = VARIANTS[v]
            run_cfg = replace(cfg, method=method, dpo_labels=labels, seed=seed)
            record = {"method": v, "seed": seed, "curve": [], "variance": []}
            probe = torch.Generator(device=device).manual_seed(1_000_003 + seed)  # apart from the training stream
            hook_s = 0.0

            def on_step(step, policy, proposal, info):
                nonlocal hook_s
                t = time.time()
                last = step == cfg.steps
                if step % curve_every == 0 or step % variance_every == 0 or last:
                    m = exact_metrics(enumerate_logprobs(policy, world, device), log_sft, log_post, world.reward_table)
                    if step % curve_every == 0 or last:
                        record["curve"].append({"step": step, **m})
                    if step % variance_every == 0 or last:
                        g = estimator_gradients(run_cfg, policy, proposal, sft, world, variants, variance_batches, probe, device)
                        record["variance"].append({
                            "step": step, "kl_policy_sft": m["kl_policy_sft"],
                            "estimators": {u: variance_stats(gu) for u, gu in g.items()},
                            "brain_vs_gdcpp": brain_gdcpp_gap(run_cfg, policy, sft, world, probe, device)})
                hook_s += time.time() - t

            t0 = time.time()
            train(run_cfg, sft, world, device, on_step)
            record["wall_s"] = time.time() - t0 - hook_s  # training alone, without the measurements
            record["final"] = {k: record["curve"][-1][k] for k in ("reward", "kl_policy_sft", "kl_posterior_policy")}
            record["grad_var"] = record["variance"][-1]["estimators"][v]["trace_cov"]
            runs.append(record)
    result = {"config": asdict(cfg), "seeds": seeds, "variants": list(variants), "device": str(device),
              "variance_batches": variance_batches, "runs": runs}
    if show:
        print_comparison(result)
    return result


def _mean_std(xs):
    xs = torch.tensor(xs, dtype=torch.float64)
    return xs.mean().item(), (xs.std().item() if len(xs) > 1 else 0.0)


def print_comparison(result):
    cfg, runs = result["config"], result["runs"]
    schedule = "SFT (fixed)" if cfg["refresh_every"] == 0 else f"policy, refreshed every {cfg['refresh_every']} steps"
    print(f"\nEqual footing: {cfg['steps']} steps, B = {cfg['prompts_per_step']}, n = {cfg['n_samples']}, "
          f"lr = {cfg['lr']}, beta = {cfg['beta']}, proposal = {schedule}; mean +- std over {result['seeds']} seed(s)")
    print(f"{'method':14s}{'KL(post || .)':>17s}{'KL(. || SFT)':>17s}{'E[r]':>17s}{'grad var':>19s}{'train s':>9s}")
    for name in ["sft"] + result["variants"] + ["posterior"]:
        rs = [r for r in runs if r["method"] == name]
        cells = [" {:7.3f} +- {:5.3f}".format(*_mean_std([r["final"][k] for r in rs]))
                 for k in ("kl_posterior_policy", "kl_policy_sft", "reward")]
        var = " {:9.3g} +- {:7.2g}".format(*_mean_std([r["grad_var"] for r in rs])) if "grad_var" in rs[0] else " " * 19
        wall = f"{_mean_std([r['wall_s'] for r in rs])[0]:9.1f}" if "wall_s" in rs[0] else ""
        print(f"{name:14s}" + "".join(cells) + var + wall)
    print("grad var: trace of the covariance of the method's own gradient over "
          f"{result['variance_batches']} fresh batches, at its final policy.")
    for anchor in [v for v in ("brain",) if v in result["variants"]]:
        rs = [r for r in runs if r["method"] == anchor]
        print(f"\nEstimator variance at the same frozen policies ({anchor}'s checkpoints, mean over seeds):")
        print(f"{'step':>6s}{'KL(. || SFT)':>14s}" + "".join(f"{v:>12s}" for v in result["variants"])
              + f"{'BRAIn/GDC++ gap: on-policy':>30s}{'off-policy':>12s}")
        for i, point in enumerate(rs[0]["variance"]):
            at = [r["variance"][i] for r in rs]
            row = f"{point['step']:6d}{_mean_std([a['kl_policy_sft'] for a in at])[0]:14.3f}"
            row += "".join(f"{_mean_std([a['estimators'][v]['trace_cov'] for a in at])[0]:12.3g}" for v in result["variants"])
            row += f"{max(a['brain_vs_gdcpp']['on_policy'] for a in at):30.1e}"
            row += f"{_mean_std([a['brain_vs_gdcpp']['off_policy_sft'] for a in at])[0]:12.2f}"
            print(row)
    print("gap: ||g_BRAIn - g_GDC++|| / ||g_BRAIn|| on one batch (on-policy: largest over seeds).")
    print("BRAIn, GDC++ and DPG estimate gradients of the same target; DPO's estimate another objective,\n"
          "so their variances are shown for scale, not as a like-for-like comparison.")


# ------------------------------------------------------------------------------------------
# 9. The embedded toy world (not part of the method)
#    Prompts "the <thing> was", completions of up to 4 words from a 10-word vocabulary plus EOS
#    ("."): 1 + 10 + 100 + 1000 + 10000 = 11,111 completions per prompt, few enough to enumerate.
#    A tiny GPT-2 (from a config, no download) learns a corpus of little reviews as the SFT
#    prior; the reward is a sentiment lexicon that understands "not" and "very".
# ------------------------------------------------------------------------------------------
EOS = "."
COMPLETION_WORDS = ["good", "great", "fun", "bad", "awful", "boring", "not", "very", "and", "but"]
SUBJECTS = {"plot": 0.5, "acting": 0.7, "music": 0.8, "ending": 0.3,  # subject -> share of
            "food": 0.6, "service": 0.2, "cast": 0.75, "story": 0.4}  # positive reviews in the corpus
VOCAB = [EOS] + COMPLETION_WORDS + ["the", "was"] + list(SUBJECTS)  # completion tokens first
LEXICON = {"great": 2.0, "good": 1.0, "fun": 1.0, "bad": -1.0, "boring": -1.0, "awful": -2.0}
MAX_NEW_TOKENS = 4  # completion length limit, EOS included
POSITIVE, NEGATIVE = ["good", "great", "fun"], ["bad", "boring", "awful"]


def review_reward(words):
    """Sentiment of a review: the mean lexicon value of its adjectives (0 with none).
    "very" doubles the next adjective, "not" flips and halves it: "not bad" = +0.5,
    "not very good" = -1, "very great" = +4 (the maximum), "good but boring" = 0."""
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


def corpus_review(rng, positive_share):
    """One review from the toy grammar: a phrase, sometimes followed by "and"/"but" + a phrase."""
    def phrase(positive):
        r = rng.random()
        if r < 0.15:  # negated opposite: "not bad" is positive
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


class ToyLM(torch.nn.Module):
    """A tiny GPT-2 whose next token is always a completion token (EOS or one of the 10 words):
    the prompt words get logit -inf, so every completion lies in the enumerable space."""

    def __init__(self, vocab_size, num_completion_tokens, eos_id):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.config = GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=64, n_layer=2, n_head=4,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        self.gpt = GPT2LMHeadModel(self.config)
        blocked = torch.ones(vocab_size, dtype=torch.bool)
        blocked[:num_completion_tokens] = False
        self.register_buffer("blocked", blocked, persistent=False)

    def forward(self, **kwargs):
        out = self.gpt(**kwargs)
        out.logits = out.logits.masked_fill(self.blocked, float("-inf"))
        return out


class ToyWorld:
    """Prompts, reward, the enumerated completion space, and the SFT prior's corpus."""

    def __init__(self, device):
        self.vocab = VOCAB
        self.index = {w: i for i, w in enumerate(VOCAB)}
        self.eos_id = self.pad_id = self.index[EOS]
        self.max_new_tokens = MAX_NEW_TOKENS
        self.subjects = list(SUBJECTS)
        self.prompts = [f"the {s} was" for s in self.subjects]
        self.prompt_ids = torch.tensor([self.encode(p) for p in self.prompts], device=device)
        self.prompt_mask = torch.ones_like(self.prompt_ids)
        # every completion: m words then EOS (m = 0..3), or 4 words; padded with EOS
        k = len(COMPLETION_WORDS) + 1  # k = 11 completion tokens: ids 0..10, EOS is 0, words 1..10
        comps = [[]]
        for length in range(1, MAX_NEW_TOKENS + 1):
            comps += [list(c) for c in _product(range(1, k), length)]
        ids, mask = [], []
        for c in comps:
            seq = c + [self.eos_id] if len(c) < MAX_NEW_TOKENS else c
            ids.append(seq + [self.eos_id] * (MAX_NEW_TOKENS - len(seq)))
            mask.append([1] * len(seq) + [0] * (MAX_NEW_TOKENS - len(seq)))
        self.completion_ids = torch.tensor(ids)
        self.completion_mask = torch.tensor(mask)
        # for exact evaluation: every 3-word prefix (row r = the 3 digits of r, word id = digit + 1),
        # and for each completion and depth d the row of a prefix that starts with the completion's
        # first d words (see enumerate_logprobs). E.g. "good fun ." = ids [1, 3, 0, 0] -> digits
        # [0, 2, 0] -> rows [0, 0, 20, 20] for d = 0..3: row 20 is "good fun good", which starts
        # with "good fun", so its third next-token distribution is p(. | good fun).
        self.prefix_ids = torch.tensor(_product(range(1, k), MAX_NEW_TOKENS - 1))
        digits = (self.completion_ids - 1).clamp(min=0)[:, :MAX_NEW_TOKENS - 1]  # word ids -> 0..9
        place = (k - 1) ** torch.arange(MAX_NEW_TOKENS - 2, -1, -1)
        self.path_rows = torch.stack([(digits[:, :d] * place[:d]).sum(-1) for d in range(MAX_NEW_TOKENS)], dim=1)
        rewards = [review_reward([VOCAB[t] for t in c]) for c in comps]
        self.reward_table = torch.tensor(rewards).expand(len(self.prompts), -1).contiguous()  # (prompts, completions)
        # reward lookup for sampled completions: a dense table indexed by the base-k code of the ids
        self._code = k ** torch.arange(MAX_NEW_TOKENS - 1, -1, -1, device=device)
        lookup = torch.zeros(k ** MAX_NEW_TOKENS)
        lookup[self._encode_completions(self.completion_ids, self.completion_mask, "cpu")] = torch.tensor(rewards)
        self._lookup = lookup.to(device)

    def encode(self, text):
        return [self.index[w] for w in text.split()]

    def decode(self, ids, mask=None):
        ids = ids.tolist() if mask is None else [t for t, m in zip(ids.tolist(), mask.tolist()) if m]
        return " ".join(self.vocab[t] for t in ids)

    def _encode_completions(self, ids, mask, device):
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # canonical: EOS after the end
        return (ids * self._code.to(device)).sum(-1)

    def reward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """r(x, y) of sampled completions (the same for every prompt: a review's sentiment)."""
        return self._lookup[self._encode_completions(completion_ids, completion_mask, completion_ids.device)]

    def new_model(self):
        return ToyLM(len(self.vocab), len(COMPLETION_WORDS) + 1, self.eos_id)

    def corpus(self, size, rng):
        """`size` (prompt, review) pairs as (input_ids, attention_mask, completion_mask)."""
        ids, mask = [], []
        for _ in range(size):
            subject = rng.choice(self.subjects)
            words = corpus_review(rng, SUBJECTS[subject])
            ids.append(self.encode(f"the {subject} was") + [self.index[w] for w in words]
                       + [self.eos_id] * (MAX_NEW_TOKENS - len(words)))
            mask.append([0, 0, 0] + [1] * len(words) + [0] * (MAX_NEW_TOKENS - len(words)))
        ids, cmask = torch.tensor(ids), torch.tensor(mask)
        attn = torch.ones_like(ids)
        attn[:, 3:] = cmask[:, 3:]
        return ids, attn, cmask


def _product(alphabet, length):
    seqs = [[]]
    for _ in range(length):
        seqs = [s + [a] for s in seqs for a in alphabet]
    return seqs


def pretrain_sft(world, cfg, device):
    """The SFT prior: maximum likelihood of the corpus (a fresh batch of reviews every step)."""
    rng = random.Random(cfg.seed)
    model = world.new_model().to(device)
    ids, attn, cmask = (t.to(device) for t in world.corpus(cfg.sft_steps * cfg.sft_batch // 4, rng))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in tqdm(range(cfg.sft_steps), desc="pretrain SFT prior", leave=False, dynamic_ncols=True):
        batch = torch.randint(len(ids), (cfg.sft_batch,), device=device)
        with autocast(device):
            nll = -sequence_logprobs(model, ids[batch], attn[batch], cmask[batch], world.eos_id).mean()
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
    return frozen(model)


# ------------------------------------------------------------------------------------------
# 10. Real models (--model): any Hugging Face causal LM as the prior, a sequence-classification
#     reward model, prompts from a JSON-lines file, checkpoints, several GPUs with torchrun.
#     The same loop and the same losses as above; only the task and the bookkeeping change.
# ------------------------------------------------------------------------------------------
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
    """Rows {"prompt": str, "reference": str or None} from a JSON-lines file, or the built-in examples."""
    if path is None:
        return [{"prompt": p, "reference": None, "line": i + 1} for i, p in enumerate(BUILTIN_PROMPTS)]
    if not os.path.isfile(path):
        raise ValueError(f"--prompts: no such file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {k}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise ValueError(f'{path}: line {k}: no "prompt" field (each line is {{"prompt": ..., "reference": ...}})')
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise ValueError(f"{path}: line {k}: empty prompt")
            ref = obj.get("reference")
            if ref is not None and not isinstance(ref, str):
                raise ValueError(f'{path}: line {k}: "reference" must be a string')
            rows.append({"prompt": obj["prompt"], "reference": ref, "line": k})
    if not rows:
        raise ValueError(f"{path}: no prompts in the file")
    return rows


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_pretrained(model_class, name, what, flag, trust_remote_code=False):
    """A model and its tokenizer from a Hub name or a folder, in fp32, with one-line errors. Weights
    missing from the checkpoint are an error: transformers would fill them with random ones (a
    causal LM loaded as a classifier gets a random head), which must never pass silently."""
    from transformers import AutoTokenizer

    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"{flag} {name!r} is a folder without config.json: not a saved Hugging Face model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model, info = model_class.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=torch.float32,
                                                  output_loading_info=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError...: one line for the user
        raise ValueError(f"cannot load {what} and its tokenizer from {name!r}: {_first_line(e)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"cannot load {what} from {name!r}: the checkpoint lacks {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''} (they would be random)")
    return model, tokenizer


def load_causal_lm(name, trust_remote_code=False):
    """The SFT prior (and the policy's start) and its tokenizer, from a Hub name or a folder."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_pretrained(AutoModelForCausalLM, name, "a causal LM", "--model", trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name!r} has no EOS token: completions could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        if rank_and_world()[0] == 0:
            print(f"note: the tokenizer of {name} has no pad token; using its EOS token {tokenizer.eos_token!r} as pad")
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def eos_ids_of(model, tokenizer):
    """Every id that ends a completion: the generation config's (Llama-3 has two) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
    return sorted(set(ids) | {tokenizer.eos_token_id})


class RewardModel:
    """r(x, y) = one logit of an AutoModelForSequenceClassification on the decoded text x + y,
    re-encoded with the reward model's own tokenizer."""

    def __init__(self, name, label=None, trust_remote_code=False, device="cpu"):
        from transformers import AutoModelForSequenceClassification

        self.model, self.tokenizer = load_pretrained(AutoModelForSequenceClassification, name,
                                                     "a reward model (sequence classification)", "--reward-model",
                                                     trust_remote_code)
        labels = [self.model.config.id2label.get(i, str(i)) for i in range(self.model.config.num_labels)]
        if len(labels) == 1 and label is None:
            self.index = 0
        elif label is None:
            raise ValueError(f"the reward model {name!r} has {len(labels)} labels ({', '.join(labels)}); "
                             "choose the one that means 'good' with --reward-label")
        elif label in labels:
            self.index = labels.index(label)
        elif label.isdigit() and int(label) < len(labels):
            self.index = int(label)
        else:
            raise ValueError(f"--reward-label {label!r} is not a label of {name!r}: {', '.join(labels)}")
        if self.tokenizer.pad_token_id is None:
            if (self.tokenizer.eos_token or self.tokenizer.unk_token) is None:
                raise ValueError(f"the tokenizer of the reward model {name!r} has no pad, EOS or unknown token to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.truncation_side = "left"  # too long: cut the prompt's start, never the completion
        limit = self.tokenizer.model_max_length
        self.max_length = limit if limit and limit < 1_000_000 else None  # transformers' "no limit" is a huge int
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # models that read the last non-pad token
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, texts):
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=self.max_length is not None,
                             max_length=self.max_length)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with autocast(self.device):
            return self.model(**enc).logits[:, self.index].float()


class TextTask:
    """Prompts tokenized once (left-padded) and the reward model, in the form train() expects."""

    def __init__(self, rows, tokenizer, reward_model, max_new_tokens, eos_ids, device):
        self.tokenizer, self.rm = tokenizer, reward_model
        self.max_new_tokens, self.eos_id, self.pad_id = max_new_tokens, eos_ids, tokenizer.pad_token_id
        self.rows = rows
        enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        self.prompt_ids, self.prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def texts(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """[prompt | completion] decoded as one sequence per row (decoding the two apart would lose
        the space between them with SentencePiece tokenizers)."""
        ids = torch.cat([torch.where(prompt_mask.bool(), prompt_ids, self.pad_id),
                         torch.where(completion_mask.bool(), completion_ids, self.pad_id)], dim=1)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def reward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        return self.rm.score(self.texts(prompt_ids, prompt_mask, completion_ids, completion_mask)).to(prompt_ids.device)

    def reference_texts(self, rows):
        """prompt + reference, through the same tokenizer and decoding as the samples."""
        ids = [self.tokenizer(r["prompt"])["input_ids"] + self.tokenizer(r["reference"], add_special_tokens=False)["input_ids"]
               for r in rows]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def check_prompt_lengths(rows, tokenizer, max_new_tokens, context, source):
    """Every prompt is some tokens, and fits the model's context with max_new_tokens more."""
    for row, ids in zip(rows, tokenizer([r["prompt"] for r in rows])["input_ids"]):
        if len(ids) == 0:
            raise ValueError(f"{source}: line {row['line']}: the prompt encodes to no tokens")
        if context and len(ids) + max_new_tokens > context:
            raise ValueError(f"{source}: line {row['line']}: the prompt is {len(ids)} tokens; with --max-new-tokens "
                             f"{max_new_tokens} it exceeds the model's context of {context} tokens")


def model_context(model):
    """The longest sequence the model takes, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


CHECKPOINT_STATE = "trainer_state.pt"


# what a resumed run must share with the run it continues (the rest may change: steps, device, ...)
RESUME_KEYS = ("method", "prompts_per_step", "n_samples", "beta", "lr", "refresh_every", "dpo_labels", "seed",
               "model", "reward_model", "reward_label", "prompts", "max_new_tokens")


def save_checkpoint(out_dir, step, policy, proposal, tokenizer, info, cfg):
    """Write the policy (safetensors) to a temporary folder and rename it, so that a crash never
    leaves a broken checkpoint; then point `latest` at it and drop the older ones. The trainer
    state (optimizer, sample stream, a refreshed proposal, the config) makes --resume exact."""
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=out_dir)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": info["optimizer"].state_dict(), "stream": info["stream"].get_state(),
                "proposal": proposal.state_dict() if cfg.refresh_every else None,
                "config": {k: getattr(cfg, k) for k in RESUME_KEYS}}, os.path.join(tmp, CHECKPOINT_STATE))
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    with open(os.path.join(out_dir, ".latest.tmp"), "w") as f:
        f.write(os.path.basename(final) + "\n")
    os.replace(os.path.join(out_dir, ".latest.tmp"), os.path.join(out_dir, "latest"))
    for old in os.listdir(out_dir):
        if old.startswith("checkpoint-") and old != os.path.basename(final):
            shutil.rmtree(os.path.join(out_dir, old))
    return final


def latest_checkpoint(out_dir):
    path = os.path.join(out_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        folder = os.path.join(out_dir, f.read().strip())
    if not os.path.isfile(os.path.join(folder, CHECKPOINT_STATE)):
        raise ValueError(f"{path} points to {folder}, which is not a complete checkpoint")
    return folder


def load_trainer_state(folder, cfg):
    state = torch.load(os.path.join(folder, CHECKPOINT_STATE), map_location="cpu", weights_only=True)
    changed = [f"{k} ({state['config'].get(k)!r} -> {getattr(cfg, k)!r})" for k in RESUME_KEYS
               if state["config"].get(k) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"--resume with other settings than the checkpoint's: {', '.join(changed)}")
    return state


@torch.no_grad()
def evaluate_text(policy, sft, task, rows, cfg, device):
    """Held-out prompts, cfg.eval_samples completions each from the policy and from the SFT model:
    mean rewards, win rates judged by the reward model (ties count half), and a Monte Carlo
    KL(policy || SFT) = E_policy[log q(y|x) - log p(y|x)] from the policy's own samples."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    enc = task.tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    k = cfg.eval_samples
    x, xm = enc["input_ids"].to(device).repeat_interleave(k, 0), enc["attention_mask"].to(device).repeat_interleave(k, 0)
    with autocast(device):
        y, ym, policy_logp = sample_completions(policy, x, xm, task.max_new_tokens, task.eos_id, task.pad_id, generator=gen)
        y0, ym0, _ = sample_completions(sft, x, xm, task.max_new_tokens, task.eos_id, task.pad_id, generator=gen)
        sft_logp = sequence_logprobs(sft, *join(x, xm, y, ym), task.eos_id)
    r_policy, r_sft = task.reward(x, xm, y, ym), task.reward(x, xm, y0, ym0)
    wins = lambda a, b: ((a > b).float() + 0.5 * (a == b).float()).mean().item()
    out = {"prompts": len(rows), "samples_per_prompt": k,
           "reward_policy": r_policy.mean().item(), "reward_sft": r_sft.mean().item(),
           "win_rate_vs_sft": wins(r_policy, r_sft),
           "kl_policy_sft_mc": (policy_logp - sft_logp).mean().item()}
    with_ref = [i for i, r in enumerate(rows) if r["reference"]]
    if with_ref:
        r_ref = task.rm.score(task.reference_texts([rows[i] for i in with_ref])).to(device)
        r_pol = r_policy.view(len(rows), k)[with_ref]
        out["win_rate_vs_reference"] = wins(r_pol, r_ref[:, None].expand_as(r_pol))
        out["reward_reference"] = r_ref.mean().item()
    out["examples"] = [{"prompt": rows[i // k]["prompt"], "text": t}
                       for i, t in enumerate(task.texts(x, xm, y, ym)) if i % k == 0][:4]
    return out


def setup_distributed(cfg):
    """torchrun sets WORLD_SIZE: then one process per device, NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return pick_device(cfg.device)
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_model(cfg):
    """--model: train a Hugging Face causal LM against a reward model, checkpoint, evaluate."""
    cfg.validate()
    device = setup_distributed(cfg)
    rank, world = rank_and_world()
    if cfg.prompts_per_step % world:
        raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of processes ({world})")
    # check everything before anything is written
    rows = load_prompts(cfg.prompts)
    out_dir = cfg.output_dir
    resume_from = latest_checkpoint(out_dir) if out_dir and os.path.isdir(out_dir) else None
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if cfg.resume and resume_from is None:
        raise ValueError(f"--resume: no checkpoint in {out_dir}")
    if resume_from and not cfg.resume:
        raise ValueError(f"{out_dir} already holds a checkpoint; pass --resume to continue it, or choose another --output-dir")
    if not resume_from and metrics_path and os.path.exists(metrics_path):
        raise ValueError(f"{out_dir} holds a metrics.jsonl from another run; choose another --output-dir")
    state = load_trainer_state(resume_from, cfg) if resume_from else None
    seed_everything(cfg.seed)
    import transformers

    transformers.logging.set_verbosity_error()  # missing weights are our errors (see above), not warnings
    transformers.logging.disable_progress_bar()
    sft, tokenizer = load_causal_lm(cfg.model, cfg.trust_remote_code)
    rm = RewardModel(cfg.reward_model, cfg.reward_label, cfg.trust_remote_code, device)
    held = max(1, len(rows) // 5)  # the last fifth of the prompts is held out for evaluation
    train_rows, eval_rows = (rows[:-held], rows[-held:]) if len(rows) > 1 else (rows, rows)
    check_prompt_lengths(rows, tokenizer, cfg.max_new_tokens, model_context(sft), cfg.prompts or "built-in prompts")
    task = TextTask(train_rows, tokenizer, rm, cfg.max_new_tokens, eos_ids_of(sft, tokenizer), device)
    policy = load_causal_lm(resume_from, cfg.trust_remote_code)[0].to(device) if resume_from else None
    sft = frozen(sft.to(device))
    if out_dir and rank == 0:  # from here on we write: a new folder, or a checkpoint's own
        os.makedirs(out_dir, exist_ok=True)
        for stale in os.listdir(out_dir):  # a crash's half-written checkpoint
            if stale.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(out_dir, stale))
        if state and os.path.exists(metrics_path):  # drop lines logged after the checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= state["step"]]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    t0 = time.time()

    def on_step(step, policy, proposal, info):
        if rank != 0 or info["loss"] is None or not out_dir:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "loss": info["loss"].item(), "reward": info["reward"].item(),
                                "seconds": round(time.time() - t0, 3)}) + "\n")
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save_checkpoint(out_dir, step, policy, proposal, tokenizer, info, cfg)

    if rank == 0:
        start = state["step"] if state else 0
        held_out = f"held out: {len(eval_rows)}" if len(rows) > 1 else "one prompt: evaluated on it, none held out"
        print(f"training {cfg.model} with {cfg.method} on {len(train_rows)} prompts "
              f"({held_out}), steps {start} -> {cfg.steps}, {world} process(es) on {device}")
    policy = train(cfg, sft, task, device, on_step, policy=policy, state=state)
    results = None
    if rank == 0:
        results = evaluate_text(policy, sft, task, eval_rows, cfg, device)
        results["config"] = asdict(cfg)
        results["train_s"] = round(time.time() - t0, 2)
        print_text_results(results)
        if out_dir:
            with open(os.path.join(out_dir, "eval.json"), "w") as f:
                json.dump(results, f, indent=2)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


def print_text_results(res):
    print(f"\nHeld-out evaluation ({res['prompts']} prompts x {res['samples_per_prompt']} samples, judged by the reward model)")
    print(f"  mean reward   policy {res['reward_policy']:+.3f}   SFT {res['reward_sft']:+.3f}")
    print(f"  win rate of the policy over the SFT model: {res['win_rate_vs_sft']:.1%}")
    if "win_rate_vs_reference" in res:
        print(f"  win rate of the policy over the references: {res['win_rate_vs_reference']:.1%}")
    print(f"  KL(policy || SFT), Monte Carlo: {res['kl_policy_sft_mc']:.3f} nats")
    for ex in res["examples"]:
        print(f"  {ex['prompt']!r} -> {ex['text']!r}")


# ------------------------------------------------------------------------------------------
# 11. Benchmark (python brain.py --bench): is a BRAIn step as cheap as fine-tuning on the samples?
#     Ratios on the same machine, so that machine noise cancels.
# ------------------------------------------------------------------------------------------
def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def bench_model(name, model, prompt_ids, B, n, T, device, reward_fn, steps=20, warmup=3):
    """One row of the benchmark for `model` (a Hugging Face causal LM) with B prompts x n samples."""
    model = model.to(device).eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    N, P = B * n, prompt_ids.shape[1]
    x = prompt_ids.to(device).repeat_interleave(n, 0)
    xm = torch.ones_like(x)
    # 1. one optimizer step on a fixed batch: BRAIn (scores precomputed) against plain cross-entropy
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad(), autocast(device):
        y, _, proposal_logp = sample_completions(model, x, xm, T, eos_token_id=-1, generator=g)  # T tokens each
    ids, attn, cmask = join(x, xm, y, torch.ones_like(y))
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
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        opt.step()

    times = {"brain": [], "ce": []}
    for i in tqdm(range(warmup + steps), desc=f"bench {name}", leave=False):
        pair = (("brain", brain_step), ("ce", ce_step))
        for key, fn in pair if i % 2 else pair[::-1]:  # interleaved, in turns: drift hits both alike
            t = _timed(fn, device)
            if i >= warmup:
                times[key].append(t)
    # 2. sampling: the loop's sampler against a bare generate() of the same shape and settings
    def ours():
        sample_completions(model, x, xm, T, eos_token_id=-1, generator=g)

    def bare():
        model.generate(input_ids=x, attention_mask=xm, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       max_new_tokens=T, min_new_tokens=T, pad_token_id=0)

    sampling = {"ours": [], "generate": []}
    with torch.no_grad(), autocast(device):
        for i in range(2 + 5):
            for key, fn in (("ours", ours), ("generate", bare)):
                t = _timed(fn, device)
                if i >= 2:
                    sampling[key].append(t)
    # 3. where a training step's time goes (proposal = a copy of the policy, so the SFT model is scored too)
    sft = frozen(model)
    phases = {"sampling": [], "scoring": [], "update": []}
    for i in range(2 + 5):
        with torch.no_grad(), autocast(device):
            out = {}
            t_sample = _timed(lambda: out.update(s=sample_completions(model, x, xm, T, -1, generator=g)), device)
            yy, yym, lq = out["s"]
            seqs = join(x, xm, yy, yym)
            t_score = _timed(lambda: out.update(sft=sequence_logprobs(sft, *seqs, -1), r=reward_fn(x, xm, yy, yym)), device)

        def update():
            opt.zero_grad(set_to_none=True)
            backward_policy_loss(model, seqs, -1, lambda lp: method_loss("brain", lp.view(B, n), lq.view(B, n),
                                 out["sft"].view(B, n), out["r"].view(B, n), 1.0), 0, device)
            opt.step()

        t_update = _timed(update, device)
        if i >= 2:
            for k, t in zip(phases, (t_sample, t_score, t_update)):
                phases[k].append(t)
    step_s = {k: _median(v) for k, v in phases.items()}
    total = sum(step_s.values())
    row = {
        "model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "B": B, "n": n,
        "prompt_tokens": P, "new_tokens": T,
        "brain_step_s": _median(times["brain"]), "ce_step_s": _median(times["ce"]),
        "sampler_tok_s": N * T / _median(sampling["ours"]), "generate_tok_s": N * T / _median(sampling["generate"]),
        "share": {k: v / total for k, v in step_s.items()}, "train_step_s": total,
    }
    row["step_ratio"] = row["brain_step_s"] / row["ce_step_s"]
    row["sampler_ratio"] = row["sampler_tok_s"] / row["generate_tok_s"]
    del sft
    return row


def bench(cfg, show=True):
    """The benchmark table: the embedded model and a GPT-2-small-sized model built from a config."""
    import resource

    from transformers import GPT2Config, GPT2LMHeadModel

    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    world = ToyWorld(device)
    rows = [bench_model("embedded GPT-2 (toy)", world.new_model().gpt, world.prompt_ids[torch.arange(16) % 8], 16, 8,
                        MAX_NEW_TOKENS, device, lambda x, xm, y, ym: world.reward(x, xm, y.clamp(max=10), ym))]
    # GPT-2 small on a CPU takes seconds a step: a smaller batch there (the ratios are what count)
    big_B, big_n, big_P, big_T = (16, 8, 16, 64) if device.type == "cuda" else (2, 2, 8, 16)
    gpt2 = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, 768 wide, 124M parameters, random weights
    prompts = torch.randint(0, gpt2.config.vocab_size, (big_B, big_P))
    token_score = torch.randn(gpt2.config.vocab_size, device=device)  # a synthetic reward: mean per-token score
    rows.append(bench_model("GPT-2-small-sized", gpt2, prompts, big_B, big_n, big_T, device,
                            lambda x, xm, y, ym: token_score[y].mean(-1)))
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if show:
        print(f"\nBenchmark on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads); medians")
        print(f"{'model':24s}{'params':>8s}{'B x n':>8s}{'tokens':>8s}{'BRAIn step':>12s}{'CE step':>10s}{'ratio':>7s}"
              f"{'sampler tok/s':>15s}{'generate':>10s}{'ratio':>7s}   step: sample / score / update")
        for r in rows:
            sh = r["share"]
            print(f"{r['model']:24s}{r['params_m']:7.1f}M{r['B']:>4d} x{r['n']:<2d}{r['prompt_tokens']:>4d}+{r['new_tokens']:<3d}"
                  f"{r['brain_step_s'] * 1e3:10.1f}ms{r['ce_step_s'] * 1e3:8.1f}ms{r['step_ratio']:7.3f}"
                  f"{r['sampler_tok_s']:15.0f}{r['generate_tok_s']:10.0f}{r['sampler_ratio']:7.3f}"
                  f"   {sh['sampling']:.0%} / {sh['scoring']:.0%} / {sh['update']:.0%} of {r['train_step_s'] * 1e3:.0f} ms")
        print(f"peak memory: {result['peak_rss_mb']:.0f} MB RSS" +
              (f", {result['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in result else ""))
        print("ratio (step): BRAIn step / plain cross-entropy step on the same tokens; ratio (sampler): "
              "our sampler's tokens/s / generate()'s.")
    return result


# ------------------------------------------------------------------------------------------
# 12. The command line
# ------------------------------------------------------------------------------------------
def show_samples(world, model, device, title, per_prompt=2, prompts=(0, 5)):
    print(title)
    with torch.no_grad(), autocast(device):
        for p in prompts:
            x = world.prompt_ids[p:p + 1].expand(per_prompt, -1)
            xm = world.prompt_mask[p:p + 1].expand(per_prompt, -1)
            y, ym, _ = sample_completions(model, x, xm, world.max_new_tokens, world.eos_id)
            r = world.reward(x, xm, y, ym)
            for i in range(per_prompt):
                print(f"  {world.prompts[p]} | {world.decode(y[i], ym[i]):<24s} r = {r[i].item():+.1f}")


def run(cfg, show=True):
    """The embedded default: pretrain the SFT prior, train the policy, evaluate exactly."""
    cfg.validate()
    t0 = time.time()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    world = ToyWorld(device)
    sft = pretrain_sft(world, cfg, device)
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
        print_table(results, cfg)
        show_samples(world, sft, device, "\nSFT samples:")
        show_samples(world, policy, device, f"Policy samples ({cfg.method}):")
    return results


def print_table(results, cfg):
    print(f"\nExact metrics on the embedded world (beta = {cfg.beta}, {cfg.steps} steps, "
          f"B = {cfg.prompts_per_step}, n = {cfg.n_samples}, {results['wall_s']:.1f} s on {results['device']})")
    print(f"{'':22s}{'E[r]':>8s}{'KL(. || SFT)':>15s}{'KL(posterior || .)':>21s}")
    for key, label in (("sft", "SFT prior"), ("policy", f"policy ({cfg.method})"), ("posterior", "posterior (target)")):
        m = results[key]
        print(f"{label:22s}{m['reward']:+8.3f}{m['kl_policy_sft']:15.3f}{m['kl_posterior_policy']:21.3f}")


def parse_args(argv=None):
    d = Config()
    p = argparse.ArgumentParser(prog="brain.py", description="BRAIn (Pandey et al., ICML 2024): the embedded toy world by default (offline, CPU or CUDA); --model for real models.")
    p.add_argument("--method", default=d.method, help=f"estimator: {', '.join(METHODS)} (default {d.method})")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step, help="B, prompts per step")
    p.add_argument("--n-samples", type=int, default=d.n_samples, help="n, samples per prompt (>= 2)")
    p.add_argument("--beta", type=float, default=d.beta, help="posterior temperature (> 0)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default {d.lr} on the embedded world, 1e-5 with --model)")
    p.add_argument("--refresh-every", type=int, default=d.refresh_every,
                   help="proposal := policy every K steps (0: always sample from the SFT model)")
    p.add_argument("--dpo-labels", default=d.dpo_labels, help="DPO pairs: argmax or bt")
    p.add_argument("--seed", type=int, default=d.seed, help="the one random seed")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--sft-steps", type=int, default=d.sft_steps, help="SFT pretraining steps of the toy prior")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch,
                   help="samples per forward/backward, for memory (0: all B*n at once)")
    g = p.add_argument_group("real models (any Hugging Face causal LM; torchrun for several GPUs)")
    g.add_argument("--model", metavar="NAME_OR_DIR", help="causal LM: the SFT prior and the policy's start")
    g.add_argument("--reward-model", metavar="NAME_OR_DIR", help="sequence-classification reward model")
    g.add_argument("--reward-label", help="the reward model's label whose logit is the reward (if it has several)")
    g.add_argument("--prompts", metavar="FILE.jsonl", help='one {"prompt": ..., "reference": ...} per line')
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="completion length limit")
    g.add_argument("--output-dir", help="checkpoints, metrics.jsonl and eval.json go here")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every K steps (0: at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    g.add_argument("--eval-samples", type=int, default=d.eval_samples, help="completions per held-out prompt")
    g.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model (off by default)")
    p.add_argument("--json", metavar="PATH", help="write the final metrics (with --compare: every run) as JSON")
    p.add_argument("--compare", action="store_true",
                   help="train every method on identical sample streams and compare (see --methods, --seeds)")
    p.add_argument("--methods", default=",".join(VARIANTS), help="with --compare: comma-separated, from "
                   + ", ".join(VARIANTS) + " (dpg is BRAIn without the self-normalised baseline)")
    p.add_argument("--bench", action="store_true",
                   help="benchmark a BRAIn step against plain fine-tuning, and the sampler against generate()")
    p.add_argument("--seeds", type=int, default=3, help="with --compare: seeds seed, seed+1, ...")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in VARIANTS]
    if unknown or not args.methods:
        p.error(f"unknown method(s) in --methods: {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.compare and args.model:
        p.error("--compare runs on the embedded world (exact metrics); it does not take --model")
    if args.bench and (args.compare or args.model):
        p.error("--bench runs alone (it builds its own models); drop --compare / --model")
    if not args.model and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("several processes (torchrun) are for --model runs; the embedded world runs in one")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json: folder {os.path.dirname(os.path.abspath(args.json))} does not exist")
    lr = args.lr if args.lr is not None else (1e-5 if args.model else d.lr)  # a real LM needs a gentler step
    cfg = Config(method=args.method, steps=args.steps, prompts_per_step=args.prompts_per_step,
                 n_samples=args.n_samples, beta=args.beta, lr=lr, refresh_every=args.refresh_every,
                 dpo_labels=args.dpo_labels, seed=args.seed, device=args.device, sft_steps=args.sft_steps,
                 micro_batch=args.micro_batch, model=args.model, reward_model=args.reward_model,
                 reward_label=args.reward_label, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                 output_dir=args.output_dir, save_every=args.save_every, resume=args.resume,
                 eval_samples=args.eval_samples, trust_remote_code=args.trust_remote_code)
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    try:
        if args.bench:
            results = bench(cfg)
        elif cfg.model:
            results = run_model(cfg)
        else:
            results = compare(cfg, args.seeds, args.methods) if args.compare else run(cfg)
    except ValueError as e:  # our own checks (bad data, NaN rewards): one line, no traceback
        print(f"brain.py: error: {e}", file=sys.stderr)
        return 1
    if args.json and results is not None:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nmetrics written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
