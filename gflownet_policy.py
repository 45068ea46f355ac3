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
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_models import register_adapters


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
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, h: torch.Tensor, cache=None):
        attn_out, new_cache = self.attn(self.ln_1(h), cache)
        h = h + attn_out
        return h + self.mlp(self.ln_2(h)), new_cache


@dataclass
class PolicyOutputs:
    """Everything the losses need from one teacher-forced pass; columns index prefixes s_0 .. s_L."""

    log_pf_steps: torch.Tensor  # (B, L+1) log-prob of the action taken from s_t (token, or STOP at t == length)
    log_stop: torch.Tensor  # (B, L+1) log P_F(STOP | s_t) for every t, taken or not (modified SubTB)
    log_flows: torch.Tensor  # (B, L+1) learned log F(s_t) (SubTB)

    @property
    def log_pf(self) -> torch.Tensor:
        return self.log_pf_steps.sum(dim=1)


class AutoregressivePolicy(nn.Module):
    """Sampling and teacher forcing shared by every policy. Actions are the vocabulary's tokens, then STOP
    (index vocab_size). Subclasses provide `_forward(input_ids, start_pos, cache) -> (action_logits (B, T, V+1),
    hidden (B, T, H), cache)`, `start_id` (the input id that precedes x) and `flow_head` (hidden -> log F)."""

    config: PolicyConfig
    start_id: int

    def _init_action_space(self, config: PolicyConfig) -> None:
        config.validate()
        self.config = config
        self.stop_id = config.vocab_size
        # Tokens the policy may never emit (e.g. the prior's special tokens): a fixed -inf mask, not learned.
        banned = torch.zeros(config.vocab_size + 1, dtype=torch.bool)
        for token_id in config.banned_token_ids:
            if 0 <= token_id < config.vocab_size:
                banned[token_id] = True
        self.register_buffer("banned", banned, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.banned.device

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

    def _action_logits(self, logits: torch.Tensor, hidden: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Final action logits from `_forward`'s, at prefix lengths `steps` (a policy with a separate stop
        decision overrides this). Sampling and teacher forcing both go through it, so P_F stays exact."""
        return logits

    def masked_log_probs(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.masked_fill(mask, float("-inf")), dim=-1)

    def _inputs(self, tokens: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """[start, context..., x...] and the index of the first action's logits."""
        batch = tokens.shape[0]
        start = torch.full((batch, 1), self.start_id, dtype=torch.long, device=tokens.device)
        parts = [start] + ([context.expand(batch, -1)] if context is not None else []) + [tokens]
        return torch.cat(parts, dim=1), 0 if context is None else context.shape[1]

    def evaluate(
        self, tokens: torch.Tensor, lengths: torch.Tensor, context: torch.Tensor | None = None
    ) -> PolicyOutputs:
        """One teacher-forced pass under the current (untempered) parameters, with gradients."""
        batch, width = tokens.shape
        max_len = self.config.max_len
        if width < max_len:
            tokens = F.pad(tokens, (0, max_len - width))
        tokens = tokens[:, :max_len]
        input_ids, offset = self._inputs(tokens, context)
        logits, hidden, _ = self._forward(input_ids, 0, None)
        logits, hidden = logits[:, offset:], hidden[:, offset:]  # (B, max_len + 1, .) from s_0 on
        steps = torch.arange(max_len + 1, device=tokens.device)
        logits = self._action_logits(logits, hidden, steps)
        mask = torch.stack([self._action_mask(int(t), batch) for t in steps], dim=1)
        log_probs = self.masked_log_probs(logits, mask)
        actions = torch.cat([tokens, torch.zeros(batch, 1, dtype=torch.long, device=tokens.device)], dim=1)
        actions = torch.where(steps.unsqueeze(0) == lengths.unsqueeze(1), self.stop_id, actions)
        taken = log_probs.gather(2, actions.unsqueeze(2)).squeeze(2)
        in_trajectory = steps.unsqueeze(0) <= lengths.unsqueeze(1)
        return PolicyOutputs(
            log_pf_steps=torch.where(in_trajectory, taken, torch.zeros_like(taken)),
            log_stop=log_probs[..., self.stop_id],
            log_flows=self.flow_head(hidden.float()).squeeze(-1),
        )

    def log_pf_per_step(
        self, tokens: torch.Tensor, lengths: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, max_len + 1) log-probabilities of each action taken; zeros past the stop action.
        Column t is the action taken from the prefix of length t (a token, or STOP when t == length)."""
        return self.evaluate(tokens, lengths, context).log_pf_steps

    def log_pf(self, tokens: torch.Tensor, lengths: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced sum of log P_F over each trajectory, including the stop action. (B,) with gradients."""
        return self.log_pf_per_step(tokens, lengths, context).sum(dim=1)

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        temperature: float = 1.0,
        epsilon: float = 0.0,
        generator: torch.Generator | None = None,
        context: torch.Tensor | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample trajectories with a KV cache from the exploration policy
        (logits / temperature, mixed with epsilon-uniform over allowed actions). `prefix` = (tokens (B, >= k),
        keep (B,)): row i's first keep[i] tokens are forced and only the rest is sampled (local search's
        re-completion); forced steps add nothing to the returned log-probability.

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
        next_input, _ = self._inputs(tokens[:, :0], context)
        cache, position = None, 0
        for t in range(max_len + 1):
            logits, hidden, cache = self._forward(next_input, position, cache)
            position += next_input.shape[1]
            mask = self._action_mask(t, batch_size)
            step_logits = self._action_logits(logits[:, -1], hidden[:, -1], torch.tensor(t, device=device))
            probs = self.masked_log_probs(step_logits / temperature, mask).exp()
            if epsilon > 0:
                allowed = (~mask).float()
                probs = (1 - epsilon) * probs + epsilon * allowed / allowed.sum(dim=1, keepdim=True)
            action = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            step_log_prob = probs.gather(1, action.unsqueeze(1)).squeeze(1).log()
            if prefix is not None and t < prefix[0].shape[1]:
                forced = t < prefix[1]
                action = torch.where(forced, prefix[0][:, t], action)
                step_log_prob = torch.where(forced, torch.zeros_like(step_log_prob), step_log_prob)
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

    def set_training_dropout(self, active: bool) -> None:
        """Dropout on for the loss's forward pass only; sampling always runs without it."""
        self.train(active)

    def trainable_state(self) -> dict:
        """What a checkpoint must hold to restore this policy (on top of its config)."""
        return self.state_dict()

    def load_trainable_state(self, state: dict) -> None:
        self.load_state_dict(state)


class TransformerPolicy(AutoregressivePolicy):
    """Pre-LayerNorm GPT-style policy trained from scratch. Input vocabulary: tokens, then BOS."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self._init_action_space(config)
        self.start_id = config.vocab_size  # input-side BOS; shares its index with STOP but lives in another table
        self.tok_emb = nn.Embedding(config.vocab_size + 1, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len + 1, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size + 1)
        self.flow_head = nn.Linear(config.d_model, 1)  # log F(s) for SubTB; unused (and untrained) by TB
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

    def _forward(self, input_ids: torch.Tensor, start_pos: int = 0, caches=None):
        positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=input_ids.device)
        h = self.tok_emb(input_ids) + self.pos_emb(positions)
        new_caches = []
        for i, block in enumerate(self.blocks):
            h, cache = block(h, None if caches is None else caches[i])
            new_caches.append(cache)
        h = self.ln_f(h)
        return self.head(h).float(), h, new_caches

    def _logits(self, input_ids: torch.Tensor, start_pos: int = 0, caches=None):
        logits, _, caches = self._forward(input_ids, start_pos, caches)
        return logits, caches


def uniform_length_stop_logits(min_len: int, max_len: int) -> torch.Tensor:
    """(max_len + 1,) stop logits s_t that make the length of x uniform on [min_len, max_len] when
    P(stop | t) = sigmoid(s_t): the hazard of a uniform length is 1 / (max_len - t + 1), whose logit is
    -log(max_len - t). Entries below min_len are masked anyway; at max_len the stop is forced."""
    steps = torch.arange(max_len + 1, dtype=torch.float64)
    return -torch.log((max_len - steps).clamp(min=1)).float()


LORA_STOP_MODES = ("head", "eos")


class LoRAPolicy(AutoregressivePolicy):
    """A pretrained causal LM with LoRA adapters as the policy (Hu et al., 2024). x starts from the LM's
    document-start token and tokens follow the LM's own next-token distribution (at initialisation, LoRA's B
    matrices being zero). The LM's end-of-text token is never a token action. STOP is decided by `stop_mode`:

    - "head" (default): a separate, learned stop decision, P(STOP | s_t) = sigmoid(b_t + w . h_t), with the
      token actions taking the rest of the mass in the LM's proportions. b starts at the logits of a uniform
      length on [min_len, max_len] and w at zero, so the untrained policy is the LM with uniformly distributed
      lengths. (A real LM almost never predicts end-of-text after a short snippet: with "eos", every x on
      SmolLM2 had exactly --max-len tokens.)
    - "eos": STOP is the LM's end-of-text logit, so the untrained policy is exactly the LM's p(x) p(EOS | x).

    The same weights serve the prior with the adapters switched off (`hf_models.without_adapters`), so one copy is
    loaded. Sampling uses the model's own KV cache."""

    def __init__(
        self, peft_model, config: PolicyConfig, start_id: int, stop_token_id: int, lora_settings: dict
    ) -> None:
        super().__init__()
        self._init_action_space(config)
        self.model = peft_model
        self.start_id = start_id
        self.stop_token_id = stop_token_id
        self.lora_settings = lora_settings
        self.stop_mode = lora_settings.get("stop", "eos")  # checkpoints from before the stop head: "eos"
        if self.stop_mode not in LORA_STOP_MODES:
            raise ValueError(f"unknown LoRA stop mode {self.stop_mode!r}; choose from {LORA_STOP_MODES}")
        hidden = peft_model.get_base_model().config.get_text_config().hidden_size
        device = next(peft_model.parameters()).device
        self.flow_head = nn.Linear(hidden, 1)  # log F(s) for SubTB, on the LM's last hidden state
        nn.init.zeros_(self.flow_head.weight)
        nn.init.zeros_(self.flow_head.bias)
        self.flow_head.to(device)
        if self.stop_mode == "head":
            self.stop_bias = nn.Parameter(uniform_length_stop_logits(config.min_len, config.max_len).to(device))
            self.stop_head = nn.Linear(hidden, 1, bias=False).to(device)
            nn.init.zeros_(self.stop_head.weight)

    @property
    def device(self) -> torch.device:
        return self.flow_head.weight.device

    def _forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache=None):
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
        logits = out.logits.float()
        vocab = self.config.vocab_size
        action_logits = torch.cat(
            [logits[..., :vocab], logits[..., self.stop_token_id : self.stop_token_id + 1]], dim=-1
        )
        return action_logits, out.hidden_states[-1], out.past_key_values

    def _action_logits(self, logits: torch.Tensor, hidden: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if self.stop_mode == "eos":
            return logits
        # Token log-probs normalised over the allowed tokens (sum of exp = 1), beside the stop logit: the
        # softmax then gives P(STOP) = sigmoid(stop logit) exactly, and tokens the LM's relative probabilities.
        token_log_probs = torch.log_softmax(logits[..., :-1].masked_fill(self.banned[:-1], float("-inf")), dim=-1)
        stop = self.stop_bias[steps] + self.stop_head(hidden.to(self.stop_head.weight.dtype)).squeeze(-1).float()
        return torch.cat([token_log_probs, stop.unsqueeze(-1)], dim=-1)

    def set_training_dropout(self, active: bool) -> None:
        # Only LoRA's own dropout follows the training step; the base model stays in eval mode so that
        # teacher-forced log P_F is exactly the distribution the sampler used.
        for name, module in self.model.named_modules():
            if name.endswith("lora_dropout"):
                module.train(active)

    def trainable_state(self) -> dict:
        from peft import get_peft_model_state_dict

        state = {
            "lora": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.model).items()},
            "flow_head": self.flow_head.state_dict(),
        }
        if self.stop_mode == "head":
            state["stop"] = {"bias": self.stop_bias.detach().cpu(), "head": self.stop_head.state_dict()}
        return state

    def load_trainable_state(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state["lora"])
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"LoRA weights do not fit this model: unexpected {unexpected[:3]}")
        self.flow_head.load_state_dict(state["flow_head"])
        if self.stop_mode == "head":
            with torch.no_grad():
                self.stop_bias.copy_(state["stop"]["bias"])
            self.stop_head.load_state_dict(state["stop"]["head"])


def default_lora_targets(model) -> list[str]:
    """peft's per-architecture defaults (e.g. c_attn for GPT-2, q_proj/v_proj for Llama-style models)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = model.config.model_type
    if model_type not in DEFAULTS:
        raise ValueError(f"no default LoRA target modules for model type {model_type!r}; pass --lora-target-modules")
    return list(DEFAULTS[model_type])


def make_lora_policy(
    base_model,
    config: PolicyConfig,
    start_id: int,
    stop_token_id: int,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    stop_mode: str = "head",
) -> LoRAPolicy:
    """Wrap base_model (in place: LoRA layers are injected into it) and return the policy."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules else default_lora_targets(base_model)
    lora_config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(base_model, lora_config)
    peft_model.eval()
    register_adapters(base_model, peft_model)
    settings = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets, "stop": stop_mode}
    return LoRAPolicy(peft_model, config, start_id, stop_token_id, settings)


class LogZ(nn.Module):
    """The learned log partition function, one per condition (a conditional log Z for conditioned tasks such
    as one per subject; unconditional tasks have the single condition ""). `initialized` is saved with
    checkpoints so that a resumed run does not re-initialise it from its first batch."""

    def __init__(self, conditions: list[str] | tuple[str, ...] = ("",)) -> None:
        super().__init__()
        self.conditions = list(conditions)
        self.index = {condition: i for i, condition in enumerate(self.conditions)}
        self.values = nn.Parameter(torch.zeros(len(self.conditions)))
        self.register_buffer("initialized", torch.zeros(len(self.conditions), dtype=torch.bool))

    def is_initialized(self, condition: str = "") -> bool:
        return bool(self.initialized[self.index[condition]])

    @torch.no_grad()
    def initialize_from(self, log_reward: torch.Tensor, log_pf: torch.Tensor, condition: str = "") -> None:
        """Set log Z to mean(log R - log P_F): the least-squares optimum of TB for a fixed policy."""
        i = self.index[condition]
        self.values[i] = (log_reward - log_pf).float().mean().item()
        self.initialized[i] = True

    def forward(self, condition: str = "") -> torch.Tensor:
        return self.values[self.index[condition]]


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
