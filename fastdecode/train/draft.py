"""`fastdecode train draft`: a small draft model distilled from the target on the target's own answers.

The draft (models/draft.py) is `layers` Llama layers initialised from the target's, with the target's
embedding and LM head shared and frozen. Loss: forward KL(p_target || p_draft) at every position of the
training sequences (DistillSpec's choice for greedy acceptance), the target's logits computed on the fly.
With a draft vocabulary (the `draft_vocab` most frequent answer tokens) both distributions are over its
tokens, the target's renormalised: what the draft will propose from, at a sixth of the LM-head cost.
Weights in fp32, products in the target's dtype (autocast), AdamW with warmup and cosine decay.

Measured as training goes, on the held-out split: top-1 agreement of draft and target on answer
tokens, and the mean accepted length of a greedy chain draft of depth k computed from runs of agreement
(exact for greedy decoding: the sequences are the target's greedy answers). A checkpoint is written
every `save_every` steps (`--resume` continues it); the artifact (`draft.safetensors` + `manifest.json`,
bf16) and a loss/agreement plot are written at the end, or when `time_limit` runs out.

`kind="eagle"` (`fastdecode train eagle`) trains an EAGLE drafter (models/draft.py, FeatureDraft) the same
way: its row i reads the target's feature f_i and token t_{i+1} and is trained to give the target's
distribution at i+1 (the KL above) and f_{i+1} itself (smooth L1, weight `feature_weight`). With
`unroll=2` it is also trained one step further on its own predicted features (a second pass whose rows read
the first pass's outputs: the situation of every drafted token after the first). Its held-out agreement is
that of the first drafted token (teacher-forced features); the chain estimate is then an upper bound.

`kind="medusa"` (`fastdecode train medusa`) trains `heads` Medusa heads on the target's features: head k at
row i is trained to give the target's distribution at row i+1+k (the KL, weighted 0.8^k as in Medusa).
Its held-out agreement is head 0's; its chain estimate assumes every head is as good (an upper bound).
`kind="hydra"` (`fastdecode train hydra`) trains Hydra heads the same way; head k at row i also reads the
tokens t_{i+1} .. t_{i+1+k} (teacher-forced: the target's own greedy answer), Hydra's training with the
target's distribution as soft labels (Hydra++'s teacher loss).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastdecode.models.draft import (
    HydraDraft,
    draft_vocabulary,
    init_draft,
    init_eagle,
    init_heads,
    save_draft,
    target_info,
    trainable_state,
)
from fastdecode.train.data import data_hash, load_split, read_manifest

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    layers: int = 2
    init_layers: tuple[int, ...] = ()  # target layers the draft starts from (default: the first `layers`)
    steps: int = 3000
    batch_tokens: int = 16384  # padded tokens per batch
    max_len: int = 768  # sequences are cut to this many tokens
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    eval_every: int = 250
    eval_sequences: int = 96
    save_every: int = 500
    chain_depth: int = 6  # depth of the chain draft whose accepted length is estimated
    seed: int = 0
    time_limit: float = 0.0  # seconds of training before stopping early and saving (0: none)
    draft_vocab: int = 8192  # LM head rows kept: the most frequent answer tokens (0: the whole vocabulary)
    kind: str = "draft"  # "draft" (a draft model on tokens), "eagle", "medusa" or "hydra" (drafters on the target's features)
    feature_weight: float = 1.0  # eagle: weight of the feature regression beside the KL
    unroll: int = 1  # eagle: passes over its own predicted features in training (1: teacher-forced only)
    heads: int = 4  # medusa, hydra: heads (draft depth)

    def validate(self) -> None:
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.init_layers and len(self.init_layers) != self.layers:
            raise ValueError(f"init_layers names {len(self.init_layers)} layers; the draft has {self.layers}")
        if self.steps < 1 or self.batch_tokens < self.max_len or self.max_len < 2:
            raise ValueError("steps >= 1, max_len >= 2 and batch_tokens >= max_len are needed")
        if not 0 < self.lr < 1 or self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr in (0, 1), warmup >= 0 and min_lr_ratio in [0, 1] are needed")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.eval_every < 1 or self.save_every < 1 or self.eval_sequences < 1 or self.chain_depth < 1:
            raise ValueError("eval_every, save_every, eval_sequences and chain_depth must be >= 1")
        if self.kind not in ("draft", "eagle", "medusa", "hydra"):
            raise ValueError(f"kind must be draft, eagle, medusa or hydra, got {self.kind!r}")
        if not 1 <= self.heads <= 16:
            raise ValueError(f"heads must be in 1..16, got {self.heads}")
        if self.feature_weight < 0 or not 1 <= self.unroll <= 4:
            raise ValueError("feature_weight must be >= 0 and unroll in 1..4")


def batches(seqs: list[tuple[list[int], int]], settings: TrainSettings, rng: random.Random) -> list[list[int]]:
    """One epoch of batches (indices into `seqs`): similar lengths together, at most `batch_tokens` padded tokens."""
    idx = list(range(len(seqs)))
    rng.shuffle(idx)
    out: list[list[int]] = []
    pool = 64 * max(1, settings.batch_tokens // settings.max_len)
    for p in range(0, len(idx), pool):
        part = sorted(idx[p : p + pool], key=lambda i: len(seqs[i][0]))
        cur: list[int] = []
        for i in part:
            longest = min(settings.max_len, max([len(seqs[j][0]) for j in cur] + [len(seqs[i][0])]))
            if cur and longest * (len(cur) + 1) > settings.batch_tokens:
                out.append(cur)
                cur = []
            cur.append(i)
        if cur:
            out.append(cur)
    rng.shuffle(out)
    return out


def collate(seqs: list[tuple[list[int], int]], batch: list[int], max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid): right-padded token ids and which positions hold tokens."""
    T = min(max_len, max(len(seqs[i][0]) for i in batch))
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    valid = torch.zeros(len(batch), T, dtype=torch.bool)
    for r, i in enumerate(batch):
        s = seqs[i][0][:T]
        ids[r, : len(s)] = torch.tensor(s)
        valid[r, : len(s)] = True
    return ids.to(device), valid.to(device)


class LayerCaches:
    """A KV cache of one tensor per layer, for forwards that are differentiated: a layer's writes then never
    touch a tensor another layer saved for its backward (the engine's single (L, ...) tensor would)."""

    def __init__(self, model: Any, batch: int, length: int, dtype: torch.dtype):
        cfg = model.cfg
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in range(cfg.num_layers)]
        self.max_len, self.length = length, 0


def hidden_states(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, D) final hidden states (after the final norm) of a causal forward over `ids` from an empty cache
    (right padding is harmless). Logits are then taken only where they count, by `head_logits`."""
    B, T = ids.shape
    cache = LayerCaches(model, B, T, model.dtype)
    pos = torch.arange(T, device=ids.device)[None].expand(B, T)
    _, hidden = model(ids, pos, cache, hidden_only=True)
    return hidden


def draft_rows(draft: Any, ids: torch.Tensor, valid: torch.Tensor, target_hidden: torch.Tensor, unroll: int = 1,
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The draft's hidden states beside the rows of the target's they stand for: a list of (hidden (N, D),
    rows (B, T) bool) whose i-th hidden row predicts what the target's i-th selected row does (the next token).
    A draft model: one pass over the tokens, every valid row. An EAGLE drafter: pass 1 reads (f_i, t_{i+1})
    and stands for row i+1; pass u reads pass u-1's outputs as its features, one row further on. Medusa:
    head k reads f_i and stands for row i+1+k. Hydra: head k reads f_i and t_{i+1} .. t_{i+1+k}, and stands
    for row i+1+k."""
    if isinstance(draft, HydraDraft):
        T = ids.shape[1]
        out = []
        for k in range(min(len(draft.heads), T - 1)):
            n = T - 1 - k  # rows i = 0 .. n-1 have their k+1 next tokens
            tokens = torch.stack([ids[:, 1 + j : 1 + j + n] for j in range(k + 1)], -1)  # (B, n, k+1)
            rows = torch.zeros_like(valid)
            rows[:, k + 1 :] = valid[:, k + 1 :]
            out.append((draft.head_hidden(k, target_hidden[:, :n], tokens)[valid[:, k + 1 :]], rows))
        return out
    if hasattr(draft, "heads"):
        T = ids.shape[1]
        out = []
        hh = draft.head_hidden(target_hidden)  # (K, B, T, D)
        for k in range(min(len(hh), T - 1)):
            rows = torch.zeros_like(valid)
            rows[:, k + 1 :] = valid[:, k + 1 :]
            out.append((hh[k][:, : T - 1 - k][valid[:, k + 1 :]], rows))
        return out
    if not hasattr(draft, "fc"):
        return [(hidden_states(draft, ids)[valid], valid)]
    out = []
    feats = target_hidden
    for u in range(1, unroll + 1):
        B, T = ids.shape
        if T <= u:
            break
        cache = LayerCaches(draft, B, T - u, draft.dtype)
        pos = torch.arange(T - u, device=ids.device)[None].expand(B, T - u)
        _, h = draft(ids[:, u:], pos, cache, hidden_only=True, features=feats[:, : T - u])  # row i stands for row i+u
        rows = torch.zeros_like(valid)
        rows[:, u:] = valid[:, u:]
        out.append((h[valid[:, u:]], rows))
        feats = h
    return out


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the selected rows `hidden` (N, D) over the LM-head rows `weight` (V', D)."""
    return F.linear(hidden, weight).float()


def kl_loss(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_target || p_draft) per row, averaged. Over a draft vocabulary both are distributions
    over its tokens: the target's restricted and renormalised, which is what the draft can match."""
    lp = F.log_softmax(target_logits, -1)
    lq = F.log_softmax(draft_logits, -1)
    return F.kl_div(lq, lp, log_target=True, reduction="batchmean")


@torch.no_grad()
def evaluate(
    target: Any, draft: Any, seqs: list[tuple[list[int], int]], settings: TrainSettings, autocast: Any, vocab: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out top-1 agreement on answer tokens (the target's argmax over the whole vocabulary against the
    draft's over its own) and the mean accepted length of a depth-k greedy chain; KL as in training."""
    agree_total, count, accepted, starts = 0, 0, 0, 0
    kl_sum, kl_n = 0.0, 0
    dev = draft.device
    full_w = target.lm_head.weight
    sub_w = full_w if vocab is None else full_w[vocab]
    order = list(range(min(len(seqs), settings.eval_sequences)))
    for b in range(0, len(order), 16):
        batch = order[b : b + 16]
        ids, valid = collate(seqs, batch, settings.max_len, dev)
        with autocast():
            th = hidden_states(target, ids)
            (dh, valid), *_ = draft_rows(draft, ids, valid, th)  # the first drafted token's rows
            tl = head_logits(th[valid], full_w)  # (N, V): rows the draft predicts
            dl = head_logits(dh, sub_w)
        tl_sub = tl if vocab is None else tl[:, vocab]
        kl_sum += float(kl_loss(tl_sub, dl)) * len(tl)
        kl_n += len(tl)
        guess = dl.argmax(-1) if vocab is None else vocab[dl.argmax(-1)]
        same_rows = (tl.argmax(-1) == guess).cpu()
        same = torch.zeros(valid.shape, dtype=torch.bool)
        same[valid.cpu()] = same_rows
        for r, i in enumerate(batch):
            n = min(len(seqs[i][0]), ids.shape[1])
            a0 = seqs[i][1] - 1  # row a0 predicts the first answer token
            row = same[r, a0 : n - 1].tolist()  # rows that predict answer tokens
            agree_total += sum(row)
            count += len(row)
            run = 0  # accepted drafts from each answer position: consecutive agreements, capped at k
            for j in range(len(row) - 1, -1, -1):
                run = run + 1 if row[j] else 0
                accepted += min(run, settings.chain_depth)
            starts += len(row)
    return {
        "agreement": agree_total / max(count, 1),
        "accepted_per_step": accepted / max(starts, 1),  # + 1 bonus token = the estimated MAT of the chain
        "kl": kl_sum / max(kl_n, 1),
    }


def _coverage(seqs: list[tuple[list[int], int]], vocab: torch.Tensor) -> float:
    """The share of answer tokens inside the draft vocabulary."""
    kept = set(vocab.tolist())
    inside = sum(1 for ids, plen in seqs for t in ids[plen:] if t in kept)
    return round(inside / max(1, sum(len(ids) - plen for ids, plen in seqs)), 4)


def lr_at(step: int, settings: TrainSettings, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio`; with a time limit the decay runs by whichever of
    steps and time is further along, so a run cut short by the clock still ends at the low rate."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    t = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    if settings.time_limit:
        t = max(t, elapsed / settings.time_limit)
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def plot(history: list[dict[str, float]], evals: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8, label="train loss")
    if evals:
        a.plot([e["step"] for e in evals], [e["kl"] for e in evals], "o-", label="held-out KL")
        b.plot([e["step"] for e in evals], [e["agreement"] for e in evals], "o-", label="top-1 agreement")
        b.plot([e["step"] for e in evals], [e["accepted_per_step"] / 10 for e in evals], "s--", label="accepted per step / 10")
    a.set_xlabel("step")
    a.set_yscale("log")
    a.legend()
    b.set_xlabel("step")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_draft(
    target: Any, data: Path, out: Path, settings: TrainSettings, command: str = "", resume: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Train a draft model for `target` on the dataset at `data`; write the artifact to `out`. Returns its manifest."""
    settings.validate()
    t_start = time.perf_counter()
    target = getattr(target, "eager_model", target)
    dmanifest = read_manifest(data)
    from fastdecode.models.draft import same_target

    why = same_target(dmanifest.get("target", {}), target)
    if why is not None:
        raise ValueError(f"training data {data} was made by another target: {why}")
    train = load_split(data, "train")
    held = load_split(data, "heldout")
    if not train:
        raise ValueError(f"training data {data} has no train split")
    if not held:
        held = train[-settings.eval_sequences :]  # no held-out split: score on the last train sequences (said in the manifest)
    init = list(settings.init_layers) or list(range(settings.layers))
    vocab = draft_vocabulary(train, settings.draft_vocab) if settings.draft_vocab else None
    covered = None if vocab is None else _coverage(held, vocab)
    if vocab is not None:
        vocab = vocab.to(target.device)
    target.requires_grad_(False)  # the target is the teacher: no graph is built through it
    head_w = (target.lm_head.weight if vocab is None else target.lm_head.weight[vocab]).detach()  # frozen: the target's rows
    torch.manual_seed(settings.seed)
    draft: Any
    if settings.kind in ("medusa", "hydra"):
        init = []
        draft = init_heads(target, settings.kind, settings.heads, torch.float32)
    else:
        draft = (init_eagle if settings.kind == "eagle" else init_draft)(target, init, torch.float32)
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    dev = target.device
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=dev.type == "cuda")
    half = target.dtype in (torch.bfloat16, torch.float16)

    def autocast() -> Any:
        return torch.autocast(dev.type, dtype=target.dtype, enabled=half)

    step, history, evals = 0, [], []
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    rng = random.Random(settings.seed)
    dhash = data_hash(dmanifest)
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        if state["settings"] != asdict(settings) or state["data"] != dhash:
            raise ValueError(f"{ckpt} was made with other settings or data: give the same, or another --out")
        draft.load_state_dict(state["draft"], strict=False)
        opt.load_state_dict(state["optimizer"])
        step, history, evals = state["step"], state["history"], state["evals"]
        rng.setstate(state["rng"])
    from tqdm import tqdm

    bar = tqdm(total=settings.steps, initial=step, unit="step", disable=not progress, desc="training", dynamic_ncols=True)
    epoch: list[list[int]] = []
    tokens_seen = sum(h.get("tokens", 0) for h in history)
    stopped_early = False
    t_train = time.perf_counter()

    def save_checkpoint() -> None:
        torch.save({"settings": asdict(settings), "data": dhash, "draft": trainable_state(draft), "optimizer": opt.state_dict(),
                    "step": step, "history": history, "evals": evals, "rng": rng.getstate()}, ckpt)

    def run_eval() -> None:
        draft.eval()
        e = {"step": step, **evaluate(target, draft, held, settings, autocast, vocab)}
        draft.train()
        evals.append(e)
        bar.write(f"step {step}: held-out KL {e['kl']:.3f}, agreement {e['agreement']:.3f}, accepted per step {e['accepted_per_step']:.2f}")

    if step == 0:
        run_eval()  # where the initialised draft starts
    while step < settings.steps:
        if settings.time_limit and time.perf_counter() - t_train > settings.time_limit:
            stopped_early = True
            break
        if not epoch:
            epoch = batches(train, settings, rng)
        ids, valid = collate(train, epoch.pop(), settings.max_len, dev)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings, time.perf_counter() - t_train)
        with autocast():
            with torch.no_grad():
                th = hidden_states(target, ids)
            loss = torch.zeros((), device=dev)
            for k, (dh, rows) in enumerate(draft_rows(draft, ids, valid, th, settings.unroll)):
                weight = 0.8**k if hasattr(draft, "heads") else 1.0
                loss = loss + weight * kl_loss(head_logits(th[rows], head_w), head_logits(dh, head_w))
                if hasattr(draft, "fc") and settings.feature_weight:
                    loss = loss + settings.feature_weight * F.smooth_l1_loss(dh.float(), th[rows].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        step += 1
        n = int(valid.sum())
        tokens_seen += n
        history.append({"step": step, "loss": float(loss.detach()), "grad_norm": round(gnorm, 4), "tokens": n})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if step % settings.eval_every == 0 or step == settings.steps:
            run_eval()
        if step % settings.save_every == 0:
            save_checkpoint()
    bar.close()
    if not evals or evals[-1]["step"] != step:
        run_eval()
    save_checkpoint()
    last = evals[-1]
    manifest = {
        "target": target_info(target),
        "init_layers": init,
        "command": command,
        "data": {"folder": data.name, "sha256": dhash, "train_sequences": len(train), "heldout_sequences": len(held),
                 "source": dmanifest.get("source"), "seed": dmanifest.get("settings", {}).get("seed")},
        "settings": asdict(settings),
        "steps": step,
        "stopped_early": stopped_early,
        "tokens_seen": tokens_seen,
        "metrics": {"heldout_agreement": round(last["agreement"], 4), "heldout_accepted_per_step": round(last["accepted_per_step"], 3),
                    "heldout_kl": round(last["kl"], 4), "chain_depth": settings.chain_depth,
                    "heldout_answer_tokens_in_draft_vocab": covered,
                    "final_train_loss": round(sum(h["loss"] for h in history[-50:]) / max(1, len(history[-50:])), 4)},
        "evals": evals,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "dtype": str(target.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "train_seconds": round(time.perf_counter() - t_train, 1),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    save_draft(draft, out, manifest, vocab=vocab)
    (out / "history.json").write_text(json.dumps(history) + "\n")
    plot(history, evals, out / "training.png")
    return manifest
