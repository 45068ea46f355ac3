"""The GFlowNet forward policy P_F: a small causal transformer over the prior's vocabulary plus a stop action.

A state is a prefix of token ids; an action appends a token or stops. Every x has exactly one trajectory,
so log P_F(trajectory) = log pi(x), which is what makes the exact-target tests possible.

Conventions used everywhere in the project:
  tokens  LongTensor (B, max_len), padded with 0 after each sequence's end,
  lengths LongTensor (B,), number of real tokens in each x, min_len <= length <= max_len.
A sequence of length max_len terminates by force (probability 1); shorter ones pay log p(stop).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PolicyConfig:
    vocab_size: int  # number of token actions (the prior tokenizer's vocabulary); the stop action is vocab_size
    max_len: int = 32
    min_len: int = 1
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    dropout: float = 0.0  # off by default: dropout would make teacher-forced log P_F differ from the sampler's
    banned_token_ids: tuple[int, ...] = ()  # tokens the policy may never emit (e.g. the prior's special tokens)

    def validate(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={self.min_len} max_len={self.max_len}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")


class SelfAttention(nn.Module):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, h: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        batch, steps, width = h.shape
        q, k, v = self.qkv(h).split(width, dim=2)
        q, k, v = (t.view(batch, steps, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # incremental decoding: attend to everything cached plus the new positions
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        # With a cache the new queries sit at the end, so causal masking is only needed when steps > 1.
        causal = steps > 1
        if causal and cache is not None and cache[0].shape[2] > 0:
            raise ValueError("multi-token steps on top of a non-empty cache are not supported")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(batch, steps, width)
        return self.proj(y), (k, v)


class Block(nn.Module):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model), nn.GELU(), nn.Linear(4 * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, h: torch.Tensor, cache=None):
        attn_out, new_cache = self.attn(self.ln_1(h), cache)
        h = h + attn_out
        return h + self.mlp(self.ln_2(h)), new_cache


class TransformerPolicy(nn.Module):
    """Pre-LayerNorm GPT-style policy. Input vocabulary: tokens, then BOS; output: tokens, then STOP."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.stop_id = config.vocab_size
        self.bos_id = config.vocab_size  # input-side id; shares its index with STOP but lives in a different table
        self.tok_emb = nn.Embedding(config.vocab_size + 1, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len + 1, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size + 1)
        # Tokens the policy may never emit (e.g. the prior's special tokens): a fixed -inf mask, not learned.
        banned = torch.zeros(config.vocab_size + 1, dtype=torch.bool)
        for token_id in config.banned_token_ids:
            if 0 <= token_id < config.vocab_size:
                banned[token_id] = True
        self.register_buffer("banned", banned, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _logits(self, input_ids: torch.Tensor, start_pos: int = 0, caches=None):
        positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=input_ids.device)
        h = self.tok_emb(input_ids) + self.pos_emb(positions)
        new_caches = []
        for i, block in enumerate(self.blocks):
            h, cache = block(h, None if caches is None else caches[i])
            new_caches.append(cache)
        return self.head(self.ln_f(h)).float(), new_caches

    def _action_mask(self, position: torch.Tensor | int, num_rows: int) -> torch.Tensor:
        """Boolean (rows, V+1) mask of forbidden actions after `position` tokens have been generated."""
        mask = self.banned.unsqueeze(0).expand(num_rows, -1).clone()
        position = torch.as_tensor(position, device=mask.device).expand(num_rows)
        mask[:, self.stop_id] |= position < self.config.min_len
        # At max_len the only action left is STOP.
        full = position >= self.config.max_len
        mask[full, : self.stop_id] = True
        mask[full, self.stop_id] = False
        return mask

    def masked_log_probs(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.masked_fill(mask, float("-inf")), dim=-1)

    def log_pf(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher-forced sum of log P_F over each trajectory, including the stop action, under the
        current (untempered) parameters. Returns (B,) float32 with gradients."""
        return self.log_pf_per_step(tokens, lengths).sum(dim=1)

    def log_pf_per_step(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, max_len + 1) log-probabilities of each action taken; zeros past the stop action.
        Column t is the action taken from the prefix of length t (a token, or STOP when t == length)."""
        batch, width = tokens.shape
        max_len = self.config.max_len
        if width < max_len:
            tokens = F.pad(tokens, (0, max_len - width))
        tokens = tokens[:, :max_len]
        bos = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=tokens.device)
        logits, _ = self._logits(torch.cat([bos, tokens], dim=1))  # (B, max_len + 1, V + 1)
        steps = torch.arange(max_len + 1, device=tokens.device)
        mask = torch.stack([self._action_mask(int(t), batch) for t in steps], dim=1)
        log_probs = self.masked_log_probs(logits, mask)
        actions = torch.cat([tokens, torch.zeros(batch, 1, dtype=torch.long, device=tokens.device)], dim=1)
        actions = torch.where(steps.unsqueeze(0) == lengths.unsqueeze(1), self.stop_id, actions)
        taken = log_probs.gather(2, actions.unsqueeze(2)).squeeze(2)
        return torch.where(steps.unsqueeze(0) <= lengths.unsqueeze(1), taken, torch.zeros_like(taken))

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        temperature: float = 1.0,
        epsilon: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample trajectories with a KV cache from the exploration policy
        (logits / temperature, mixed with epsilon-uniform over allowed actions).

        Returns tokens (B, max_len), lengths (B,), and the sampler's own log-probability of each trajectory
        (B,), which equals log_pf only when temperature == 1 and epsilon == 0. Training never uses it;
        it recomputes log_pf under the current parameters."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        device, max_len = self.device, self.config.max_len
        tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        lengths = torch.full((batch_size,), max_len, dtype=torch.long, device=device)
        sampler_log_prob = torch.zeros(batch_size, device=device)
        done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        next_input = torch.full((batch_size, 1), self.bos_id, dtype=torch.long, device=device)
        caches = None
        for t in range(max_len + 1):
            logits, caches = self._logits(next_input, start_pos=t, caches=caches)
            mask = self._action_mask(t, batch_size)
            probs = self.masked_log_probs(logits[:, -1] / temperature, mask).exp()
            if epsilon > 0:
                allowed = (~mask).float()
                probs = (1 - epsilon) * probs + epsilon * allowed / allowed.sum(dim=1, keepdim=True)
            action = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            step_log_prob = probs.gather(1, action.unsqueeze(1)).squeeze(1).log()
            sampler_log_prob += torch.where(done, torch.zeros_like(step_log_prob), step_log_prob)
            stopping = (action == self.stop_id) & ~done
            lengths[stopping] = t
            if t < max_len:
                tokens[:, t] = torch.where(done | stopping, torch.zeros_like(action), action)
            done |= stopping
            if bool(done.all()):
                break
            next_input = torch.where(done, torch.zeros_like(action), action).unsqueeze(1)
        return tokens, lengths, sampler_log_prob

    def checkpoint_config(self) -> dict:
        return asdict(self.config)


class LogZ(nn.Module):
    """The learned log partition function. `initialized` is saved with checkpoints so that a resumed run
    does not re-initialise it from its first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize_from(self, log_reward: torch.Tensor, log_pf: torch.Tensor) -> None:
        """Set log Z to mean(log R - log P_F): the least-squares optimum of TB for a fixed policy."""
        self.value.fill_((log_reward - log_pf).float().mean().item())
        self.initialized.fill_(True)

    def forward(self) -> torch.Tensor:
        return self.value


def enumerate_sequences(vocab_size: int, min_len: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every x with min_len <= len(x) <= max_len, as (tokens, lengths). Only for tiny vocabularies:
    used by the exact-target tests and benchmarks."""
    import itertools

    rows, lengths = [], []
    for length in range(min_len, max_len + 1):
        for seq in itertools.product(range(vocab_size), repeat=length):
            rows.append(list(seq) + [0] * (max_len - length))
            lengths.append(length)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
