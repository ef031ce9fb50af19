"""BRAIn: Bayesian Reward-conditioned Amortized Inference, a minimal reference.

Pandey et al., "BRAIn: Bayesian Reward-conditioned Amortized Inference for natural language
generation from feedback", ICML 2024 (arXiv 2402.02479). One step of the method:

    x       = B prompts;   y_1..y_n ~ q'(.|x)                  # the proposal: SFT model or policy
    log p~  = log p_sft(y_i|x) + r(x, y_i) / beta              # 1. the posterior, unnormalised
    alpha^  = softmax_i(log p~ - log q'(y_i|x))                # 2. the targets
    beta^   = softmax_i(log q_theta(y_i|x) - log q'(y_i|x))    # 3. the baseline's weights
    loss    = -sum_i (alpha^_i - beta^_i) log q_theta(y_i|x)   # 4. alpha^, beta^ held constant
    loss.backward(); optimizer.step()                          #  (its grad: grad KL(alpha^||beta^))

Part I: the method in the paper's order, the training loop, the toy world and its exact
evaluation, the default run. Its code uses nothing of Part II (--compare, --model, --bench, the
command line; a test checks), which a reader may skip. Tags say whose each choice is: (paper),
(authors' code: BRAIn's authors' public toy code), (ours). A teaching reference, not a library.

    python brain.py          # BRAIn on the embedded world: offline, CPU, seconds
    python brain.py --help   # every flag (--compare, --model, --bench), with its default
"""

import copy
import itertools
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

METHODS = ("brain", "dpg", "gdcpp", "dpo", "rloo")


def arg(default, help):  # a Config field with its command-line help
    return field(default=default, metadata={"help": help})


def need(ok, message):  # a check on the settings: one clear line
    if not ok:
        raise ValueError(message)


@dataclass
class Config:
    """Every hyperparameter, once: field n_samples is flag --n-samples (Part II adds options)."""

    # the method (paper §4-§5; K > 0 and "bt" labels: ours)
    method: str = arg("brain", "the estimator that trains the policy: " + ", ".join(METHODS))
    beta: float = arg(1.0, "posterior temperature (> 0): p(G=1|x,y) is proportional to e^(r/beta)")
    n_samples: int = arg(8, "n: completions sampled per prompt (>= 2)")
    refresh_every: int | None = arg(None, "K: q' := the policy every K steps (0: the SFT model)")
    dpo_labels: str = arg("argmax", "DPO pairs: argmax (best vs worst), bt (Bradley-Terry coin)")
    # training (ours)
    steps: int = arg(200, "optimizer steps")
    prompts_per_step: int = arg(16, "B: prompts per step, drawn uniformly with replacement")
    lr: float | None = arg(None, "Adam learning rate")
    micro_batch: int = arg(0, "samples per pass, whole prompts (0: all; --model on a CPU: to fit)")
    seed: int = arg(0, "the one seed: corpus, SFT pretraining, prompts, samples")
    device: str = arg("auto", "auto (CUDA when there is a GPU), cpu or cuda")
    # the embedded world
    sft_steps: int = arg(300, "Adam steps that pretrain the toy SFT prior")
    sft_batch: int = arg(256, "sequences per SFT pretraining step")

    def __post_init__(self):  # the defaults of lr and K (a caller may set its own)
        self.lr = 1e-3 if self.lr is None else self.lr
        if self.refresh_every is None:  # RLOO learns from the policy's own samples only
            self.refresh_every = 1 if self.method == "rloo" else 0

    def validate(self):
        """One clear message for the first bad option, before any work starts."""
        methods = ", ".join(METHODS)
        need(self.method in METHODS, f"unknown method {self.method!r}; choose one of {methods}")
        need(0 < self.beta < math.inf, f"beta must be a finite number > 0, got {self.beta}")
        need(0 < self.lr <= 1, f"lr must be a number in (0, 1], got {self.lr}")
        least = dict(n_samples=2, steps=1, prompts_per_step=1, micro_batch=0, refresh_every=0)
        for name, low in dict(least, sft_steps=1, sft_batch=1).items():
            need(getattr(self, name) >= low, f"{name} must be >= {low}, got {getattr(self, name)}")
        need(self.prompts_per_step * self.n_samples <= 10**6, "B * n is over 1,000,000 samples")
        labels, device, K = self.dpo_labels, self.device, self.refresh_every
        need(self.method != "rloo" or K == 1, f"rloo learns on-policy: --refresh-every 1, not {K}")
        need(labels in ("argmax", "bt"), f"dpo_labels: argmax or bt, not {labels!r}")
        need(device in ("auto", "cpu", "cuda"), f"device: auto, cpu or cuda, not {device!r}")
        need(device != "cuda" or torch.cuda.is_available(), "--device cuda, but torch sees no GPU")
        need(0 <= self.seed < 2**63, f"seed must be an integer in [0, 2**63), got {self.seed}")
        return self


# [I.1] The reward-conditioned posterior (paper §4) ------------------------------------------------
def log_goodness(reward, beta):
    """log p(G=1 | x, y) = r(x, y) / beta up to a constant: (paper) the Bradley-Terry goodness;
    (ours) a swappable one-line function. Any log-likelihood of "good" gives a valid posterior:
    log 1[y satisfies c] gives GDC's target (each prompt then needs a sample that satisfies c)."""
    return reward / beta


def log_posterior(sft_logp, reward, beta):
    """Unnormalised log p(y | x, G=1) = log p_sft(y|x) + log p(G=1|x,y) (paper §4, Bayes' rule);
    with r/beta, the maximiser of E_q[r] - beta KL(q || p_sft) (PPO's optimum). No log Z(x)."""
    return sft_logp + log_goodness(reward, beta)


# [I.2] Self-normalised importance weights (paper §4) ----------------------------------------------
#    For the n samples y_1..y_n ~ q'(.|x) of one prompt, in log space:
#      log alpha_i = log p~(y_i|x, G=1) - log q'(y_i|x)    alpha_hat = softmax_i(log alpha)
#      log b_i     = log q_theta(y_i|x) - log q'(y_i|x)    beta_hat  = softmax_i(log b)
#    Scores are (B, n) tensors: B prompts, n samples each; the softmax runs over the n samples.
#    (beta_hat is the paper's name for the policy's weights; it has nothing to do with beta.)
def alpha_hat(target_logp, proposal_logp):  # the targets, (B, n)
    return torch.softmax(target_logp - proposal_logp, dim=-1)


def beta_hat(policy_logp, proposal_logp):  # the policy's own weights, (B, n)
    return torch.softmax(policy_logp - proposal_logp, dim=-1)


def check_scores(**named):
    """The losses' inputs (ours): tensors of one shape (B, n), B prompts with n >= 2 samples each,
    finite; target_logp may hold -inf (a hard constraint: the sample is never good)."""
    shapes = {
        k: tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for k, x in named.items()
    }
    for name, x in named.items():
        ok = torch.is_tensor(x) and x.dim() == 2 and x.shape[-1] >= 2
        need(ok, f"{name} must have shape (B, n), n >= 2 samples each; got {shapes[name]}")
        bad = x.isnan() | (x == math.inf) | ((x == -math.inf) & (name != "target_logp"))
        need(not bad.any(), f"{name} contains NaN or inf")
    need(len(set(shapes.values())) == 1, f"shapes differ: {shapes}")


# [I.3] The BRAIn update and its self-normalised baseline (paper §4, Theorem 4.2; authors' code) ---
#    Weights w_i on grad log q_theta(y_i): BRAIn's are alpha_hat_i - beta_hat_i, where the baseline
#    sum_i beta_hat_i grad log q_theta(y_i) estimates E_q[grad log q_theta] = 0 on the same samples.
def surrogate_loss(weights, policy_logp):
    """-sum_i w_i log q_theta(y_i), averaged over prompts, w held constant: its gradient is the
    estimator's (negated, for descent). Its value is no divergence and means nothing alone."""
    return -(weights.detach() * policy_logp).sum(-1).mean()


def brain_loss(policy_logp, proposal_logp, target_logp):
    """(authors' code) Ascends sum_i (alpha_hat_i - beta_hat_i) grad log q_theta(y_i). (paper,
    Theorem 4.2) Biased for grad KL(posterior || q_theta), unbiased for the gradient of the
    self-normalised KL E[KL(alpha_hat || beta_hat)] (0 iff q_theta is the posterior)."""
    check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    target = alpha_hat(target_logp, proposal_logp)
    baseline = beta_hat(policy_logp, proposal_logp)  # the self-normalised baseline's weights
    return surrogate_loss(target - baseline, policy_logp)


def self_normalised_kl(policy_logp, proposal_logp, target_logp):
    """KL(alpha_hat || beta_hat(theta)), averaged over prompts, alpha_hat held constant (ours: the
    update as a divergence). Its gradient is brain_loss's, since grad log beta_hat_i =
    grad log q_theta(y_i) - sum_j beta_hat_j grad log q_theta(y_j) and sum_i alpha_hat_i = 1."""
    log_a = torch.log_softmax((target_logp - proposal_logp).detach(), -1)  # log alpha_hat
    log_b = torch.log_softmax(policy_logp - proposal_logp.detach(), -1)  # log beta_hat
    kl_terms = log_a.exp() * (log_a - log_b)  # where alpha_hat_i = 0 exactly, the term is 0
    return torch.where(log_a == -math.inf, 0.0, kl_terms).sum(-1).mean()


# [I.4] Connections (paper §5). The same samples, the same surrogate and the same alpha_hat; only
#    the baseline differs (the weights on log q_theta(y_i)):
#      DPG    alpha_hat_i                (no baseline; Khalifa et al. 2021)
#      GDC++  alpha_hat_i - b_i / n      (unnormalised baseline; Korbak et al. 2022)
#      BRAIn  alpha_hat_i - beta_hat_i   (self-normalised baseline)
#    DPO and RLOO, below, have other targets; every loss value is its own unit.
def target_weights(proposal_logp, target_logp, log_z=None):
    """alpha_hat (Z estimated from the same samples), or, when log Z(x) is given (known, or a
    running estimate), the plain importance weights exp(log p~ - log Z - log q') / n."""
    if log_z is None:
        return alpha_hat(target_logp, proposal_logp)
    log_z = torch.as_tensor(log_z, dtype=target_logp.dtype, device=target_logp.device)
    ok = log_z.dim() == 0 or log_z.shape == target_logp.shape[:1]
    need(ok, f"log_z must be a scalar or have shape (B,), got {tuple(log_z.shape)}")
    need(torch.isfinite(log_z).all(), "log_z contains NaN or inf")
    log_z = log_z[:, None] if log_z.dim() == 1 else log_z
    return torch.exp(target_logp - log_z - proposal_logp) / target_logp.shape[-1]


def dpg_loss(policy_logp, proposal_logp, target_logp, log_z=None):
    """DPG, "BRAIn without baseline": weights alpha_hat, or the plain importance weights when
    log_z is given (Khalifa et al., ICLR 2021, §2.3; authors' code)."""
    check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    target = target_weights(proposal_logp, target_logp, log_z)
    return surrogate_loss(target, policy_logp)


def gdcpp_loss(policy_logp, proposal_logp, target_logp, log_z=None):
    """GDC++: weights alpha_hat_i - b_i / n, b_i = q_theta(y_i) / q'(y_i) (Korbak et al. 2022,
    Alg. 1; authors' code). On-policy b_i = 1 = n beta_hat_i: it equals BRAIn; off-policy not."""
    check_scores(policy_logp=policy_logp, proposal_logp=proposal_logp, target_logp=target_logp)
    target = target_weights(proposal_logp, target_logp, log_z)
    baseline = torch.exp(policy_logp - proposal_logp) / policy_logp.shape[-1]  # b_i / n
    return surrogate_loss(target - baseline, policy_logp)


def dpo_loss(policy_logp, ref_logp, reward, beta=1.0, labels="argmax", coin=None):
    """DPO (Rafailov et al. 2023), one pair (y_w, y_l) per prompt: L = -log sigmoid(beta *
    [(log q(y_w) - log ref(y_w)) - (log q(y_l) - log ref(y_l))]). labels="argmax": the best and
    the worst of the n samples; (paper §5) with n = 2, ref = proposal = SFT and beta = 1 this is
    BRAIn with a one-hot on the winner for alpha_hat, which over-optimises. labels="bt" (ours):
    y_1 beats y_2 when coin < sigmoid(r_1 - r_2); DPO's optimum is then ref * exp(r / beta)."""
    check_scores(policy_logp=policy_logp, ref_logp=ref_logp, reward=reward)
    if not 0 < beta < math.inf or labels not in ("argmax", "bt"):
        raise ValueError(f"DPO needs beta > 0 and labels argmax or bt, got {beta}, {labels!r}")
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


def rloo_loss(policy_logp, sft_logp, reward, beta):
    """RLOO, RL on the same objective (ours; the paper compares with PPO): REINFORCE with a
    leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024) on n ON-POLICY samples. It
    climbs J(q) = E_q[r] - beta KL(q || p_sft) = -beta KL(q || posterior) + beta log Z: BRAIn's
    optimum through the reverse (mode-seeking) KL. With R_i = r_i - beta (log q(y_i) - log
    p_sft(y_i)) and A_i = R_i - mean_{j != i} R_j held constant, it ascends (1/n) sum_i A_i
    grad log q(y_i), unbiased: a baseline of the other samples adds E[b grad log q(y_i)] = 0."""
    check_scores(policy_logp=policy_logp, sft_logp=sft_logp, reward=reward)
    n = policy_logp.shape[-1]
    R = reward - beta * (policy_logp.detach() - sft_logp)  # the KL-regularised reward
    A = (R - (R.sum(-1, keepdim=True) - R) / (n - 1)).detach()  # leave-one-out advantage
    return -(A * policy_logp).mean(-1).mean()


def method_loss(
    method, policy_logp, proposal_logp, sft_logp, reward, beta, labels="argmax", coin=None
):
    """The loss of one method on (B, n) scores. DPO-sft's reference is the SFT model and its scale
    the posterior's beta (ours), so that "bt" targets the same posterior; the paper's n = 2 case
    is beta = 1. RLOO's samples must be the policy's own (proposal = policy)."""
    check_scores(sft_logp=sft_logp, reward=reward)  # a reward is finite; log_goodness may be -inf
    if method == "dpo":
        return dpo_loss(policy_logp, sft_logp, reward, beta, labels, coin)
    if method == "rloo":
        return rloo_loss(policy_logp, sft_logp, reward, beta)
    losses = {"brain": brain_loss, "dpg": dpg_loss, "gdcpp": gdcpp_loss}
    need(method in losses, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return losses[method](policy_logp, proposal_logp, log_posterior(sft_logp, reward, beta))


# [I.5] Language-model plumbing: sequence log-probs and exact sampling -----------------------------
#    Sequences are [prompt | completion]; prompts are left-padded, completions right-padded.
def positions(attention_mask):  # position ids that skip left padding
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logprobs(model, input_ids, attention_mask, completion_mask, eos_token_id=None):
    """log q(y|x) = sum_t log q(y_t | x, y_<t) over the completion's tokens, in fp32 (as the DPO
    reference code), masking prompt, padding and all after the first EOS, which counts (ours).
    Inputs (N, L); completion_mask is 1 on completion tokens; eos_token_id: an id or a list."""
    need(not completion_mask[:, 0].any(), "completion_mask[:, 0] must be 0: no prediction there")
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)
    ).logits
    logits = logits[:, :-1].float()  # position t predicts token t+1
    targets = input_ids[:, 1:]
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    mask = completion_mask[:, 1:].bool()
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    if eos is not None:
        is_eos = torch.isin(targets, torch.as_tensor(eos, device=input_ids.device)) & mask
        mask = mask & ((is_eos.long().cumsum(-1) - is_eos.long()) == 0)  # none after the first EOS
    return torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(-1)


@torch.no_grad()
def sample_completions(
    model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id=None, uniforms=None
):
    """Draw one completion per row exactly from the model: temperature 1, no top-k or top-p (ours:
    truncation would falsify the importance weights), with the KV cache. (N, P) left-padded
    prompts -> completions (N, T), their mask (1 up to and including the first EOS), log q(y|x)
    (N,) in fp32. Token t of row i inverts the CDF at uniforms[i, t] (default: torch.rand)."""
    N, device = prompt_ids.shape[0], prompt_ids.device
    eos = torch.as_tensor(eos_token_id, device=device).view(-1)  # an id, or a list (Llama-3)
    pad = int(eos[0]) if pad_token_id is None else pad_token_id
    if uniforms is None:
        uniforms = torch.rand(N, max_new_tokens, device=device)
    attn, pos = prompt_mask.long(), positions(prompt_mask.long())
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    next_pos = pos[:, -1:] + 1
    alive = torch.ones(N, dtype=torch.bool, device=device)
    logp_sum = torch.zeros(N, device=device)
    tokens = torch.full((N, max_new_tokens), pad, dtype=torch.long, device=device)
    masks = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
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
        step_inputs = dict(attention_mask=attn, position_ids=next_pos, cache=out.cache)  # KV cache
        out = model(input_ids=tok[:, None], **step_inputs, use_cache=True)
        next_pos = next_pos + 1
    return tokens, masks, logp_sum


def join(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """[prompt | completion] as input_ids, attention_mask, completion_mask (sequence_logprobs)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)
    full_mask = torch.cat([torch.zeros_like(prompt_mask.long()), completion_mask.long()], dim=1)
    return input_ids, attention_mask, full_mask


# [I.6] Training (ours: choices that the paper leaves open) ---------------------------------------
#    One step: refresh q' (every K steps) -> B prompts x n completions from q', scored without
#    gradients ((B, n) scores) -> the policy's log-probs of them -> the loss -> backward -> Adam.
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


@dataclass
class Batch:
    """One step's samples, scored without gradients: B prompts, n completions of each."""

    seqs: tuple  # [prompt | completion]: input_ids, attention_mask, completion_mask, (B*n, L)
    proposal_logp: torch.Tensor  # log q'(y_i|x), (B, n)
    sft_logp: torch.Tensor  # log p_sft(y_i|x), (B, n)
    reward: torch.Tensor  # r(x, y_i), (B, n)
    coin: torch.Tensor  # (B,) uniforms: DPO's Bradley-Terry labels (dpo_loss, labels="bt")

    def prompts(self, rows):
        """The batch of prompts rows.start..rows.stop, with their samples (a micro-batch)."""
        n = self.reward.shape[-1]
        seqs = tuple(t[rows.start * n : rows.stop * n] for t in self.seqs)
        return Batch(seqs, self.proposal_logp[rows], self.sft_logp[rows], self.reward[rows],
                     self.coin[rows])  # fmt: skip


def sample_and_score(cfg, proposal, sft, task, generator, share=slice(None)):
    """Draw B prompts from `generator`, n completions of each from the proposal, and score them,
    without gradients. `share`: the prompts that this process keeps (several processes)."""
    B, n, T, device = cfg.prompts_per_step, cfg.n_samples, task.max_new_tokens, generator.device
    with torch.no_grad(), autocast(device):
        prompt_idx = torch.randint(len(task.prompt_ids), (B,), device=device, generator=generator)
        uniforms = torch.rand(B, n, T, device=device, generator=generator)
        prompt_idx, uniforms = prompt_idx[share], uniforms[share].reshape(-1, T)
        x = task.prompt_ids[prompt_idx].repeat_interleave(n, 0)
        xm = task.prompt_mask[prompt_idx].repeat_interleave(n, 0)
        y, ym, proposal_logp = sample_completions(
            proposal, x, xm, T, task.eos_id, task.pad_id, uniforms=uniforms
        )
        seqs = join(x, xm, y, ym)
        if device.type == "cuda":  # bf16: re-score q' as q_theta is, so q' = q_theta gives b_i = 1
            proposal_logp = sequence_logprobs(proposal, *seqs, task.eos_id)
        rows = cfg.micro_batch or len(x)  # the SFT pass in micro-batches too; micro_batch: rows
        sft_logp = proposal_logp if proposal is sft else torch.cat([
            sequence_logprobs(sft, *(t[i : i + rows] for t in seqs), task.eos_id)
            for i in range(0, len(x), rows)])  # fmt: skip
        reward = task.reward(x, xm, y, ym).float()
    if not torch.isfinite(reward).all():
        raise ValueError("the reward function returned NaN or inf")
    coin = torch.rand(B, device=device, generator=generator)[share]
    return Batch(seqs, *(t.view(-1, n) for t in (proposal_logp, sft_logp, reward)), coin)


def check_finite(step, policy_logp, batch, beta):
    """Stop before a non-finite score reaches the weights, naming the likely flag (ours)."""
    ok = torch.isfinite(policy_logp).all()
    need(ok, f"step {step + 1}: the policy's log-probs went NaN or inf (try a smaller --lr)")
    ok = (log_posterior(batch.sft_logp, batch.reward, beta) < math.inf).all()  # NaN < inf: False
    need(ok, f"step {step + 1}: log p_sft + r/beta went NaN or inf (try a larger --beta)")


def setup(cfg, sft, policy, state):
    """`model` (the policy, or its wrapper for several processes), the policy, the proposal, Adam,
    the sample stream and the first step: 0, or a checkpoint's plain-data `state`'s (exact)."""
    model = copy.deepcopy(sft) if policy is None else policy  # perhaps wrapped (DDP)
    policy = getattr(model, "module", model).eval().requires_grad_(True)  # eval: no dropout
    K, device = cfg.refresh_every, next(sft.parameters()).device
    proposal = sft if K == 0 else policy if K == 1 else frozen(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)  # (ours) Adam, a constant lr
    stream = torch.Generator(device).manual_seed(cfg.seed)  # prompts, samples: same for all methods
    if state:
        opt.load_state_dict(state["optimizer"]), stream.set_state(state["stream"])
        if state["proposal"] is not None:
            proposal.load_state_dict(state["proposal"])
    return model, policy, proposal, opt, stream, state["step"] if state else 0


def train(cfg, sft, task, policy=None, state=None, on_step=None):
    """Train `policy` (default: a copy of `sft`) with cfg.method on `task` (prompt_ids, prompt_mask,
    max_new_tokens, eos_id, pad_id, reward(x, x_mask, y, y_mask) -> (N,)) and return it. Part II
    may hand in a wrapped policy, a checkpoint's `state` and on_step(step, **the step's values)."""
    model, policy, proposal, opt, stream, start = setup(cfg, sft, policy, state)
    n, K, device = cfg.n_samples, cfg.refresh_every, stream.device
    # several processes (torchrun): each samples and learns from its B prompts of every batch
    rank, procs = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    need(cfg.prompts_per_step % procs == 0, f"B: a multiple of the {procs} processes")
    B = cfg.prompts_per_step // procs  # this process's prompts (all of them, alone)
    share = slice(rank * B, (rank + 1) * B)
    per_pass = max(1, cfg.micro_batch // n) if cfg.micro_batch else B  # prompts per micro-batch
    for step in (bar := progress(range(start, cfg.steps), "train", initial=start, total=cfg.steps)):
        if K > 1 and step % K == 0:  # (ours) q' := a copy of the policy (K = 0: SFT, K = 1: policy)
            proposal.load_state_dict(policy.state_dict())
        opt.zero_grad(set_to_none=True)  # (before sampling: the last step's gradients are freed)
        batch = sample_and_score(cfg, proposal, sft, task, stream, share)  # log q', log p_sft, r
        loss, policy_logp = 0.0, []
        for p in range(0, B, per_pass):  # micro-batches of whole prompts (one pass by default)
            part = batch.prompts(slice(p, p + per_pass))
            if procs > 1:  # DDP averages the gradients across processes after the last pass
                model.require_backward_grad_sync = p + per_pass >= B
            with autocast(device):
                logp = sequence_logprobs(model, *part.seqs, task.eos_id).view(-1, n)
            check_finite(step, logp, part, cfg.beta)
            part_loss = method_loss(cfg.method, logp, part.proposal_logp, part.sft_logp,
                                    part.reward, cfg.beta, cfg.dpo_labels, part.coin)  # fmt: skip
            (part_loss * len(logp) / B).backward()  # parts weighted by size: a mean over B prompts
            loss, policy_logp = loss + part_loss.detach() * len(logp) / B, [*policy_logp, logp]
        opt.step()
        policy_logp = torch.cat(policy_logp).detach()  # (B, n), for the bar and on_step
        if step % 10 == 0 or step == cfg.steps - 1:  # .item() waits for the device: not each step
            # E[r] of the pre-step policy, self-normalised with its weights beta_hat (ours)
            reward = (beta_hat(policy_logp, batch.proposal_logp) * batch.reward).sum(-1).mean()
            bar.set_postfix(loss=f"{loss.item():.3f}", reward=f"{reward.item():+.2f}")
        if on_step:
            on_step(step + 1, policy=policy, proposal=proposal, opt=opt, stream=stream, bar=bar,
                    batch=batch, policy_logp=policy_logp, loss=loss)  # fmt: skip
    bar.close()
    return policy


# [I.7] The embedded toy world (not part of the method; ours) --------------------------------------
#    Prompts "the <thing> was", completions of up to 4 words from a 10-word vocabulary, or EOS
#    ("."): 1 + 10 + 100 + 1000 + 10000 = 11,111 completions per prompt, few enough to enumerate.
#    A tiny GPT-2 (from a config, no download) learns a corpus of little reviews as the SFT prior;
#    the reward is a sentiment lexicon that understands "not" and "very".
EOS = "."
COMPLETION_WORDS = ["good", "great", "fun", "bad", "awful", "boring", "not", "very", "and", "but"]
# subject -> the share of positive reviews in the corpus
SUBJECTS = dict(plot=0.5, acting=0.7, music=0.8, ending=0.3, food=0.6, service=0.2, cast=0.75,
                story=0.4)  # fmt: skip
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
    """A tiny GPT-2 whose logits are -inf but for the 11 completion tokens (EOS, the 10 words): at
    every prefix their probabilities sum to 1, and the 11,111 completions (ending at EOS or after 4
    words) are the leaves of that tree, so their probabilities sum to 1 for every prompt."""

    def __init__(self, vocab_size, num_completion_tokens, eos_id):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        size = dict(vocab_size=vocab_size, n_positions=16, n_embd=64, n_layer=2, n_head=4)
        size.update(dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.0))  # no dropout
        special = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), eos_id)
        self.config = GPT2Config(**size, **special)
        self.gpt = GPT2LMHeadModel(self.config)
        blocked = torch.arange(vocab_size) >= num_completion_tokens  # not a completion token
        self.register_buffer("blocked", blocked, persistent=False)

    def forward(self, **kwargs):
        out = self.gpt(**kwargs)
        out.logits = out.logits.masked_fill(self.blocked, float("-inf"))
        return out


class ToyWorld:
    """The prompts, the reward and every completion, enumerated (the SFT corpus: below)."""

    def __init__(self, device):
        self.vocab, self.index = VOCAB, {w: i for i, w in enumerate(VOCAB)}
        self.eos_id = self.pad_id = self.index[EOS]
        self.max_new_tokens, self.subjects = MAX_NEW_TOKENS, list(SUBJECTS)
        self.prompts = [f"the {s} was" for s in self.subjects]
        self.prompt_ids = torch.tensor([self.encode(p) for p in self.prompts], device=device)
        self.prompt_mask = torch.ones_like(self.prompt_ids)
        # every completion: m words then EOS (m = 0..3), or 4 words; padded with EOS (id 0)
        k, T = len(COMPLETION_WORDS) + 1, MAX_NEW_TOKENS  # 11 completion tokens: EOS, the words
        comps = [list(c) for m in range(T + 1) for c in itertools.product(range(1, k), repeat=m)]
        self.completion_ids = torch.tensor([(c + [self.eos_id] * T)[:T] for c in comps])
        self.completion_mask = torch.tensor([[int(t <= len(c)) for t in range(T)] for c in comps])
        rewards = torch.tensor([review_reward([VOCAB[t] for t in c]) for c in comps])
        self.reward_table = rewards.expand(len(self.prompts), -1).contiguous()  # (prompts, comps)

    def encode(self, text):
        return [self.index[w] for w in text.split()]

    def decode(self, ids, mask):
        return " ".join(self.vocab[t] for t, m in zip(ids.tolist(), mask.tolist()) if m)  # noqa: B905

    def reward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """r(x, y) of sampled completions (the same for every prompt: the review's sentiment)."""
        rows = zip(completion_ids.tolist(), completion_mask.tolist(), strict=True)
        words = [[self.vocab[t] for t, m in zip(y, ym, strict=True) if m] for y, ym in rows]
        return torch.tensor([review_reward(w) for w in words], device=completion_ids.device)

    def new_model(self):
        return ToyLM(len(self.vocab), len(COMPLETION_WORDS) + 1, self.eos_id)


# The embedded world's SFT prior: a corpus of little reviews, and maximum likelihood on it (ours)
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
    rows = []
    for _ in range(size):
        subject = rng.choice(world.subjects)
        review = world.encode(" ".join(corpus_review(rng, SUBJECTS[subject])))
        rows.append((world.encode(f"the {subject} was"), review))
    T = MAX_NEW_TOKENS
    ids = torch.tensor([x + (y + [world.eos_id] * T)[:T] for x, y in rows])
    cmask = torch.tensor([[0] * len(x) + [int(t < len(y)) for t in range(T)] for x, y in rows])
    return ids, torch.where(cmask.bool() | (torch.arange(ids.shape[1]) < 3), 1, 0), cmask


def pretrain_sft(world, cfg, device):
    """The SFT prior: maximum likelihood on a fixed corpus (a random batch of it every step)."""
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


# [I.8] Evaluation: exact, by enumerating every completion of every prompt (the embedded world) ----
#    KL(posterior || policy): how well the policy amortises the posterior (0 is perfect);
#    KL(policy || SFT) and E_policy[r]: the two axes of the reward-KL frontier.
def completion_tree(world):
    """One forward pass over every 3-word sequence (10^3 rows; row r: the word ids "digits of r,
    plus 1") gives p(next token | prompt, prefix) after each row's prefixes of d = 0..3 words (a
    causal LM reads a prefix the same whatever follows). Token d of completion c is read at row
    path_rows[c, d], a row whose first d words are c's.
    Worked example, "good fun ." = ids [1, 3, 0, 0] (EOS is 0), digits [0, 2, 0]:
      d = 0  p(good | x)           any row will do:              row 0, "good good good"
      d = 1  p(fun | x good)       a row that starts "good":     row 0
      d = 2  p(. | x good fun)     a row that starts "good fun": row 20, "good fun good"
      d = 3  after the EOS: masked out (completion_mask), read anywhere: row 20"""
    k, T = len(COMPLETION_WORDS), world.max_new_tokens
    prefix_ids = torch.tensor(list(itertools.product(range(1, k + 1), repeat=T - 1)))
    digits = (world.completion_ids - 1).clamp(min=0)[:, : T - 1]
    place = k ** torch.arange(T - 2, -1, -1)  # 100, 10, 1
    path_rows = torch.stack([(digits[:, :d] * place[:d]).sum(-1) for d in range(T)], dim=1)
    return prefix_ids, path_rows


def enumerate_logprobs(model, world, device, grad=False):
    """log q(y|x) of every completion y of every prompt x: a (prompts, completions) table, each row
    normalised (ToyLM). One pass a prompt over completion_tree's rows; a completion's log-prob sums
    its tokens' along its path, to its EOS. grad=True keeps the graph (exact gradients)."""
    model = model.eval()
    prefixes, paths = (t.to(device) for t in completion_tree(world))
    depth = torch.arange(world.max_new_tokens, device=device)
    completion_mask = world.completion_mask.to(device).bool()
    table = []
    for p in range(len(world.prompt_ids)):
        x = world.prompt_ids[p : p + 1].to(device).expand(len(prefixes), -1)
        ids = torch.cat([x, prefixes], dim=1)
        attn = torch.ones_like(ids)  # the toy prompts have no padding
        with torch.set_grad_enabled(grad), autocast(device):
            logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits
        next_logp = torch.log_softmax(logits[:, x.shape[1] - 1 :].float(), dim=-1)  # (row, d, V)
        token_logp = next_logp[paths, depth, world.completion_ids.to(device)]  # (completions, d)
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
        "kl_policy_posterior": kl(log_q, log_post).mean().item(),
    }


def samples_of(world, model, device, prompts=(0, 5), k=2):
    """A few samples of `model` for a look: k completions of each prompt, with their reward."""
    rows = [p for p in prompts for _ in range(k)]
    x, xm = world.prompt_ids[rows], world.prompt_mask[rows]
    with torch.no_grad(), autocast(device):
        y, ym, _ = sample_completions(model, x, xm, world.max_new_tokens, world.eos_id)
    texts, rewards = [world.decode(*c) for c in zip(y, ym, strict=True)], world.reward(x, xm, y, ym)
    return [dict(prompt=world.prompts[p], text=t, r=r.item())
            for p, t, r in zip(rows, texts, rewards, strict=True)]  # fmt: skip


# The default run: python brain.py -----------------------------------------------------------------
def run(cfg):
    """Pretrain the SFT prior, train the policy, evaluate every distribution exactly; a few samples
    of the SFT model and of the policy (the caller prints them)."""
    cfg.validate()
    t0 = time.time()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    world = ToyWorld(device)
    sft = pretrain_sft(world, cfg, device)
    log_sft = enumerate_logprobs(sft, world, device)
    log_post = posterior_table(log_sft, world.reward_table, cfg.beta)
    policy = train(cfg, sft, world)
    log_policy = enumerate_logprobs(policy, world, device)
    results = {
        name: exact_metrics(log_q, log_sft, log_post, world.reward_table)
        for name, log_q in (("sft", log_sft), ("policy", log_policy), ("posterior", log_post))
    }
    results.update(config=asdict(cfg), device=str(device), wall_s=round(time.time() - t0, 2))
    samples = {k: samples_of(world, m, device) for k, m in (("sft", sft), ("policy", policy))}
    return {**results, "samples": samples}


# ================================================================================================
# Part II: tools around the method — --compare, real models (--model: run folder, resume,
#    torchrun), --bench and the command line. You can stop reading here.
# ================================================================================================
import argparse  # Part II's own imports: Part I reads without them
import contextlib
import errno
import fcntl
import hashlib
import json
import re
import resource
import shutil
import signal
import stat
import sys
import tempfile
from dataclasses import fields, replace

import numpy as np


def print_table(header, rows):
    """Every table: the first column to the left, the others to the right; short rows end blank."""
    rows = [[str(c) for c in row] + [""] * (len(header) - len(row)) for row in [header, *rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("  ".join([r[0].ljust(widths[0]), *cells]))


def print_run(results):
    """The default run: exact metrics, then a few samples of the SFT model and of the policy."""
    cfg, keys = results["config"], ("reward", "kl_policy_sft", "kl_posterior_policy")
    setting = f"beta = {cfg['beta']}, {cfg['steps']} steps, B = {cfg['prompts_per_step']}"
    took = f"n = {cfg['n_samples']}, {results['wall_s']:.1f} s on {results['device']}"
    print(f"\nExact metrics on the embedded world ({setting}, {took})")
    names = {"sft": "SFT prior", "policy": f"policy ({cfg['method']})", "posterior": "posterior"}
    rows = [[name] + [f"{results[k][m]:{'+' * (m == 'reward')}.3f}" for m in keys]
            for k, name in names.items()]  # fmt: skip
    print_table(["", "E[r]", "KL(. || SFT)", "KL(posterior || .)"], rows)
    for key, title in (("sft", "\nSFT samples:"), ("policy", f"Policy samples ({cfg['method']}):")):
        print(title, *[f"  {s['prompt']} | {s['text']:<24s} r = {s['r']:+.1f}"
                       for s in results["samples"][key]], sep="\n")  # fmt: skip


# Comparing the estimators on equal footing (python brain.py --compare; our protocol) --------------
#    Every method trains from the same SFT prior on the same sample stream (seed, prompts, steps,
#    Adam, beta), each at its own best lr of LR_GRID, chosen on tuning seeds apart from the
#    reported ones by its own objective's final exact KL. Off-policy (q' = SFT): BRAIn, GDC++,
#    DPG, DPO; on-policy (q' = the policy): BRAIn against RLOO. At fixed steps the policy of each
#    group's first method is frozen, and every estimator of the group is computed there on the
#    same fresh batches and compared with the exact gradient of its own objective: a gradient's
#    raw variance is in its loss's units (RLOO's carries beta), the relative figures are not.
VARIANTS = {  # name -> (method, DPO labels, proposal: None = cfg.refresh_every, 1 = the policy)
    "brain": ("brain", "argmax", None),
    "gdcpp": ("gdcpp", "argmax", None),
    "dpg": ("dpg", "argmax", None),
    "dpo-argmax": ("dpo", "argmax", None),
    "dpo-bt": ("dpo", "bt", None),
    "brain-on": ("brain", "argmax", 1),
    "rloo": ("rloo", "argmax", 1),
}
# Each estimator's objective: RLOO's loss has expected gradient beta grad KL(q || post) = -grad J;
# BRAIn's, GDC++'s and DPG's estimate grad KL(posterior || q) (biased: alpha_hat's Z is estimated);
# DPO's expected loss is not enumerable here, so it is held against the forward KL's (cosine).
OBJECTIVE = {v: "reverse" if VARIANTS[v][0] == "rloo" else "forward" for v in VARIANTS}
OWN_KL = {"forward": "kl_posterior_policy", "reverse": "kl_policy_posterior"}
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)


def flat(grads, params):  # one vector from autograd's per-parameter gradients (None: zeros)
    blocks = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return torch.cat([b.reshape(-1) for b in blocks]).float()


def estimator_gradients(cfg, policy, proposal, sft, task, variants, batches, generator):
    """{variant: (batches, num_params)}: each estimator's gradient on the same fresh batches."""
    params, grads = [p for p in policy.parameters() if p.requires_grad], {v: [] for v in variants}
    for _ in range(batches):
        b = sample_and_score(cfg, proposal, sft, task, generator)
        with autocast(generator.device):
            policy_logp = sequence_logprobs(policy, *b.seqs, task.eos_id).view(-1, cfg.n_samples)
        for v in variants:
            method, labels, _ = VARIANTS[v]
            loss = method_loss(method, policy_logp, b.proposal_logp, b.sft_logp, b.reward,
                               cfg.beta, labels, b.coin)  # fmt: skip
            g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads[v].append(flat(g, params))
    return {v: torch.stack(g) for v, g in grads.items()}


def exact_gradients(policy, world, log_post, beta, device):
    """The exact gradients of both objectives at `policy`, averaged over the prompts, by
    enumerating every completion with the graph kept: "forward", grad KL(posterior || q_theta) =
    -sum_y posterior(y) grad log q_theta(y); "reverse", beta grad KL(q_theta || posterior)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    log_q = enumerate_logprobs(policy, world, device, grad=True)
    forward = -(log_post.exp() * log_q).sum(-1).mean()  # KL(post || q) less post's entropy
    reverse = beta * (log_q.exp() * (log_q - log_post)).sum(-1).mean()
    grad = lambda loss: flat(torch.autograd.grad(loss, params, retain_graph=True), params)  # noqa: E731
    return {"forward": grad(forward), "reverse": grad(reverse)}


def gradient_errors(grads, exact):
    """K gradients (K, P) of one estimator at one policy against `exact`, its objective's exact
    gradient g*. Unbiased, per batch: rel_mse = E||g - g*||^2 / ||g*||^2 = rel_bias^2 +
    rel_noise, with rel_noise = tr Cov(g) / ||g*||^2; cosine(mean g, g*); noise_to_signal =
    tr Cov(g) / ||E g||^2. A loss scaled by c leaves them all unchanged; trace_cov, the raw
    variance in the loss's units, is multiplied by c^2."""
    K, mean, norm2 = len(grads), grads.mean(0), exact.pow(2).sum().item()
    trace_cov = (grads - mean).pow(2).sum().item() / (K - 1)
    mse = (grads - exact).pow(2).sum(-1).mean().item() / norm2
    signal = mean.pow(2).sum().item() - trace_cov / K  # ||E g||^2, unbiased
    return dict(rel_bias=max(mse - trace_cov / norm2, 0.0) ** 0.5, rel_noise=trace_cov / norm2,
                rel_mse=mse, cosine=F.cosine_similarity(mean, exact, dim=0).item(),
                noise_to_signal=trace_cov / signal if signal > 0 else math.inf,
                trace_cov=trace_cov)  # fmt: skip


def brain_gdcpp_gap(cfg, policy, sft, task, generator):
    """||g_BRAIn - g_GDC++|| / max(||g_BRAIn||, 1e-3) on one batch, on-policy (q' = a copy of the
    policy: b_i = 1 and beta_hat_i = 1/n, so the two coincide up to rounding) and off (q' = SFT)."""
    gap = {}
    for name, proposal in (("on_policy", frozen(policy)), ("off_policy_sft", sft)):
        g = estimator_gradients(cfg, policy, proposal, sft, task, ("brain", "gdcpp"), 1, generator)
        scale = g["brain"].norm().clamp(min=1e-3)  # at the posterior both vanish: no ratio then
        gap[name] = ((g["brain"] - g["gdcpp"]).norm() / scale).item()
    return gap


class Prior:
    """One seed's embedded world: the SFT prior, the exact tables, exact metrics of a policy."""

    def __init__(self, cfg, seed, device):
        seed_everything(seed)
        self.world, self.device = ToyWorld(device), device
        self.sft = pretrain_sft(self.world, replace(cfg, seed=seed), device)
        self.log_sft = enumerate_logprobs(self.sft, self.world, device)
        self.log_post = posterior_table(self.log_sft, self.world.reward_table, cfg.beta)

    def exact(self, log_q):
        return exact_metrics(log_q, self.log_sft, self.log_post, self.world.reward_table)

    def metrics(self, policy):
        return self.exact(enumerate_logprobs(policy, self.world, self.device))


def variant_cfg(cfg, v, seed, lr):
    method, labels, K = VARIANTS[v]
    K = cfg.refresh_every if K is None else K
    return replace(cfg, method=method, dpo_labels=labels, refresh_every=K, seed=seed, lr=lr)


def plain_line(bar, text):  # off a terminal (a log file) the bar is off: a line says it instead
    if bar.disable:
        print(f"compare: {text}", flush=True)


def pick_lrs(cfg, variants, lrs, seeds, device, bar):
    """Each variant's lr: the smallest mean final exact KL of its own objective over `seeds`
    (a run that diverges counts as infinite)."""
    tuning = []
    for seed in seeds:
        prior = Prior(cfg, seed, device)
        for v, lr in itertools.product(variants, lrs):
            try:
                policy = train(variant_cfg(cfg, v, seed, lr), prior.sft, prior.world)
                kl = prior.metrics(policy)[OWN_KL[OBJECTIVE[v]]]
            except ValueError:  # check_finite: the lr is too large for this method
                kl = math.inf
            tuning.append(dict(method=v, seed=seed, lr=lr, own_kl=kl))
            bar.update()
            plain_line(bar, f"tuning seed {seed}, {v} at lr {lr:g}: own KL {kl:.3f}")
    mean = lambda v, lr: np.mean([t["own_kl"] for t in tuning if (t["method"], t["lr"]) == (v, lr)])  # noqa: E731
    return {v: min(lrs, key=lambda lr: mean(v, lr)) for v in variants}, tuning


def compare(cfg, seeds=3, variants=tuple(VARIANTS), lrs=LR_GRID, tune_seeds=1, curve_every=20,
            error_every=50, batches=16, show=True):  # fmt: skip
    """Pick each variant's lr on `tune_seeds` seeds (from cfg.seed + 1000; one lr: no tuning),
    then train every variant at its lr on identical sample streams for `seeds` seeds: exact
    metrics every curve_every steps; every error_every steps, at the policy of each group's
    first variant, every estimator's gradient_errors on `batches` fresh batches."""
    cfg.validate()
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or seeds < 1 or batches < 2 or not lrs or tune_seeds < 1:
        need = f"variants of {', '.join(VARIANTS)}, seeds >= 1, batches >= 2, lrs, tune_seeds >= 1"
        raise ValueError(f"compare needs {need}; got {unknown}, {seeds}, {batches}, {lrs}")
    device, runs = pick_device(cfg.device), []
    tuned = len(lrs) > 1
    tuning_runs = tune_seeds * len(lrs) * len(variants) if tuned else 0
    reported = seeds * len(variants)
    bar = progress(range(tuning_runs + reported), "compare: runs")
    tune_from = range(cfg.seed + 1000, cfg.seed + 1000 + tune_seeds)
    if tuned:
        plain_line(bar, f"{tuning_runs} tuning runs, then {reported} reported")
    lr_of, tuning = pick_lrs(cfg, variants, lrs, tune_from, device, bar) if tuned else (
        dict.fromkeys(variants, lrs[0]), [])  # fmt: skip
    for seed in range(cfg.seed, cfg.seed + seeds):
        prior = Prior(cfg, seed, device)
        for name, table in (("sft", prior.log_sft), ("posterior", prior.log_post)):
            runs.append({"method": name, "seed": seed, "final": prior.exact(table)})
        for v in variants:
            run_cfg = variant_cfg(cfg, v, seed, lr_of[v])
            group = [u for u in variants if VARIANTS[u][2] == VARIANTS[v][2]]
            record = {"method": v, "seed": seed, "lr": lr_of[v], "curve": [], "errors": []}
            probe = torch.Generator(device).manual_seed(1_000_003 + seed)  # apart from training
            t_hook = 0.0

            def measure(step, policy, proposal):
                nonlocal t_hook
                t, last = time.time(), step == cfg.steps
                if last or step % curve_every == 0:
                    record["curve"].append({"step": step, **prior.metrics(policy)})
                if v == group[0] and (last or step % error_every == 0):
                    inputs = run_cfg, policy, proposal, sft, prior.world, group, batches, probe
                    exact = exact_gradients(policy, prior.world, prior.log_post, cfg.beta, device)
                    errors = {u: gradient_errors(g, exact[OBJECTIVE[u]])
                              for u, g in estimator_gradients(*inputs).items()}  # fmt: skip
                    gap = brain_gdcpp_gap(run_cfg, policy, sft, prior.world, probe)
                    kl_sft = prior.metrics(policy)["kl_policy_sft"]
                    point = dict(step=step, kl_policy_sft=kl_sft, brain_vs_gdcpp=gap)
                    record["errors"].append(dict(point, estimators=errors))
                t_hook += time.time() - t

            t0, sft = time.time(), prior.sft
            policy = copy.deepcopy(sft).requires_grad_(True)
            K = run_cfg.refresh_every
            measure(0, policy, sft if K == 0 else policy if K == 1 else frozen(policy))
            on_step = lambda s, policy, proposal, **_: measure(s, policy, proposal)  # noqa: E731
            train(run_cfg, sft, prior.world, policy, None, on_step)
            record["wall_s"] = time.time() - t0 - t_hook  # training alone
            record["final"] = {k: x for k, x in record["curve"][-1].items() if k != "step"}
            runs.append(record)
            bar.update()
            own = record["final"][OWN_KL[OBJECTIVE[v]]]
            plain_line(bar, f"seed {seed}, {v} at lr {lr_of[v]:g}: own KL {own:.3f}")
    bar.close()
    result = {"config": asdict(cfg), "seeds": seeds, "variants": list(variants), "runs": runs,
              "lrs": list(lrs), "lr": lr_of, "tuning": tuning, "device": str(device),
              "batches": batches}  # fmt: skip
    if show:
        print_comparison(result)
    return result


def mean_std(xs, spec=".3f"):  # mean +- sample std (ddof = 1) over seeds
    xs = np.array(xs, dtype=float)
    if not np.isfinite(xs).all():  # noise/signal: no signal above the noise in some seed
        return f"inf in {(~np.isfinite(xs)).sum()} of {len(xs)}"
    return f"{xs.mean():{spec}} +- {xs.std(ddof=1) if len(xs) > 1 else 0.0:{spec}}"


def print_comparison(result):
    """Per group (off-policy, on-policy): the lr grid, the final exact metrics at each method's
    lr, then every estimator's error against its exact gradient at the same frozen policies."""
    cfg, runs, variants = result["config"], result["runs"], result["variants"]
    K, keys = cfg["refresh_every"], ("kl_posterior_policy", "kl_policy_posterior", "kl_policy_sft")
    final = lambda name, key: [r["final"].get(key, r.get(key)) for r in runs if r["method"] == name]  # noqa: E731
    for on in (False, True):
        group = [v for v in variants if (VARIANTS[v][2] == 1) == on]
        if not group:
            continue
        proposal = "the policy" if on or K == 1 else "SFT" if K == 0 else f"the policy every {K}"
        print(f"\n{'On' if on else 'Off'}-policy (proposal: {proposal}): {cfg['steps']} steps, "
              f"B = {cfg['prompts_per_step']}, n = {cfg['n_samples']}, beta = {cfg['beta']}; "
              f"mean +- std over {result['seeds']} seed(s)")  # fmt: skip
        if result["tuning"]:
            own_kl = lambda v, lr: np.mean([t["own_kl"] for t in result["tuning"]  # noqa: E731
                                            if (t["method"], t["lr"]) == (v, lr)])  # fmt: skip
            rows = [[v, *[f"{own_kl(v, lr):.3f}" for lr in result["lrs"]]] for v in group]
            print("lr grid: the final exact KL of each method's own objective, tuning seed(s)")
            print_table(["method", *[f"lr {lr:g}" for lr in result["lrs"]]], rows)
        rows = [["sft", "", *[mean_std(final("sft", k)) for k in (*keys, "reward")], ""]]
        rows += [[v, f"{result['lr'][v]:g}", *[mean_std(final(v, k)) for k in (*keys, "reward")],
                  mean_std(final(v, "wall_s"), ".1f")] for v in group]  # fmt: skip
        rows.append(
            ["posterior", "", *[mean_std(final("posterior", k)) for k in (*keys, "reward")]]
        )
        head = ["method", "lr", "KL(post || .)", "KL(. || post)", "KL(. || SFT)", "E[r]", "train s"]
        print_table(head, rows)
        points = [r["errors"] for r in runs if r["method"] == group[0]]  # one list per seed
        rows = []
        for at in zip(*points, strict=True):  # one step, every seed
            for u in group:
                e = [a["estimators"][u] for a in at]
                cell = lambda k, spec=".3f": mean_std([x[k] for x in e], spec)  # noqa: E731
                rows.append([at[0]["step"], u, OBJECTIVE[u], cell("rel_bias"), cell("rel_noise"),
                             cell("rel_mse"), cell("cosine"), cell("noise_to_signal", ".3g"),
                             cell("trace_cov", ".3g")])  # fmt: skip
        print(
            f"Gradient error against the exact gradient of each estimator's objective, at "
            f"{group[0]}'s frozen policies ({result['batches']} batches; mean +- std):"
        )
        head = ["step", "estimator", "objective", "rel bias", "rel noise", "rel MSE", "cosine"]
        print_table([*head, "noise/signal", "raw tr Cov"], rows)
        late = [i for i, a in enumerate(points[0]) if a["step"] >= cfg["steps"] / 2]

        def rel_mse(p, u):  # one seed's rel MSE of estimator u at the late steps
            return np.array([p[i]["estimators"][u]["rel_mse"] for i in late])

        def ratio(u):  # per seed, the geometric mean over those steps of u's rel MSE / group[0]'s
            return [math.exp(np.log(rel_mse(p, u) / rel_mse(p, group[0])).mean()) for p in points]

        others = [u for u in group[1:] if VARIANTS[u][0] != "dpo"]  # DPO: no objective here
        print(
            f"rel MSE over {group[0]}'s at steps {points[0][late[0]]['step']}-{cfg['steps']} "
            "(per seed, the geometric mean over those steps): "
            + ", ".join(f"{u} {mean_std(ratio(u), '.1f')}x" for u in others)
        )
        on_gap, off_gap = ([a["brain_vs_gdcpp"][k] for p in points for a in p]
                           for k in ("on_policy", "off_policy_sft"))  # fmt: skip
        print(
            f"BRAIn-GDC++ gap ||g_BRAIn - g_GDC++|| / ||g_BRAIn||, one batch: on-policy at most "
            f"{max(on_gap):.1e}, off-policy (q' = SFT) {min(off_gap):.2f}-{max(off_gap):.2f}"
        )
    print("rel bias: ||E g - g*|| / ||g*||; rel noise: tr Cov(g) / ||g*||^2 (one batch);\n"
          "rel MSE: rel bias^2 + rel noise; noise/signal: tr Cov(g) / ||E g||^2 "
          "(inf: no signal above the noise); raw tr Cov: in the loss's own units;\n"
          "g*: the exact gradient of KL(posterior || q) (forward) or of beta KL(q || posterior) "
          "(reverse, RLOO's);\nDPO has no enumerable objective here: only its cosine with the "
          "forward KL's gradient and its noise/signal mean something.")  # fmt: skip


# Real models (--model): any Hugging Face causal LM as the prior, a classifier's logit as reward ---
#    (one label's), prompts from a JSON-lines file; the same train() and losses as Part I.
def load_prompts(path):
    """Rows {"prompt", "reference" (or None), "line"} of a JSON-lines file, one object a line:
    "prompt", a non-empty text, is required; "reference", a text or null, is optional and only
    read by the held-out evaluation (the policy's win rate over it); other keys are ignored, as
    are blank lines. A prompt is kept just once."""
    rows, lines = {}, 0
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read --prompts {path}: {e.strerror}") from None
    for k, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():  # a blank line is skipped; a "null" is not a prompt
            try:
                obj = json.loads(raw.decode("utf-8"))
                prompt, ref = obj["prompt"], obj.get("reference")
                if not (isinstance(prompt, str) and prompt.strip() and isinstance(ref, str | None)):
                    raise TypeError
                (prompt + (ref or "")).encode("utf-8")  # JSON's "\ud800", a lone surrogate, fails
            except UnicodeError as e:
                raise ValueError(f"{path}: line {k}: not UTF-8 text ({first_line(e)})") from None
            except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit number, nesting
                raise ValueError(f"{path}: line {k}: not valid JSON ({first_line(e)})") from None
            except (KeyError, TypeError, AttributeError):
                form = '{"prompt": "a non-empty text", "reference": "a text (optional)"}'
                raise ValueError(f"{path}: line {k}: each line is {form}") from None
            rows.setdefault(prompt, dict(prompt=prompt, reference=ref, line=k))
            lines += 1
    need(rows, f"{path}: no prompts in the file")
    if lines > len(rows):
        print(f"note: {path}: {lines - len(rows)} duplicate prompt(s) dropped (each is kept once)")
    return list(rows.values())


def first_line(e):  # an error's message, its first line (or the error's type)
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def model_source(name, flag):
    """A folder's normalised path, or a Hub name; one clear line when it is neither."""
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"{flag} {name!r}: a folder without config.json, not a Hugging Face model")
    if os.path.isdir(name):
        return os.path.abspath(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"{flag} {name!r}: no such folder, and not a Hub name (owner/model)")
    return name


def files_stamp(source, flag):
    """A folder's files as --resume compares them: each name, size and modification time, cheap
    to read (a model replaced in place at the same path shows); a Hub name has none (None)."""
    if not os.path.isdir(source):
        return None
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        if entry.is_file():  # an unreadable file is named here, not "no such file" when loading
            need(os.access(entry.path, os.R_OK), f"{flag} {source}: cannot read {entry.name}")
            st = entry.stat()
            digest.update(f"{entry.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_pretrained(name, classifier=False, trust_remote_code=False, quiet=False):
    """A causal LM (classifier=True: a sequence classifier) and its tokenizer in fp32, errors in
    one line. Weights the checkpoint lacks are an error: transformers would draw them at random (a
    causal LM loaded as a classifier gets a random head), which must never pass silently."""
    import transformers

    kind = "ForSequenceClassification" if classifier else "ForCausalLM"
    what, remote = "a reward model" if classifier else "a causal LM", trust_remote_code
    try:
        arch = transformers.AutoConfig.from_pretrained(name, trust_remote_code=remote).architectures
        if arch and all(a.endswith("ForSequenceClassification") != classifier for a in arch):
            raise ValueError(f"it is a {arch[0]}")
        tok = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=remote)
        model, info = getattr(transformers, "AutoModel" + kind).from_pretrained(
            name, trust_remote_code=remote, dtype=torch.float32, output_loading_info=True
        )
        missing, vocab = info.get("missing_keys"), model.get_input_embeddings().num_embeddings
        if missing:
            raise ValueError(f"the checkpoint lacks {', '.join(sorted(missing)[:3])} (random)")
        need(len(tok) <= vocab, f"its tokenizer has {len(tok)} tokens, the model {vocab}")
    except Exception as e:  # transformers raises OSError, ValueError, KeyError...: one line
        raise ValueError(f"cannot load {what} from {name!r}: {first_line(e)}") from None
    if not classifier:  # the prior: its completions must end; prompts are padded on the left
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer of {name!r} has no EOS token: completions never end")
        if tok.pad_token_id is None and not quiet:
            print(f"note: the tokenizer of {name} has no pad token; its EOS token is the pad")
        tok.pad_token, tok.padding_side = tok.pad_token or tok.eos_token, "left"
    return model.eval(), tok


def model_context(model):
    """The longest sequence the model takes, when its config says (else None)."""
    keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    sizes = [getattr(model.config, k, None) for k in keys]
    return next((n for n in sizes if isinstance(n, int) and n > 0), None)


class RewardModel:
    """r(x, y) = one logit of an AutoModelForSequenceClassification on the decoded text x + y, in
    its own tokens. A text longer than it takes (the smaller of its tokenizer's model_max_length
    and its position limit) loses its start: the prompt's beginning, never the completion."""

    def __init__(self, name, label=None, trust_remote_code=False, device="cpu"):
        model, tok = load_pretrained(name, True, trust_remote_code)
        labels = [model.config.id2label.get(i, str(i)) for i in range(model.config.num_labels)]
        index = {**{str(i): i for i in range(len(labels))}, **{x: i for i, x in enumerate(labels)}}
        if label not in index and (label is not None or len(labels) > 1):
            say = "choose" if label is None else f"--reward-label {label!r} is not one of them;"
            raise ValueError(f"{name!r} has labels {', '.join(labels)}: {say} --reward-label")
        tok.pad_token = tok.pad_token or tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise ValueError(f"the reward model's tokenizer ({name!r}) has no token to pad with")
        tok.truncation_side = "left"  # too long: cut the prompt's start, never the completion
        limits = [n for n in (tok.model_max_length, model_context(model)) if n and n < 10**6]
        self.max_length = min(limits, default=None)  # transformers' "no limit" is huge
        model.config.pad_token_id = tok.pad_token_id  # models that read the last non-pad token
        self.model, self.tokenizer = model.requires_grad_(False).to(device), tok
        self.index, self.device = index.get(label, 0), torch.device(device)

    @torch.no_grad()
    def score(self, texts):
        cut = dict(truncation=self.max_length is not None, max_length=self.max_length)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, **cut).to(self.device)
        with autocast(self.device):
            return self.model(**enc).logits[:, self.index].float()


class TextTask:
    """Prompts tokenized once (left-padded) and the reward model, in the form train() expects."""

    def __init__(self, rows, tokenizer, reward_model, max_new_tokens, eos_ids, device):
        self.tokenizer, self.rm, self.max_new_tokens = tokenizer, reward_model, max_new_tokens
        self.eos_id, self.pad_id = eos_ids, tokenizer.pad_token_id
        enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True).to(device)
        self.prompt_ids, self.prompt_mask = enc["input_ids"], enc["attention_mask"]

    def texts(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """[prompt | completion] decoded as one text a row (apart, SentencePiece loses a space)."""
        ids, mask, _ = join(prompt_ids, prompt_mask, completion_ids, completion_mask)
        ids = torch.where(mask.bool(), ids, self.pad_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def reward(self, *seqs):  # x, x_mask, y, y_mask
        return self.rm.score(self.texts(*seqs)).to(seqs[0].device)


# The run folder (ours). A run owns its --output-dir: absent, empty, or marked as a run's by
#    RUN_FILE, which records the settings, the checkpoint and a save in progress. The run holds an
#    exclusive lock for its whole life and writes every file under a temporary name, then renames
#    it. A run folder is copied, shared and edited: whatever is read back from it is checked, not
#    trusted (names, types), and only a real folder of the run's own, by its name, is ever deleted.
RUN_FILE, TRAINER_STATE, METRICS = ".brain-run.json", "trainer_state.pt", "metrics.jsonl"
CHECKPOINT, TMP = re.compile(r"checkpoint-[0-9]{6}"), re.compile(r"\.tmp-[A-Za-z0-9_]+")
UMASK = os.umask(0o22)  # read once (and set back): temporary names get the usual permissions
os.umask(UMASK)


def temp_name(name):  # the run's own temporary name for one of its files (a crash leaves it)
    return ".tmp-" + re.sub(r"[^A-Za-z0-9_]", "_", name)


LEFTOVERS = {temp_name(name) for name in (RUN_FILE, METRICS, "eval.json")}


def write_atomic(path, write, tmp=None):
    """write(f) into a temporary file beside `path`, then rename it: never a torn or empty file.
    `tmp`: a run's own fixed name (a crash's leftover is known); else a fresh random one."""
    made = None
    try:
        if tmp:  # O_EXCL, O_NOFOLLOW: never into a file or a link that is there already
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        else:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
            os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 is for secrets
        made = tmp
        with os.fdopen(fd, "w") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if made:
            os.unlink(made)  # ours
        raise ValueError(f"cannot write {path}: {e.strerror or first_line(e)}") from None


def inside(path, folder):  # both resolved: links cannot hide where a path is
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def run_folder_above(path):
    """The nearest folder above `path` (resolved) that holds a RUN_FILE: a run's; else None."""
    here = os.path.dirname(os.path.realpath(path))
    while not os.path.lexists(os.path.join(here, RUN_FILE)):
        here, up = os.path.dirname(here), here
        if here == up:
            return None
    return here


class RunFolder:
    """--output-dir: checkpoint-NNNNNN/ (safetensors, tokenizer, trainer state), metrics.jsonl,
    eval.json and RUN_FILE. Opening it checks and locks it (rank 0); nothing is loaded yet."""

    def __init__(self, path, settings, resume, write=True):
        self.path, self.record = path, {"settings": settings, "checkpoint": None, "saving": None}
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ValueError(f"--output-dir {path}: exists and is not a folder (or a broken link)")
        outer = run_folder_above(path)
        need(not outer, f"--output-dir {path}: inside the run folder {outer}; choose another")
        access = os.R_OK | os.X_OK | (os.W_OK if write else 0)
        denied = os.path.isdir(path) and not os.access(path, access)
        need(not denied, f"--output-dir {path}: permission denied (it must be readable, writable)")
        if resume and not os.path.lexists(self.own(RUN_FILE)):  # a folder, a link: entries()
            raise ValueError(f"--resume: {path} holds no run of brain.py")
        if write:  # rank 0; the other processes of a torchrun only read, after it
            self.lock = self.make_and_lock()
        entries = self.entries(clear=write)
        if not entries:  # a fresh run: RUN_FILE is written before the run's first file
            return
        need(RUN_FILE in entries, f"--output-dir {path} holds {entries[0]!r} and is no run folder "
                                  "of brain.py: choose a new or empty folder")  # fmt: skip
        self.record = self.read_record()
        saved, done = self.record["settings"], self.record["checkpoint"] or "no checkpoint"
        need(resume, f"{path} holds a run of brain.py ({done}): pass --resume to go on, or choose "
                     "another --output-dir")  # fmt: skip
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if saved.get(k) != v]  # fmt: skip
        need(not changed, f"--resume with other settings than the run's: {', '.join(changed)}")
        if write:
            self.finish_save()
        mine = self.record["checkpoint"]
        strays = [e for e in os.listdir(path) if CHECKPOINT.fullmatch(e) and e != mine]
        if strays:
            raise ValueError(f"{self.own(strays[0])}: not this run's checkpoint; move it away")

    def __del__(self):
        if hasattr(self, "lock"):
            os.close(self.lock)

    def own(self, name):  # a path of this run's, by the name that RUN_FILE gives it
        return os.path.join(self.path, name)

    def make_and_lock(self):
        try:
            os.makedirs(self.path, exist_ok=True)
            lock = os.open(self.path, os.O_RDONLY)  # released with this object or the process
        except OSError as e:  # under a file, a name too long, /proc, a read-only parent
            raise ValueError(f"cannot create --output-dir {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise ValueError(f"--output-dir {self.path}: another run is using it") from None
        return lock

    def entries(self, clear):
        """The folder's entries but the run's own temporary files that a crash left (`clear`:
        removed); the run's files that are there must be regular files, not links or folders."""
        try:
            entries = sorted(os.listdir(self.path))
        except OSError as e:
            raise ValueError(f"cannot read --output-dir {self.path}: {e.strerror}") from None
        for name in (RUN_FILE, METRICS, "eval.json", *LEFTOVERS):
            path = self.own(name)
            if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
                raise ValueError(f"{path}: not a regular file (a link, or a folder); move it away")
        if clear:
            for name in LEFTOVERS.intersection(entries):
                os.unlink(self.own(name))
        return [e for e in entries if e not in LEFTOVERS]

    def checked_name(self, name, pattern):
        """A name read from RUN_FILE: a plain entry of this folder (no separator, no '..', not
        absolute: the pattern says so), of the run's own pattern, and not a link."""
        ok = isinstance(name, str) and pattern.fullmatch(name)
        need(ok, f"{name!r} is not a name that the run gives ({pattern.pattern})")
        need(not os.path.islink(self.own(name)), f"{name} is a link, not the run's folder")
        return name

    def read_record(self):
        """RUN_FILE, parsed against its schema: {"settings": {...}, "checkpoint": a name or null,
        "saving": null or {"tmp": a name, "final": a name}}; one line when it is not that."""
        try:
            with open(self.own(RUN_FILE), "rb") as f:
                record = json.loads(f.read().decode("utf-8"))
            need(isinstance(record, dict), "not a JSON object")
            missing = {"settings", "checkpoint", "saving"} - set(record)
            need(not missing, f"no {', '.join(sorted(missing))}")
            need(isinstance(record["settings"], dict), "settings is not a JSON object")
            if record["checkpoint"] is not None:
                self.checked_name(record["checkpoint"], CHECKPOINT)
            saving = record["saving"]
            if saving is not None:
                keys = isinstance(saving, dict) and sorted(saving) == ["final", "tmp"]
                need(keys, 'saving is not {"tmp": ..., "final": ...}')
                self.checked_name(saving["tmp"], TMP)
                self.checked_name(saving["final"], CHECKPOINT)
                need(saving["final"] != record["checkpoint"], "saving names the checkpoint")
        except (OSError, ValueError, RecursionError) as e:  # UnicodeError is a ValueError
            raise ValueError(f"{self.own(RUN_FILE)} is damaged ({first_line(e)})") from None
        return record

    def save_record(self):
        write = lambda f: json.dump(self.record, f, indent=1)  # noqa: E731
        write_atomic(self.own(RUN_FILE), write, self.own(temp_name(RUN_FILE)))

    def remove(self, name):
        """The one place that deletes: a real folder inside this one (not a link), named by the
        run's patterns and recorded by the run (RUN_FILE, checked when read, or this process)."""
        path = self.own(name)
        need(CHECKPOINT.fullmatch(name) or TMP.fullmatch(name), f"{name!r}: not the run's")
        if os.path.islink(path) or not os.path.isdir(path):
            return
        try:
            shutil.rmtree(path)
        except OSError as e:  # read-only: the record still names it; the next resume tries again
            raise ValueError(f"cannot remove {path} ({e.strerror}): make it writable") from None

    def finish_save(self):
        """The save in progress, or one a crash cut short: once renamed into place its checkpoint
        replaces the one before, which is removed; if not, its temporary folder is removed."""
        saving = self.record["saving"]
        if not saving:
            return
        drop = saving["tmp"]
        if os.path.isfile(os.path.join(self.own(saving["final"]), TRAINER_STATE)):  # renamed
            drop, self.record["checkpoint"] = self.record["checkpoint"], saving["final"]
        if drop:
            self.remove(drop)
        self.record["saving"] = None
        self.save_record()

    def state(self, steps, device):
        """The checkpoint's trainer state (plain data for train()) and folder, or (None, None)."""
        if not self.record["checkpoint"]:
            return None, None
        folder = self.own(self.record["checkpoint"])
        path = os.path.join(folder, TRAINER_STATE)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            need(isinstance(state, dict), "not a dict")
            missing = {"step", "optimizer", "stream", "proposal"} - set(state)
            need(not missing, f"no {', '.join(sorted(missing))}")
            need(type(state["step"]) is int and state["step"] >= 0, "step is not a count")
            torch.Generator(device).set_state(state["stream"])  # the same device type
        except Exception as e:
            raise ValueError(f"{path}: damaged or from another device ({first_line(e)})") from None
        done = steps == state["step"] and os.path.isfile(self.own("eval.json"))  # evaluated too
        if steps < state["step"] or done:
            raise ValueError(f"--steps {steps}: the run is at step {state['step']}, nothing to do")
        return state, folder

    def save_checkpoint(self, step, policy, proposal, sft, tokenizer, opt, stream):
        """Write a checkpoint under a temporary name (recorded first: a crash's leftover is known),
        rename it, then drop the one before it."""
        name = f"checkpoint-{step:06d}"
        tmp = temp_name(name)
        for path in map(self.own, (name, tmp)):
            if os.path.lexists(path):
                raise ValueError(f"{path}: not this run's; move it away, then --resume")
        self.record["saving"] = {"tmp": tmp, "final": name}
        self.save_record()
        own_proposal = proposal is not sft and proposal is not policy  # a refreshed copy
        state = {"step": step, "optimizer": opt.state_dict(), "stream": stream.get_state(),
                 "proposal": proposal.state_dict() if own_proposal else None}  # fmt: skip
        try:
            os.mkdir(self.own(tmp))  # the usual permissions, as every file below
            policy.save_pretrained(self.own(tmp))
            tokenizer.save_pretrained(self.own(tmp))
            torch.save(state, os.path.join(self.own(tmp), TRAINER_STATE))
            for entry in os.scandir(self.own(tmp)):  # safetensors writes 0600: others could not
                os.chmod(entry.path, (0o777 if entry.is_dir() else 0o666) & ~UMASK)  # resume
            os.rename(self.own(tmp), self.own(name))
        except (OSError, RuntimeError) as e:  # a full disk: the previous checkpoint stays
            self.finish_save()  # drops the temporary folder
            raise ValueError(f"cannot write {self.own(name)}: {first_line(e)}") from None
        self.finish_save()  # adopts it, drops the previous one
        return self.own(name)

    def trim_metrics(self, step):
        """The log up to the resumed step, each line a JSON object with an integer step (a torn
        last line, a crash while it was written, is dropped with a note)."""
        path, kept = self.own(METRICS), []
        if not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        lines = lines[:-1] if lines[-1] == b"" else lines
        for k, raw in enumerate(lines, 1):
            try:
                line = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as e:  # UnicodeError is a ValueError
                if k < len(lines):
                    raise ValueError(f"{path}: line {k}: not JSON ({first_line(e)})") from None
                print(f"note: {path}: dropped a torn last line (a crash while it was written)")
                continue
            ok = isinstance(line, dict) and type(line.get("step")) is int
            need(ok, f'{path}: line {k}: not a JSON object with an integer "step"')
            if line["step"] <= step:
                kept.append(raw.decode("utf-8") + "\n")
        write_atomic(path, lambda f: f.writelines(kept), self.own(temp_name(METRICS)))

    def log(self, record):
        if not os.path.isfile(self.own(RUN_FILE)):  # the run's first write: mark the folder
            self.save_record()
        try:
            with open(self.own(METRICS), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise ValueError(f"cannot write {self.own(METRICS)}: {e.strerror}") from None


@contextlib.contextmanager
def stop_after_step():
    """The first Ctrl-C or SIGTERM (what schedulers send) asks the run to stop once the step in
    progress is done (a step cut in the middle could not be resumed exactly); a second: at once."""
    asked, previous = {"stop": False}, {}

    def handler(signum, frame):
        asked["stop"] = True
        signal.signal(signum, previous[signum])
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{name}: stopping after this step ({name} again: at once)", file=sys.stderr)

    with contextlib.suppress(ValueError):  # not the main thread: leave the signals as they are
        previous.update({s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)})
    try:
        yield asked
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def print_text_results(res):
    size = f"{res['prompts']} prompts x {res['samples_per_prompt']} samples"
    print(f"\nHeld-out evaluation ({size}, judged by the reward model)")
    print(f"  mean reward   policy {res['reward_policy']:+.3f}   SFT {res['reward_sft']:+.3f}")
    print(f"  win rate of the policy over the SFT model: {res['win_rate_vs_sft']:.1%}")
    if "win_rate_vs_reference" in res:
        print(f"  win rate of the policy over the references: {res['win_rate_vs_reference']:.1%}")
    kl_mc = f"{res['kl_policy_sft_mc']:.3f} +- {res['kl_policy_sft_mc_se']:.3f} nats"
    print(f"  KL(policy || SFT), Monte Carlo: {kl_mc} (standard error; it can dip below 0)")
    for ex in res["examples"]:
        print(f"  {ex['prompt']!r} -> {ex['text']!r}")


def setup_distributed(cfg):
    """(device, rank, processes): torchrun sets WORLD_SIZE; one process a device, NCCL or gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return pick_device(cfg.device), 0, 1
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank():
        os.environ["TQDM_DISABLE"] = "1"  # one progress bar, rank 0's
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return device, dist.get_rank(), dist.get_world_size()


def step_diagnostics(cfg, batch, policy_logp, loss, stop, n_procs):
    """A step's figures from what it computed anyway (no extra forward pass), averaged over the
    prompts and the processes: the loss; the samples' mean reward and spread; the policy's expected
    reward sum_i beta_hat_i r_i and a KL(policy || SFT), sum_i beta_hat_i (log q_theta(y_i) -
    log p_sft(y_i)), both self-normalised estimates on the proposal's samples; the effective
    sample size (ESS) of alpha_hat, 1 / sum_i alpha_hat_i^2, over n."""
    prop, sft, reward = batch.proposal_logp, batch.sft_logp, batch.reward
    a_hat = alpha_hat(log_posterior(sft, reward, cfg.beta), prop)
    b_hat = beta_hat(policy_logp, prop)
    kl_sn, r_policy = (b_hat * (policy_logp - sft)).sum(-1).mean(), (b_hat * reward).sum(-1).mean()
    ess = (1 / a_hat.pow(2).sum(-1)).mean() / cfg.n_samples
    stats = torch.stack([loss, reward.mean(), reward.pow(2).mean(), r_policy, kl_sn, ess, stop])
    if n_procs > 1:  # the global batch's averages, not this process's
        dist.all_reduce(stats)
        stats /= n_procs
    loss, r, r2, r_policy, kl_sn, ess, stop = stats.tolist()
    spread = max(r2 - r * r, 0.0) ** 0.5
    return dict(loss=loss, reward=r, reward_std=spread, reward_policy=r_policy, kl=kl_sn, ess=ess,
                stop=stop > 0)  # fmt: skip


def default_run_folder(model, method):
    """runs/MODEL-METHOD-YYYYmmdd-HHMMSS in the working folder, with -2, -3... if it is taken."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(model.rstrip("/"))).strip("-.")
    base = os.path.join("runs", f"{name or 'model'}-{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, k = base, 1
    while os.path.lexists(path):
        k += 1
        path = f"{base}-{k}"
    return path


def log_line(step, steps, stats, held_out=None):
    """Off a terminal (a log file, a scheduler's output), where there is no progress bar: a plain
    line every few steps (about 10 a run, at least every 10th step, the first and the last) and
    one for each held-out evaluation, flushed at once. On a terminal the bar shows them."""
    if sys.stdout.isatty():
        return
    every = max(1, min(10, steps // 10))
    if step == 1 or step % every == 0 or step == steps or stats["stop"]:
        figures = ", ".join(f"{k} {stats[k]:+.3f}" for k in ("loss", "reward", "kl"))
        figures += f", ess {stats['ess']:.3f}"  # a share of n, in [1/n, 1]
        print(f"step {step}/{steps}: {figures}, {stats['step_s']:.2f} s/step, "
              f"{stats['seconds']:.0f} s", flush=True)  # fmt: skip
    if held_out:
        h = held_out
        words = [f"reward {h['reward_policy']:+.3f} (SFT {h['reward_sft']:+.3f})",
                 f"win rate vs SFT {h['win_rate_vs_sft']:.1%}"]  # fmt: skip
        if "win_rate_vs_reference" in h:
            words.append(f"win rate vs references {h['win_rate_vs_reference']:.1%}")
        kl = f"{h['kl_policy_sft_mc']:.3f} +- {h['kl_policy_sft_mc_se']:.3f}"
        print(f"held_out step {step}: {', '.join(words)}, KL(policy || SFT) {kl} nats (MC)",
              flush=True)  # fmt: skip


def check_fits(state, policy, folder):
    """A checkpoint's Adam states and refreshed proposal have the policy's shapes (a checkpoint of
    another model would crash in the first step, or train on garbage): one line if not."""
    shapes = [p.shape for p in policy.parameters()]
    try:
        ids = [i for group in state["optimizer"]["param_groups"] for i in group["params"]]
        need(len(ids) == len(shapes), f"Adam has {len(ids)} tensors, the model {len(shapes)}")
        adam = state["optimizer"]["state"]
        for i, shape in zip(ids, shapes, strict=True):
            moments = [v for k, v in adam.get(i, {}).items() if k != "step"]
            need(all(v.shape == shape for v in moments), "Adam's shapes differ from the model's")
        own = policy.state_dict()
        proposal = state["proposal"] or own
        need(proposal.keys() == own.keys(), "the proposal's tensors differ from the model's")
        need(all(v.shape == own[k].shape for k, v in proposal.items()), "the proposal's shapes")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        path = os.path.join(folder, TRAINER_STATE)
        raise ValueError(f"{path}: not this model's state ({first_line(e)})") from None


class ModelRun:
    """--model: train a Hugging Face causal LM against a reward model, checkpoint, evaluate. All
    that needs no model is checked when it is made (Args.validate, then here), before any load."""

    def __init__(self, cfg):
        same = "method dpo_labels beta lr prompts_per_step n_samples refresh_every seed micro_batch"
        self.keys = {k: getattr(cfg, k) for k in [*same.split(), "reward_label", "max_new_tokens"]}
        for name in ("model", "reward_model"):  # keys: what --resume keeps, the files' too
            self.keys[name] = model_source(getattr(cfg, name), flag(name))
            self.keys[f"{name}_files"] = files_stamp(self.keys[name], flag(name))
        self.rows, self.keys["prompts"] = load_prompts(cfg.prompts), os.path.abspath(cfg.prompts)
        texts = [[r["prompt"], r["reference"]] for r in self.rows]
        self.keys["prompts_sha256"] = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
        self.device, self.rank, self.n_procs = setup_distributed(cfg)
        if cfg.prompts_per_step % self.n_procs:
            raise ValueError(f"prompts_per_step must be a multiple of the {self.n_procs} processes")
        self.new_folder = None if cfg.output_dir else self.name_new_folder(cfg.method)
        cfg = replace(cfg, output_dir=cfg.output_dir or self.new_folder)  # a run always has one
        self.cfg, self.folder, self.state, self.resume_from = cfg, None, None, None
        self.sft_rewards = {}  # evaluate's: the SFT model's samples are the same at every call
        if cfg.output_dir:  # rank 0 opens (and locks) the folder; the others read it after
            folder = lambda write: RunFolder(cfg.output_dir, self.keys, cfg.resume, write)  # noqa: E731
            self.folder = folder(True) if self.rank == 0 else None
            if self.n_procs > 1:
                dist.barrier()
            self.folder = self.folder or folder(False)
            self.state, self.resume_from = self.folder.state(cfg.steps, self.device)

    def name_new_folder(self, method):
        """No --output-dir: a new runs/MODEL-METHOD-YYYYmmdd-HHMMSS (rank 0's name for all),
        printed before any model loads, as the trainers users know do: nothing is lost."""
        name = [default_run_folder(self.keys["model"], method)]
        if self.n_procs > 1:
            dist.broadcast_object_list(name)  # rank 0's clock decides
        if self.rank == 0:
            print(f"run folder: {name[0]} (new; --output-dir to choose one; to go on after a "
                  f"stop: --output-dir {name[0]} --resume)", flush=True)  # fmt: skip
        return name[0]

    def load(self):
        """The reward model (first: a bad --reward-label costs no LM load), the SFT model, the task
        and the policy (the checkpoint's when resuming, wrapped in DDP with several processes)."""
        import transformers

        cfg, device, rows = self.cfg, self.device, self.rows
        seed_everything(cfg.seed)
        transformers.logging.set_verbosity_error()  # missing weights are our errors, not warnings
        transformers.logging.disable_progress_bar()
        remote = cfg.trust_remote_code
        rm = RewardModel(self.keys["reward_model"], cfg.reward_label, remote, device)
        sft, tok = load_pretrained(self.keys["model"], False, remote, quiet=self.rank > 0)
        held = max(1, len(rows) // 5)  # the last fifth of the prompts is held out for evaluation
        self.train_rows, self.eval_rows = (rows[:-held], rows[-held:]) if rows[1:] else (rows, rows)
        context, T = model_context(sft), cfg.max_new_tokens  # every prompt fits, with T more
        for row, ids in zip(rows, tok([r["prompt"] for r in rows])["input_ids"], strict=True):
            if len(ids) == 0 or (context and len(ids) + T > context):
                where = f"{cfg.prompts}: line {row['line']}"
                raise ValueError(f"{where}: the prompt is {len(ids)} tokens; with --max-new-tokens "
                                 f"{T} it must fit the model's context of {context}")  # fmt: skip
        eos = getattr(sft.generation_config, "eos_token_id", None)  # Llama-3 has two
        eos = sorted({tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
        self.task = TextTask(self.train_rows, tok, rm, cfg.max_new_tokens, eos, device)
        self.eval_task = TextTask(self.eval_rows, tok, rm, cfg.max_new_tokens, eos, device)
        if not cfg.micro_batch and device.type == "cpu":  # (ours) at most ~2^25 logits a pass
            length = self.task.prompt_ids.shape[1] + cfg.max_new_tokens
            fits = max(1, 2**25 // (length * len(tok) * cfg.n_samples)) * cfg.n_samples
            fits = 0 if fits >= cfg.prompts_per_step * cfg.n_samples else fits  # 0: all at once
            self.cfg = replace(cfg, micro_batch=fits)
        self.sft, self.tokenizer = frozen(sft.to(device)), tok  # frozen() copies: sft is free
        policy = sft  # the policy starts at the SFT model, or at the checkpoint's weights
        if self.resume_from:
            policy = load_pretrained(self.resume_from, False, remote, True)[0]
            check_fits(self.state, policy, self.resume_from)
        self.model = policy.to(device).requires_grad_(True)
        if self.n_procs > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def after_step(self, step, policy, proposal, opt, stream, bar, batch, policy_logp, loss):
        """Log, evaluate, checkpoint, stop: all after a whole step (train's on_step)."""
        cfg, folder, K = self.cfg, self.folder, self.cfg.refresh_every
        stop = torch.tensor(float(self.asked["stop"]), device=self.device)
        stats = step_diagnostics(cfg, batch, policy_logp, loss, stop, self.n_procs)
        if self.rank == 0:
            grads = [p.grad.norm() for p in policy.parameters() if p.grad is not None]
            now, self.last_eval = time.time(), None
            source = "sft" if K == 0 else "policy" if K == 1 else f"policy, refreshed every {K}"
            stats.update(samples_from=source, grad_norm=torch.stack(grads).norm().item())
            stats.update(step_s=round(now - self.step_t, 3), seconds=round(now - self.t0, 3))
            bar.set_postfix({k: f"{stats[k]:.2f}" for k in ("reward_policy", "kl", "ess")})
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                self.last_eval = self.evaluate(policy)
            self.step_t = time.time()  # an evaluation's time is not the step's
            log_line(step, cfg.steps, stats, self.last_eval)  # off a terminal: plain lines
            if folder:
                folder.log({"step": step, **{k: v for k, v in stats.items() if k != "stop"}})
                if self.last_eval:
                    held_out = {k: v for k, v in self.last_eval.items() if k != "examples"}
                    folder.log({"step": step, "held_out": held_out})
                due = cfg.save_every and step % cfg.save_every == 0
                if due or step == cfg.steps or stats["stop"]:
                    folder.save_checkpoint(step, policy, proposal, self.sft, self.tokenizer, opt,
                                           stream)  # fmt: skip
        if stats["stop"] and step < cfg.steps:  # every rank agrees (step_diagnostics)
            if self.n_procs > 1:
                dist.barrier()  # rank 0 has saved the checkpoint
            saved = f"; checkpoint saved in {cfg.output_dir}, go on with --resume" * bool(folder)
            raise KeyboardInterrupt(f"interrupted after step {step}{saved}")  # main prints it

    def eval_batch(self, policy, prompts, u_policy, u_sft):
        """One batch of the evaluation: `prompts` (a slice) and their samples' scores."""
        task, sft, k, T = self.eval_task, self.sft, self.cfg.eval_samples, self.cfg.max_new_tokens
        x, xm = (t[prompts].repeat_interleave(k, 0) for t in (task.prompt_ids, task.prompt_mask))
        eos, pad = task.eos_id, task.pad_id
        with autocast(self.device):
            y, ym, policy_logp = sample_completions(policy, x, xm, T, eos, pad, u_policy)
            sft_logp = sequence_logprobs(sft, *join(x, xm, y, ym), eos)
            if self.device.type == "cuda":  # under bf16 the sampler's cached pass differs a little
                policy_logp = sequence_logprobs(policy, *join(x, xm, y, ym), eos)
        key = (prompts.start, prompts.stop)  # (ours) the SFT model's samples: drawn once a run
        if key not in self.sft_rewards:
            with autocast(self.device):
                y0, ym0, _ = sample_completions(sft, x, xm, T, eos, pad, u_sft)
            self.sft_rewards[key] = task.reward(x, xm, y0, ym0)
        first = slice(0, max(0, 4 - prompts.start) * k, k)  # the first sample of 4 prompts
        texts = task.texts(x[first], xm[first], y[first], ym[first]) if prompts.start < 4 else []
        rewards = task.reward(x, xm, y, ym), self.sft_rewards[key]
        return (policy_logp - sft_logp).double(), *rewards, texts

    @torch.no_grad()
    def evaluate(self, policy):
        """Held-out prompts, --eval-samples completions each from the policy and the SFT model (the
        SFT model's drawn at the first call: they are the same at every one): mean rewards, win
        rates judged by the reward model (ties count half), and a Monte Carlo (MC) estimate of
        KL(policy || SFT) = E_policy[log q(y|x) - log p(y|x)], with its error. In batches of
        --micro-batch samples (or a step's): memory does not grow with the prompts."""
        cfg, device, task, rows = self.cfg, self.device, self.eval_task, self.eval_rows
        k, size = cfg.eval_samples, cfg.micro_batch or cfg.prompts_per_step * cfg.n_samples
        n = max(1, size // k)  # prompts a batch
        gen = torch.Generator(device).manual_seed(cfg.seed + 1)
        shape = (len(rows) * k, cfg.max_new_tokens)  # the same numbers however it is batched
        u_policy, u_sft = (torch.rand(shape, device=device, generator=gen) for _ in range(2))
        parts = []
        for a in range(0, len(rows), n):
            cols = slice(a * k, (a + n) * k)
            parts.append(self.eval_batch(policy, slice(a, a + n), u_policy[cols], u_sft[cols]))
        log_ratio, r_policy, r_sft = (torch.cat(t) for t in list(zip(*parts, strict=True))[:3])
        texts = zip(rows[:4], [t for part in parts for t in part[3]], strict=True)
        wins = lambda a, b: ((a > b).float() + 0.5 * (a == b).float()).mean().item()  # noqa: E731
        se = (log_ratio.std() / len(log_ratio) ** 0.5).nan_to_num().item()
        out = dict(prompts=len(rows), samples_per_prompt=k, reward_policy=r_policy.mean().item(),
                   reward_sft=r_sft.mean().item(), win_rate_vs_sft=wins(r_policy, r_sft),
                   kl_policy_sft_mc=log_ratio.mean().item(), kl_policy_sft_mc_se=se,
                   examples=[dict(prompt=r["prompt"], text=t) for r, t in texts])  # fmt: skip
        with_ref = [i for i, r in enumerate(rows) if r["reference"]]
        if with_ref:  # prompt + reference, through the same tokenizer and decoding as the samples
            tok, plain = task.tokenizer, dict(add_special_tokens=False)
            ids = [tok(rows[i]["prompt"]).input_ids + tok(rows[i]["reference"], **plain).input_ids
                   for i in with_ref]  # fmt: skip
            texts = tok.batch_decode(ids, skip_special_tokens=True)
            batches = range(0, len(texts), size)
            r_ref = torch.cat([task.rm.score(texts[a : a + size]) for a in batches]).to(device)
            r_pol = r_policy.view(len(rows), k)[with_ref]
            out["win_rate_vs_reference"] = wins(r_pol, r_ref[:, None].expand_as(r_pol))
            out["reward_reference"] = r_ref.mean().item()
        return out

    def run(self):
        """train_and_evaluate(); a new default folder that the run wrote nothing to (it failed
        before its first step ended) is removed again."""
        try:
            return self.train_and_evaluate()
        finally:
            if self.new_folder and self.rank == 0 and not os.listdir(self.new_folder):
                os.rmdir(self.new_folder)

    def train_and_evaluate(self):
        """Load; Part I's train() with this run's policy, state and after_step; evaluate."""
        self.load()
        cfg, start = self.cfg, self.state["step"] if self.state else 0
        if self.folder and self.rank == 0:
            self.folder.trim_metrics(start)
        if self.rank == 0:
            split = f"held out: {len(self.eval_rows)}" if len(self.rows) > 1 else "one, evaluated"
            where = f"{self.n_procs} process(es) on {self.device}"
            size = f"micro-batches of {cfg.micro_batch or 'all'} samples"
            print(f"training {cfg.model} with {cfg.method} on {len(self.train_rows)} prompts "
                  f"({split}), steps {start} -> {cfg.steps}, {where}, {size}")  # fmt: skip
        self.t0 = self.step_t = time.time()
        self.last_eval, results = None, None
        with stop_after_step() as self.asked:
            policy = train(cfg, self.sft, self.task, self.model, self.state, self.after_step)
            if self.rank == 0:  # the held-out evaluation (done when --eval-every reached the end)
                results = self.last_eval or self.evaluate(policy)
                results.update(config=asdict(cfg), train_s=round(time.time() - self.t0, 2))
                if self.folder:  # written before anything is printed (main prints the results)
                    own = self.folder.own
                    write = lambda f: json.dump(results, f, indent=2)  # noqa: E731
                    write_atomic(own("eval.json"), write, own(temp_name("eval.json")))
        if self.n_procs > 1:
            dist.barrier()
            dist.destroy_process_group()
        return results


# Benchmark (python brain.py --bench): is a BRAIn step as cheap as fine-tuning on the samples? -----
#    Ratios on the same machine, so that machine noise cancels.
def timed(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def bench_model(name, model, prompt_ids, B, n, T, device, steps=20, warmup=3):
    """A row for `model` (an HF causal LM), B prompts x n samples of T tokens, medians: an optimizer
    step, BRAIn against cross-entropy on the same tokens; our sampler against generate()."""
    model, g = model.to(device).eval(), torch.Generator(device).manual_seed(0)
    x = prompt_ids.to(device).repeat_interleave(n, 0)
    xm, opt = torch.ones_like(x), torch.optim.Adam(model.parameters(), lr=1e-5)
    sample = lambda: sample_completions(  # noqa: E731 (T tokens each: no EOS, -1)
        model, x, xm, T, -1, uniforms=torch.rand(B * n, T, device=device, generator=g)
    )
    settings = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=T)
    settings.update(max_new_tokens=T, pad_token_id=0)
    generate = lambda: model.generate(input_ids=x, attention_mask=xm, **settings)  # noqa: E731
    with torch.no_grad(), autocast(device):
        y, _, q_logp = sample()
    seqs, q_logp = join(x, xm, y, torch.ones_like(y)), q_logp.view(B, n)
    target = q_logp + torch.randn(B, n, device=device, generator=g)  # scores, given
    labels = torch.where(seqs[2][:, 1:].bool(), seqs[0][:, 1:], -100).reshape(-1)

    def update(key):  # one optimizer step: BRAIn's loss, or cross-entropy on the same tokens
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            if key == "brain":
                loss = brain_loss(sequence_logprobs(model, *seqs, -1).view(B, n), q_logp, target)
            else:
                logits = model(input_ids=seqs[0], attention_mask=seqs[1]).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels)
        loss.backward()
        opt.step()

    times = {k: [] for k in ("brain", "ce", "ours", "generate")}
    for i in progress(range(warmup + steps), f"bench {name}"):  # in turns: drift hits both
        for key in ("brain", "ce")[:: 1 if i % 2 else -1]:
            times[key] += [timed(lambda: update(key), device)] if i >= warmup else []
        with torch.no_grad(), autocast(device):
            for key, fn in (("ours", sample), ("generate", generate)):
                times[key] += [timed(fn, device)] if i >= warmup else []
    med = {k: float(np.median(v)) for k, v in times.items()}
    tokens, params = B * n * T, round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return dict(model=name, params_m=params, B=B, n=n, prompt_tokens=x.shape[1], new_tokens=T,
                brain_step_s=med["brain"], ce_step_s=med["ce"], step_ratio=med["brain"] / med["ce"],
                sampler_tok_s=tokens / med["ours"], generate_tok_s=tokens / med["generate"],
                sampler_ratio=med["generate"] / med["ours"])  # fmt: skip


def bench(cfg, show=True):
    """The benchmark table: the embedded model and a GPT-2-small-sized model built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    toy = ToyWorld(device)
    rows = [bench_model("embedded GPT-2 (toy)", toy.new_model().gpt, toy.prompt_ids.repeat(2, 1),
                        16, 8, MAX_NEW_TOKENS, device)]  # fmt: skip
    # GPT-2 small on a CPU takes seconds a step: a smaller batch there (the ratios are what count)
    B, n, P, T = (16, 8, 16, 64) if device.type == "cuda" else (2, 2, 8, 16)
    gpt2 = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, 768 wide, 124M, random weights
    prompts = torch.randint(0, gpt2.config.vocab_size, (B, P))
    rows.append(bench_model("GPT-2-small-sized", gpt2, prompts, B, n, T, device))
    result = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads())
    result.update(rows=rows, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if show:
        print_bench(result)
    return result


def print_bench(result):
    where = f"{result['device']} (torch {result['torch']}, {result['threads']} threads)"
    print(f"\nBenchmark on {where}")
    rows = []
    for r in result["rows"]:
        size = [r["model"], f"{r['params_m']:.1f}M", f"{r['B']} x {r['n']}"]
        step = [f"{r['brain_step_s'] * 1e3:.1f}ms", f"{r['ce_step_s'] * 1e3:.1f}ms"]
        sampler = [f"{r['sampler_tok_s']:.0f}", f"{r['generate_tok_s']:.0f}"]
        size += [f"{r['prompt_tokens']}+{r['new_tokens']}"]
        rows.append([*size, *step, f"{r['step_ratio']:.3f}", *sampler, f"{r['sampler_ratio']:.3f}"])
    header = ["model", "params", "B x n", "tokens", "BRAIn step", "CE step", "ratio"]
    print_table([*header, "sampler tok/s", "generate", "ratio"], rows)
    gpu = f", {result['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in result else ""
    print(f"medians; peak resident set size (RSS): {result['peak_rss_mb']:.0f} MB{gpu}")
    print("ratio: BRAIn step / cross-entropy step on the same tokens; sampler: ours / generate()")


# The command line: one flag per field of Args (Config and the options below), help from the field
@dataclass
class Args(Config):
    """Config, plus the options of real models (--model) and of the commands."""

    # real models (--model)
    model: str | None = arg(None, "causal LM (Hub name or folder): the SFT prior and the start")
    reward_model: str | None = arg(None, "sequence-classification reward model (name or folder)")
    reward_label: str | None = arg(
        None, "the reward model's label whose logit is the reward (default: its only label; a "
        "model with several labels needs it)",
    )  # fmt: skip
    prompts: str | None = arg(
        None, 'JSON lines {"prompt": "text", "reference": "text"}: "prompt" required; '
        '"reference" optional, used only by the held-out evaluation (win rate over it)',
    )  # fmt: skip
    max_new_tokens: int = arg(32, "completion length limit, EOS included")
    output_dir: str | None = arg(
        None, "the run's own folder: checkpoints, metrics, evaluation (default: a new "
        "runs/MODEL-METHOD-YYYYmmdd-HHMMSS in the working folder, printed at the start; "
        "--resume needs it named)",
    )  # fmt: skip
    save_every: int = arg(0, "checkpoint every K steps (0: at the end only)")
    resume: bool = arg(False, "continue the run in --output-dir from its last checkpoint")
    eval_samples: int = arg(4, "completions per held-out prompt in the evaluation")
    eval_every: int = arg(0, "evaluate on the held-out prompts every K steps too (0: at the end)")
    trust_remote_code: bool = arg(False, "let transformers run code shipped with the model")
    # commands
    compare: bool = arg(False, "train every estimator on identical sample streams (--methods)")
    methods: str | None = arg(None, f"with --compare: some of {', '.join(VARIANTS)} (default: all)")
    seeds: int = arg(3, "with --compare: seeds seed, seed+1, ...")
    lrs: str = arg(",".join(map(str, LR_GRID)),
                   "with --compare: each method trains at the best of these lrs on a tuning seed, "
                   "seed+1000 (one lr: no tuning)")  # fmt: skip
    bench: bool = arg(
        False, "time a BRAIn step against fine-tuning, our sampler against generate()"
    )
    json: str | None = arg(None, "write the results as JSON to this file")

    def __post_init__(self):
        if self.model:  # (ours) a pretrained LM needs a far gentler step, and on-policy samples
            self.lr = 1e-5 if self.lr is None else self.lr  # (README, "Real models": measured)
            self.refresh_every = 1 if self.refresh_every is None else self.refresh_every
        super().__post_init__()

    def validate(self):
        """Config's checks, then the options': everything that needs no model, before any work."""
        super().validate()
        plain = Args(model=self.model, method=self.method)  # the defaults, to see what was given
        given = lambda *keys: [flag(k) for k in keys if getattr(self, k) != getattr(plain, k)]  # noqa: E731
        for name in ("model", "reward_model", "prompts", "output_dir", "json"):
            text = getattr(self, name)
            need(text is None or text.strip(), f"{flag(name)} is empty")
        model_only = given("reward_model", "reward_label", "prompts", "output_dir", "resume",
                           "save_every", "eval_every", "eval_samples", "max_new_tokens",
                           "trust_remote_code")  # fmt: skip
        need(self.model or not model_only, f"{', '.join(model_only)}: only with --model")
        need(not self.model or self.reward_model, "--model needs --reward-model (a classifier)")
        need(not self.model or self.prompts, "--model needs --prompts (a JSON-lines file)")
        need(not self.resume or self.output_dir, "--resume needs --output-dir (the run's folder)")
        least = dict(max_new_tokens=1, eval_samples=1, save_every=0, eval_every=0, seeds=1)
        for name, low in least.items():
            need(getattr(self, name) >= low, f"{name} must be >= {low}, got {getattr(self, name)}")
        need(not (self.compare and self.model), "--compare runs on the embedded world, not --model")
        clash = given("compare", "model", "n_samples", "steps", "prompts_per_step")
        need(not self.bench or not clash, f"--bench builds its own models: drop {', '.join(clash)}")
        need(self.compare or not given("methods", "seeds", "lrs"),
             "--methods, --seeds, --lrs: with --compare")  # fmt: skip
        need(not (self.compare and given("lr")), "--compare picks each method's lr: use --lrs")
        try:
            lrs = [float(x) for x in self.lrs.split(",")]
        except ValueError:
            lrs = []
        need(
            lrs and all(0 < x <= 1 for x in lrs),
            f"--lrs {self.lrs}: numbers in (0, 1], a comma between",
        )
        unknown = [m for m in self.variants() if m not in VARIANTS] or not self.variants()
        need(not unknown, f"--methods {self.methods}: choose from {', '.join(VARIANTS)}")
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
        need(self.model or not torchrun, "several processes (torchrun) are for --model runs")
        if self.prompts and not os.path.isfile(self.prompts):
            there = os.path.exists(self.prompts)
            what = "a folder" if os.path.isdir(self.prompts) else "not a regular file"
            raise ValueError(f"--prompts {self.prompts}: {what if there else 'no such file'}")
        if self.json:  # a regular file (or none yet), outside the run's inputs and run folders
            path, where = os.path.realpath(self.json), f"--json {self.json}"
            need(not os.path.isdir(path), f"{where}: a folder")
            kind = os.stat(path).st_mode if os.path.exists(path) else stat.S_IFREG
            need(stat.S_ISREG(kind), f"{where}: not a regular file (a device, a pipe...)")
            inputs = filter(None, (self.prompts, self.model, self.reward_model))
            need(not any(inside(path, p) for p in inputs), f"{where}: an input of the run")
            out = self.output_dir if self.output_dir and inside(path, self.output_dir) else None
            folder = run_folder_above(path) or out
            need(not folder, f"{where}: inside a run folder ({folder}); write it elsewhere")
            need(os.access(os.path.dirname(path), os.W_OK), f"{where}: cannot write in its folder")
        return self

    def variants(self):
        return list(VARIANTS) if self.methods is None else self.methods.replace(" ", "").split(",")


def flag(name):  # a field's command-line flag
    return "--" + name.replace("_", "-")


EXAMPLES = """examples:
  python brain.py                                   BRAIn on the embedded world (exact metrics)
  python brain.py --method rloo                     RL on the same objective (on-policy)
  python brain.py --compare --methods brain,dpg     estimators on identical sample streams
  python brain.py --model DIR --reward-model DIR --prompts p.jsonl
                                                    a real LM; it prints its new folder, runs/NAME
  python brain.py ... --output-dir runs/NAME --resume
                                                    go on from that run's last checkpoint
  torchrun --nproc_per_node=2 brain.py --model ...  the same, data-parallel
  python brain.py --bench                           a BRAIn step against plain fine-tuning"""
GROUPS = {"method": "the method", "steps": "training", "sft_steps": "the embedded world",
          "model": "real models (--model)", "compare": "commands"}  # fmt: skip


def parse_args(argv=None):
    """The flags, one per field of Args, with its help and its default (--model's, if other)."""
    about = "BRAIn (Pandey et al., ICML 2024): the embedded toy world by default; --model for HF."
    p = argparse.ArgumentParser(prog="brain.py", description=about, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")  # no usage
    group = p
    for f in fields(Args):
        group = p.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        help = f.metadata["help"]
        if f.type is bool:
            group.add_argument(flag(f.name), action="store_true", help=help)
            continue
        kw = dict(type=getattr(f.type, "__args__", (f.type,))[0], default=f.default)  # str | None
        plain, with_model = getattr(Args(), f.name), getattr(Args(model="m"), f.name)
        other = f"; {with_model} with --model" if with_model != plain else ""
        help += f" (default: {plain}{other})" if plain is not None else ""
        group.add_argument(flag(f.name), help=help, metavar=f.name.upper(), **kw)
    try:
        return Args(**vars(p.parse_args(argv))).validate()
    except ValueError as e:
        p.error(str(e))


def show(args, results):  # the results on screen, once every file is written
    if args.model and results is not None:
        print_text_results(results)
    elif not (args.bench or args.compare or args.model):
        print_run(results)
    if args.json and results is not None:
        print(f"\nmetrics written to {args.json}")
    sys.stdout.flush()  # a stdout that fails fails here, in main, not at the exit


def output_gone(e, done):
    """stdout failed: a reader that left (| head -1) or a full disk (> /dev/full). The files are
    written before anything is printed; what is left of the output goes nowhere, quietly."""
    null = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):  # ValueError: no file descriptor (a test's)
        os.dup2(null, sys.stdout.fileno())
    os.close(null)
    if e.errno == errno.EPIPE:  # the reader has what it wanted
        return 0 if done else 1
    print(f"brain.py: error: cannot write the output ({e.strerror})", file=sys.stderr)
    return 1


def main(argv=None):
    args, results = parse_args(argv), None
    try:
        if args.bench:
            results = bench(args)
        elif args.model:
            results = ModelRun(args).run()
        elif args.compare:
            lrs = [float(x) for x in args.lrs.split(",")]
            results = compare(args, args.seeds, args.variants(), lrs)
        else:
            results = run(args)
        if args.json and results is not None:  # checked in Args.validate: a regular file
            write_atomic(os.path.realpath(args.json), lambda f: json.dump(results, f, indent=2))
        show(args, results)
    except ValueError as e:  # our checks: one line, no traceback
        print(f"brain.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a stop after a step (after_step says which), or at once
        print(f"brain.py: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError) as e:
        hint = "try a smaller --micro-batch, --prompts-per-step or --n-samples"
        print(f"brain.py: error: out of memory ({first_line(e)}): {hint}", file=sys.stderr)
        return 1
    except OSError as e:  # stdout, the only file that is not ours to check
        if e.errno not in (errno.EPIPE, errno.ENOSPC):
            raise
        return output_gone(e, results is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
