"""Neural networks shared by the scripts: feature encoders, per-symbol actor-critic heads, the master network,
the supervised signal classifiers, checkpoint helpers and the run plumbing both training scripts share (GAE, the
gradient all-reduce, logging, run summaries, the SIGINT stop flag)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

# ---------------------------------------------------------------------------------------------------------------
# Supervised signal classifiers (fitted by market_data.py on the train split; their probabilities become sl_probs).
# Input x: (N, L, F) float32 window of technical features; output: logits (N,) for "the forward return over the
# label horizon beats the threshold".
# ---------------------------------------------------------------------------------------------------------------


class SignalMLP(nn.Module):
    """Two-layer MLP on the flattened window."""

    def __init__(self, seq_len: int, num_features: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(seq_len * num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (N,)


class _SignalRNN(nn.Module):
    """One recurrent layer over the window; the last hidden state feeds a linear logit."""

    cell: type[nn.Module] = nn.LSTM

    def __init__(self, seq_len: int, num_features: int, hidden: int = 32):
        super().__init__()
        self.rnn = self.cell(num_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (N, L, H)
        return self.head(out[:, -1]).squeeze(-1)  # (N,)


class SignalLSTM(_SignalRNN):
    cell = nn.LSTM


class SignalGRU(_SignalRNN):
    cell = nn.GRU


# ---------------------------------------------------------------------------------------------------------------
# Feature encoders. Every kind maps an observation dict with leading dims (*lead) to an embedding (*lead, output_dim):
#   technical (*lead, 24, 23), sl_probs (*lead, 3), position (*lead, 5), portfolio (*lead, 8), regime (*lead, 10).
# `action_mask` is not a feature (the heads apply it to the logits) and `directives` enter the heads, not the encoder,
# so one encoder serves both the independent and the portfolio mode. Leading dims are flattened, so (B, S, ...)
# batches of envs x symbols go through the shared encoder in one call.
# ---------------------------------------------------------------------------------------------------------------

STATE_KEYS = ("sl_probs", "position", "portfolio", "regime")  # one token each in the transformer, in this order


@dataclass
class EncoderConfig:
    """Architecture of the shared feature encoder (nested into the scripts' tyro Args as `encoder`)."""

    kind: Literal["transformer", "lstm", "cnn", "mlp"] = "transformer"
    """encoder family: the seed's transformer, or an lstm / cnn (1-D convolutions) / mlp alternative"""
    d_model: int = 256
    """width of the tokens (transformer) or of the hidden layers and channels (lstm, cnn, mlp)"""
    nhead: int = 8
    """attention heads per transformer layer"""
    num_layers: int = 4
    """transformer layers"""
    dim_feedforward: int = 1024
    """width of the transformer's feed-forward block"""
    dropout: float = 0.1
    """dropout inside the encoder (the seed's 0.1; PPO scripts pass 0.0 so the importance ratio stays exact)"""
    output_dim: int = 256
    """size of the embedding handed to the heads"""
    alt_layers: int = 2
    """recurrent layers (lstm) or convolution layers (cnn) of the alternatives"""
    seq_len: int = 24
    """bars in the technical window"""
    technical_dim: int = 23
    """technical features per bar"""
    sl_dim: int = 3
    """supervised signal probabilities (MLP, LSTM, GRU)"""
    position_dim: int = 5
    """position state features"""
    portfolio_dim: int = 8
    """portfolio state features"""
    regime_dim: int = 10
    """market regime features"""

    @property
    def state_dims(self) -> dict[str, int]:
        return {
            "sl_probs": self.sl_dim,
            "position": self.position_dim,
            "portfolio": self.portfolio_dim,
            "regime": self.regime_dim,
        }


def _flatten_obs(obs: dict[str, torch.Tensor], cfg: EncoderConfig, dtype: torch.dtype):
    """Check the encoded keys and flatten their leading dims: returns technical (N, L, F), a dict of state vectors
    (N, k) and the leading shape to restore."""
    if "technical" not in obs:
        raise KeyError(f"The observation has no 'technical' key (keys: {sorted(obs)}); pass the env's obs dict.")
    tech = obs["technical"]
    want = (cfg.seq_len, cfg.technical_dim)
    if tech.dim() < 2 or tuple(tech.shape[-2:]) != want:
        raise ValueError(
            f"obs['technical'] has shape {tuple(tech.shape)}, expected (..., {want[0]}, {want[1]}); "
            "set EncoderConfig.seq_len / technical_dim to match the data."
        )
    lead = tech.shape[:-2]
    states = {}
    for key, dim in cfg.state_dims.items():
        if key not in obs:
            raise KeyError(f"The observation has no {key!r} key (keys: {sorted(obs)}); pass the env's obs dict.")
        x = obs[key]
        if tuple(x.shape) != (*lead, dim):
            raise ValueError(
                f"obs[{key!r}] has shape {tuple(x.shape)}, expected {(*lead, dim)} (leading dims of 'technical' "
                f"plus {key}_dim={dim}); fix the observation or the EncoderConfig."
            )
        states[key] = x.reshape(-1, dim).to(dtype)
    return tech.reshape(-1, *want).to(dtype), states, lead


def _xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every linear and convolution layer (the seed's encoder init).
    Attention in-projections are Xavier by PyTorch's default; recurrent weights keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv1d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def sinusoidal_positions(num_positions: int, d_model: int) -> torch.Tensor:
    """Fixed sine/cosine position codes (Vaswani et al. 2017, section 3.5): (num_positions, d_model)."""
    pos = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(num_positions, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return pe


class FeatureEncoder(nn.Module):
    """The seed's transformer: 24 technical tokens + 4 state tokens (sl_probs, position, portfolio, regime) = 28
    tokens of d_model, each key with its own linear projection; sinusoidal positions over the 28 tokens; pre-LN
    encoder layers; a final LayerNorm; mean pool over tokens; linear projection to output_dim."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.d_model % cfg.nhead != 0:
            raise ValueError(f"EncoderConfig.d_model={cfg.d_model} must be divisible by nhead={cfg.nhead}.")
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        self.num_tokens = cfg.seq_len + len(STATE_KEYS)
        self.technical_proj = nn.Linear(cfg.technical_dim, cfg.d_model)
        self.state_proj = nn.ModuleDict({k: nn.Linear(d, cfg.d_model) for k, d in cfg.state_dims.items()})
        self.register_buffer("pe", sinusoidal_positions(self.num_tokens, cfg.d_model), persistent=False)
        # A plain list of layers rather than nn.TransformerEncoder: the same maths, and get_attention_weights can
        # walk the layers one by one.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.d_model, cfg.nhead, cfg.dim_feedforward, cfg.dropout, batch_first=True, norm_first=True
            )
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.output_proj = nn.Linear(cfg.d_model, cfg.output_dim)
        _xavier_init(self)

    def tokens(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Size]:
        """Input tokens with positions added: (N, 28, d_model), and the leading shape."""
        tech, states, lead = _flatten_obs(obs, self.cfg, self.technical_proj.weight.dtype)
        parts = [self.technical_proj(tech)]  # (N, 24, d)
        parts += [self.state_proj[k](states[k]).unsqueeze(1) for k in STATE_KEYS]  # 4 x (N, 1, d)
        return torch.cat(parts, dim=1) + self.pe, lead  # (N, 28, d)

    def forward(self, obs: dict[str, torch.Tensor], return_sequence: bool = False) -> torch.Tensor:
        """Embedding (*lead, output_dim), or the normalised token sequence (*lead, 28, d_model)."""
        x, lead = self.tokens(obs)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)  # (N, 28, d)
        if return_sequence:
            return x.reshape(*lead, self.num_tokens, -1)
        return self.output_proj(x.mean(dim=1)).reshape(*lead, self.output_dim)

    @torch.no_grad()
    def get_attention_weights(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Self-attention probabilities of every layer and head: (*lead, num_layers, nhead, 28, 28); row i is
        where token i looks (tokens 0-23 are the bars, oldest first, then sl_probs, position, portfolio, regime).
        Call in eval mode: in train mode PyTorch returns the weights after attention dropout."""
        x, lead = self.tokens(obs)
        weights = []
        for layer in self.layers:
            h = layer.norm1(x)  # pre-LN: attention sees the normalised stream
            _, w = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)  # (N, heads, 28, 28)
            weights.append(w)
            x = layer(x)
        return torch.stack(weights, dim=1).reshape(*lead, len(self.layers), self.cfg.nhead, *weights[0].shape[-2:])


class _StateProjection(nn.Module):
    """Concatenated state vectors (sl_probs, position, portfolio, regime) -> (N, d_model), for the alternatives."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(sum(cfg.state_dims.values()), cfg.d_model), nn.GELU())

    def forward(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat([states[k] for k in STATE_KEYS], dim=-1))


def _fuse_head(cfg: EncoderConfig) -> nn.Sequential:
    """[sequence summary, state] (N, 2 d_model) -> embedding (N, output_dim)."""
    return nn.Sequential(
        nn.Linear(2 * cfg.d_model, cfg.d_model),
        nn.GELU(),
        nn.Dropout(cfg.dropout),
        nn.LayerNorm(cfg.d_model),
        nn.Linear(cfg.d_model, cfg.output_dim),
    )


class LSTMEncoder(nn.Module):
    """LSTM over the 24 bars; its last hidden state is fused with the projected state vector."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        self.rnn = nn.LSTM(
            cfg.technical_dim,
            cfg.d_model,
            num_layers=cfg.alt_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.alt_layers > 1 else 0.0,
        )
        self.state = _StateProjection(cfg)
        self.fuse = _fuse_head(cfg)
        _xavier_init(self)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        tech, states, lead = _flatten_obs(obs, self.cfg, self.fuse[0].weight.dtype)
        out, _ = self.rnn(tech)  # (N, 24, d)
        z = torch.cat([out[:, -1], self.state(states)], dim=-1)  # (N, 2d)
        return self.fuse(z).reshape(*lead, self.output_dim)


class CNNEncoder(nn.Module):
    """1-D convolutions over the 24 bars (kernel 3, dilations 1, 2, 4, ...; the window is already causal, so the
    padding may look both ways), mean-pooled over time and fused with the projected state vector."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        layers: list[nn.Module] = []
        channels = cfg.technical_dim
        for i in range(cfg.alt_layers):
            dilation = 2**i
            layers += [nn.Conv1d(channels, cfg.d_model, 3, padding=dilation, dilation=dilation), nn.GELU()]
            channels = cfg.d_model
        self.conv = nn.Sequential(*layers)
        self.state = _StateProjection(cfg)
        self.fuse = _fuse_head(cfg)
        _xavier_init(self)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        tech, states, lead = _flatten_obs(obs, self.cfg, self.fuse[0].weight.dtype)
        h = self.conv(tech.transpose(1, 2))  # (N, d, 24): channels first for Conv1d
        z = torch.cat([h.mean(dim=-1), self.state(states)], dim=-1)  # (N, 2d)
        return self.fuse(z).reshape(*lead, self.output_dim)


class MLPEncoder(nn.Module):
    """Fast baseline: the flattened window and the state vectors through a two-hidden-layer MLP."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        in_dim = cfg.seq_len * cfg.technical_dim + sum(cfg.state_dims.values())
        self.net = nn.Sequential(
            nn.Linear(in_dim, cfg.d_model),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_model, cfg.d_model),
            nn.GELU(),
            nn.LayerNorm(cfg.d_model),
            nn.Linear(cfg.d_model, cfg.output_dim),
        )
        _xavier_init(self)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        tech, states, lead = _flatten_obs(obs, self.cfg, self.net[0].weight.dtype)
        z = torch.cat([tech.flatten(1)] + [states[k] for k in STATE_KEYS], dim=-1)  # (N, 24*23 + 26)
        return self.net(z).reshape(*lead, self.output_dim)


ENCODERS = {"transformer": FeatureEncoder, "lstm": LSTMEncoder, "cnn": CNNEncoder, "mlp": MLPEncoder}


def make_encoder(cfg: EncoderConfig) -> nn.Module:
    """The encoder named by cfg.kind; every kind maps an obs dict (*lead, ...) to (*lead, cfg.output_dim)."""
    if cfg.kind not in ENCODERS:
        raise ValueError(f"EncoderConfig.kind={cfg.kind!r} is unknown; choose one of {sorted(ENCODERS)}.")
    return ENCODERS[cfg.kind](cfg)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in module (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------------
# Actor-critic heads batched over symbols and the masked categorical policy.
# ---------------------------------------------------------------------------------------------------------------

NUM_ACTIONS = 7
MASKED_LOGIT = -1e8  # finite: softmax gives exactly 0 for it in float32, and no inf - inf can make a NaN


class BatchedMLP(nn.Module):
    """num_heads independent MLPs with weights (H, in, out), applied to x (..., S, in) with one einsum (H == S), or
    one MLP applied to every symbol (H == 1). ReLU between layers; orthogonal init with gain sqrt(2) for hidden
    layers and `out_gain` for the last one (CleanRL's layer_init, per head)."""

    def __init__(self, num_heads: int, sizes: list[int], out_gain: float):
        super().__init__()
        self.num_heads = num_heads
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            w = torch.empty(num_heads, n_in, n_out)
            gain = out_gain if i == len(sizes) - 2 else math.sqrt(2)
            for h in range(num_heads):
                # Orthogonal in nn.Linear's (out, in) layout, stored transposed as (in, out) for the einsum.
                w[h] = nn.init.orthogonal_(torch.empty(n_out, n_in), gain=gain).T
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_heads, n_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., S, in) -> (..., S, out)."""
        if self.num_heads > 1 and x.shape[-2] != self.num_heads:
            raise ValueError(
                f"The input has {x.shape[-2]} symbols but the per-symbol heads were built for {self.num_heads}; "
                "build SymbolPolicy with num_symbols matching the env, or use shared_heads=True."
            )
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if self.num_heads == 1:
                x = x @ w[0] + b[0]
            else:
                x = torch.einsum("...si,sio->...so", x, w) + b  # (..., S, out)
            if i < n - 1:
                x = torch.relu(x)
        return x


def mask_logits(logits: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Replace the logits of disallowed actions (mask == 0, any int or bool dtype) with MASKED_LOGIT."""
    return torch.where(action_mask.to(logits.device) != 0, logits, torch.full_like(logits, MASKED_LOGIT))


def masked_policy(
    logits: torch.Tensor, action: torch.Tensor | None = None, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From masked logits (..., A): action (...) long (sampled, argmax if deterministic, or the given one), its
    log-probability, and the entropy over the allowed actions. Masked actions have probability exactly 0, so they
    contribute 0 to the entropy and are never sampled; a given masked action gets a log-probability near -1e8."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., A)
    p = logp.exp()
    if action is None:
        if deterministic:
            action = logits.argmax(dim=-1)
        else:
            action = torch.multinomial(p.reshape(-1, p.shape[-1]), 1).reshape(p.shape[:-1])
    action = action.long()
    # where() rather than p * logp: 0 * (-1e8) is 0 anyway, but this keeps the gradient of masked entries at 0.
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)
    return action, logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), entropy


class SymbolPolicy(nn.Module):
    """Actor-critic for S symbol agents: one shared encoder, per-symbol actor (emb -> 256 -> 128 -> 7) and critic
    (emb -> 256 -> 128 -> 1) heads batched as (S, in, out) weights, or one pair of heads for all symbols
    (shared_heads=True, which also accepts any number of symbols).

    Directives: with directive_dim > 0, obs["directives"] (B, S, directive_dim) is concatenated to the embedding
    before the heads (the master's orders change the decision, not the market view); with directive_dim == 0 the key
    is ignored. The action mask obs["action_mask"] (B, S, 7) is applied to the logits (masked = -1e8).
    """

    def __init__(
        self,
        num_symbols: int,
        encoder: EncoderConfig,
        shared_heads: bool = False,
        directive_dim: int = 0,
        actor_gain: float = 0.1,
        hidden: tuple[int, ...] = (256, 128),
        num_actions: int = NUM_ACTIONS,
    ):
        super().__init__()
        self.num_symbols = num_symbols
        self.directive_dim = directive_dim
        self.num_actions = num_actions
        self.encoder = make_encoder(encoder)
        num_heads = 1 if shared_heads else num_symbols
        in_dim = encoder.output_dim + directive_dim
        self.actor = BatchedMLP(num_heads, [in_dim, *hidden, num_actions], out_gain=actor_gain)
        self.critic = BatchedMLP(num_heads, [in_dim, *hidden, 1], out_gain=1.0)

    def embed(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Shared-encoder embedding (B, S, output_dim), e.g. for the master network's pooling."""
        return self.encoder(obs)

    def _head_input(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        z = self.encoder(obs)  # (B, S, D)
        if self.directive_dim > 0:
            if "directives" not in obs:
                raise KeyError(
                    f"SymbolPolicy was built with directive_dim={self.directive_dim} but the observation has no "
                    "'directives' key; run the env in portfolio mode or build the policy with directive_dim=0."
                )
            d = obs["directives"]
            if d.shape != (*z.shape[:-1], self.directive_dim):
                raise ValueError(
                    f"obs['directives'] has shape {tuple(d.shape)}, expected {(*z.shape[:-1], self.directive_dim)}."
                )
            z = torch.cat([z, d.to(z.dtype)], dim=-1)  # (B, S, D + directive_dim)
        return z

    def _masked(self, obs: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        if "action_mask" not in obs:
            raise KeyError("The observation has no 'action_mask' key; the env's mask is required to pick actions.")
        mask = obs["action_mask"]
        if mask.shape != logits.shape:
            raise ValueError(f"obs['action_mask'] has shape {tuple(mask.shape)}, expected {tuple(logits.shape)}.")
        return mask_logits(logits, mask)

    def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked logits (B, S, 7) and value (B, S) from one encoder pass."""
        z = self._head_input(obs)
        return self._masked(obs, self.actor(z)), self.critic(z).squeeze(-1)

    def get_value(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.critic(self._head_input(obs)).squeeze(-1)  # (B, S)

    def get_logits(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._masked(obs, self.actor(self._head_input(obs)))  # (B, S, 7)

    def get_action_and_value(
        self, obs: dict[str, torch.Tensor], action: torch.Tensor | None = None, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """action (B, S) long, logprob (B, S), entropy over allowed actions (B, S), value (B, S)."""
        logits, value = self(obs)
        action, logprob, entropy = masked_policy(logits, action, deterministic)
        return action, logprob, entropy, value


def weight_sharing_report(num_symbols: int, encoder: EncoderConfig, directive_dim: int = 0, **policy_kw) -> dict:
    """Parameter counts for num_symbols agents: one shared encoder + per-symbol heads (this module's layout), every
    agent with its own encoder and heads (no sharing), and one encoder + one pair of heads (shared_heads=True)."""
    one = SymbolPolicy(1, encoder, directive_dim=directive_dim, **policy_kw)
    enc = count_parameters(one.encoder)
    heads = count_parameters(one.actor) + count_parameters(one.critic)
    shared = enc + num_symbols * heads
    unshared = num_symbols * (enc + heads)
    return {
        "kind": encoder.kind,
        "num_symbols": num_symbols,
        "encoder": enc,
        "heads_per_symbol": heads,
        "one_agent": enc + heads,
        "shared_encoder_total": shared,
        "no_sharing_total": unshared,
        "shared_heads_total": enc + heads,
        "saving_fraction": 1.0 - shared / unshared,
    }


# ---------------------------------------------------------------------------------------------------------------
# Master network (portfolio manager for MAPPO) and the value normaliser of its centralised critic.
# ---------------------------------------------------------------------------------------------------------------

DIRECTIVE_GRID = (4, 4, 3)  # risk multiplier x (position cap, open-position limit) level x regime mode
NUM_DIRECTIVES = math.prod(DIRECTIVE_GRID)  # 48


def unravel_directive(index: torch.Tensor) -> torch.Tensor:
    """Joint directive index (...) -> grid coordinates (..., 3), row-major over DIRECTIVE_GRID."""
    return torch.stack(torch.unravel_index(index.long(), DIRECTIVE_GRID), dim=-1)


def _mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        lin = nn.Linear(n_in, n_out)
        last = i == len(sizes) - 2
        nn.init.orthogonal_(lin.weight, gain=out_gain if last else math.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers += [lin] if last else [lin, nn.ReLU()]
    return nn.Sequential(*layers)


class MasterNetwork(nn.Module):
    """Actor-critic of the master agent, which picks one of the 48 directives of the 4 x 4 x 3 grid per env.

    Inputs (B = envs):
      symbol_embeddings (B, S, D): per-symbol embeddings, e.g. SymbolPolicy.embed(obs) (detach them if the symbol
          encoder is not meant to learn from the master's loss);
      global_features (B, G): portfolio and regime features plus the current directive (one-hot or values),
          assembled by the script;
      state (B, state_dim), only when state_dim > 0: the env's global state (VecTradingCore.state()) for the
          centralised critic; the actor never sees it;
      symbol_mask (B, S) bool, optional: symbols to pool over (e.g. tradable ones); all by default.

    The symbols are pooled by mean and max over S, so one network serves any universe size. The actor is a joint
    Categorical(48) over the grid rather than three factorised heads: 48 logits are cheap, the distribution is
    exact (no independence assumption between, say, a low risk multiplier and the defensive mode), and PPO's
    ratio and entropy stay those of one categorical. unravel_directive maps an index to grid coordinates.
    """

    def __init__(
        self,
        embed_dim: int,
        global_dim: int,
        state_dim: int = 0,
        hidden: tuple[int, ...] = (256, 256),
        actor_gain: float = 0.01,
        num_directives: int = NUM_DIRECTIVES,
    ):
        super().__init__()
        self.embed_dim, self.global_dim, self.state_dim = embed_dim, global_dim, state_dim
        pooled = 2 * embed_dim + global_dim
        self.actor = _mlp([pooled, *hidden, num_directives], out_gain=actor_gain)
        self.critic = _mlp([pooled + state_dim, *hidden, 1], out_gain=1.0)

    def _pool(self, emb: torch.Tensor, global_features: torch.Tensor, symbol_mask: torch.Tensor | None):
        if emb.dim() != 3 or emb.shape[-1] != self.embed_dim:
            raise ValueError(f"symbol_embeddings has shape {tuple(emb.shape)}, expected (B, S, {self.embed_dim}).")
        if global_features.shape != (emb.shape[0], self.global_dim):
            raise ValueError(
                f"global_features has shape {tuple(global_features.shape)}, expected ({emb.shape[0]}, "
                f"{self.global_dim}); build MasterNetwork with global_dim matching the features."
            )
        if symbol_mask is None:
            mean, peak = emb.mean(dim=1), emb.amax(dim=1)  # (B, D) each
        else:
            m = symbol_mask.to(emb.device).bool().unsqueeze(-1)  # (B, S, 1)
            count = m.sum(dim=1)  # (B, 1)
            mean = (emb * m).sum(dim=1) / count.clamp(min=1)
            # An env with no symbol in the mask pools to zeros rather than -inf.
            peak = torch.where(count > 0, emb.masked_fill(~m, -torch.inf).amax(dim=1), torch.zeros_like(mean))
        return torch.cat([mean, peak, global_features.to(emb.dtype)], dim=-1)  # (B, 2D + G)

    def _critic_input(self, pooled: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        if self.state_dim == 0:
            return pooled
        if state is None or state.shape != (pooled.shape[0], self.state_dim):
            got = None if state is None else tuple(state.shape)
            raise ValueError(f"state has shape {got}, expected ({pooled.shape[0]}, {self.state_dim}) (env.state()).")
        return torch.cat([pooled, state.to(pooled.dtype)], dim=-1)

    def forward(self, symbol_embeddings, global_features, state=None, symbol_mask=None):
        """Directive logits (B, 48) and value (B,)."""
        pooled = self._pool(symbol_embeddings, global_features, symbol_mask)
        return self.actor(pooled), self.critic(self._critic_input(pooled, state)).squeeze(-1)

    def get_value(self, symbol_embeddings, global_features, state=None, symbol_mask=None) -> torch.Tensor:
        pooled = self._pool(symbol_embeddings, global_features, symbol_mask)
        return self.critic(self._critic_input(pooled, state)).squeeze(-1)  # (B,)

    def get_action_and_value(
        self, symbol_embeddings, global_features, state=None, action=None, deterministic=False, symbol_mask=None
    ):
        """directive index (B,) long in [0, 48), logprob (B,), entropy (B,), value (B,)."""
        logits, value = self(symbol_embeddings, global_features, state, symbol_mask)
        action, logprob, entropy = masked_policy(logits, action, deterministic)
        return action, logprob, entropy, value


class ValueNorm(nn.Module):
    """Running mean and variance of the critic's targets (Chan et al.'s parallel update over batches). The critic
    predicts normalised values; GAE uses denormalised ones (MAPPO's ValueNorm, PopArt without the output rescale)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("count", torch.full((), 1e-4))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).double()
        n, mean, var = x.numel(), x.mean(), x.var(unbiased=False)
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean.copy_(self.mean + delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.sqrt(self.var + 1e-8)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(self.var + 1e-8) + self.mean


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: one file per save, loadable with torch.load(weights_only=True) (no pickled code runs on load).
# ---------------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "trading-rl-checkpoint/1"


def _plain(obj):
    """Args and statistics as tensors and Python builtins that weights_only loading accepts: dataclasses and
    namespaces become dicts, numpy arrays tensors, numpy scalars Python numbers, paths strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, argparse.Namespace):
        return _plain(vars(obj))
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return _plain(obj.state_dict())
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return obj
    raise TypeError(
        f"save_checkpoint cannot store a {type(obj).__name__}; pass tensors, numpy arrays, numbers, strings, "
        "lists, dicts or dataclasses (or an object with state_dict())."
    )


def rng_states() -> dict:
    """The python, numpy, torch (and CUDA) generators' states as tensors and builtins (weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": (int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], *states["numpy_gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    obs_norm=None,
    args=None,
    global_step: int = 0,
    extra: dict | None = None,
) -> None:
    """Write model and optimiser state, observation-normalisation statistics (an object with state_dict() or a
    dict; numpy arrays are stored as tensors), args (dataclass, namespace or dict, stored as a dict), the global
    step and the RNG states of python, numpy, torch (and CUDA) to one file. The file is written to a temporary
    name in the same folder and renamed, so a crash never leaves a half-written checkpoint under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "obs_norm": _plain(obs_norm),
        "args": _plain(args),
        "global_step": int(global_step),
        "rng": rng_states(),
        "extra": _plain(extra),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Read a checkpoint written by save_checkpoint, load it into model (and optimizer) and return the whole payload
    ("args", "global_step", "obs_norm", "extra", ...). The model's parameter names and shapes must match the saved
    ones exactly; otherwise a ValueError lists the missing, unexpected and mis-shaped keys. restore_rng=True puts
    the python, numpy, torch (and CUDA) generators back where they were at save time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; check the path (runs/<run_name>/...).")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"Checkpoint {path} could not be read ({type(e).__name__}: {e}); the file is corrupt, "
            "truncated or not written by save_checkpoint."
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint (format {CHECKPOINT_FORMAT}).")
    if model is not None:
        saved, own = payload["model"], model.state_dict()
        missing = sorted(set(own) - set(saved))
        unexpected = sorted(set(saved) - set(own))
        shapes = [
            f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in saved and saved[k].shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"Checkpoint {path} does not fit the model (was it built with the same EncoderConfig, number of "
                f"symbols and head options?). Missing keys: {missing or 'none'}. Unexpected keys: "
                f"{unexpected or 'none'}. Shape mismatches: {shapes or 'none'}."
            )
        model.load_state_dict(saved)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"Checkpoint {path} holds no optimizer state; load it without an optimizer.")
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"The optimizer state in {path} does not fit this optimizer: {e}") from e
    if restore_rng:
        set_rng_states(payload["rng"])
    return payload


def load_symbol_agents(path: str, num_symbols: int, directive_dim: int = 4) -> tuple[SymbolPolicy, EncoderConfig]:
    """Symbol agents initialised from a ppo_symbol_agent.py checkpoint (independent mode, no directive input).

    The checkpoint's encoder settings and head layout are used. The directives are extra inputs of the heads' first
    layers: their weight rows start at zero, so the loaded agents act exactly as the checkpoint did until the MAPPO
    updates teach them to read the master's orders."""
    payload = load_checkpoint(path)
    saved, saved_args = payload["model"], payload["args"] or {}
    if "encoder" not in saved_args or "actor.weights.0" not in saved:
        raise ValueError(f"{path} is not a ppo_symbol_agent.py checkpoint (no encoder args or symbol heads in it).")
    encoder = EncoderConfig(**saved_args["encoder"])
    heads = saved["actor.weights.0"].shape[0]
    if heads not in (1, num_symbols):
        raise ValueError(
            f"{path} holds per-symbol heads for {heads} symbols but the data has {num_symbols}; train the symbol "
            "agents on the same universe (--data.* flags) or start without --symbol-checkpoint."
        )
    agent = SymbolPolicy(num_symbols, encoder, shared_heads=heads == 1 and num_symbols > 1, directive_dim=directive_dim)
    own = agent.state_dict()
    for key in ("actor.weights.0", "critic.weights.0"):  # (H, D, hidden) -> (H, D + directive_dim, hidden)
        w = saved[key]
        if w.shape[1] + directive_dim == own[key].shape[1]:
            saved[key] = torch.cat([w, torch.zeros(w.shape[0], directive_dim, w.shape[2], dtype=w.dtype)], dim=1)
    bad = sorted(set(own) ^ set(saved)) + [k for k in own if k in saved and own[k].shape != saved[k].shape]
    if bad:
        raise ValueError(f"{path} does not fit SymbolPolicy({num_symbols}, {encoder.kind}): mismatched keys {bad}.")
    agent.load_state_dict(saved)
    return agent, encoder


# ---------------------------------------------------------------------------------------------------------------
# Run plumbing shared by the scripts (ppo_symbol_agent.py, mappo_master.py): GAE and the PPO-clip loss, the
# data-parallel gradient all-reduce and rank gathering, observations to torch, tensorboard / MLflow logging, run
# summaries, the SIGINT stop flag, and setup (distributed init, seeding, encoder preset, run folder).
# ---------------------------------------------------------------------------------------------------------------

# tensorboard tag -> MLflow metric name fixed by the seeds (Stage 5 telemetry); other tags keep their own name.
MLFLOW_NAMES = {
    "charts/policy_action_entropy_mean": "policy_action_entropy_mean",
    "charts/executed_action_entropy_mean": "executed_action_entropy_mean",
    "charts/voluntary_trade_rate": "voluntary_trade_rate_mean",
    "charts/sanitizer_trade_delta": "sanitizer_trade_delta_mean",
    "charts/ep_unique_actions": "ep_unique_actions_mean",
    "charts/diversity_bonus": "ep_diversity_bonus_mean",
}


def summary_telemetry(metrics: dict) -> dict:
    """The charts/* scalars under their MLflow names, without the prefix: summary.json's "telemetry"."""
    return {MLFLOW_NAMES.get(k, k.split("/", 1)[1]): v for k, v in metrics.items() if k.startswith("charts/")}


def compute_gae(rewards, values, terminated, truncated, final_values, next_value, gamma, gae_lambda):
    """GAE over a rollout whose steps may end episodes (same-step autoreset).

    rewards, values, terminated, truncated, final_values: (T, ...); step t's outcome. final_values[t] = V(final obs)
    of the episode that ended by truncation at t. next_value: (...) value of the observation after the last step.
    At truncation the ended episode's value is bootstrapped into the reward, r + gamma * V(final_obs), and the
    recursion is cut as at a termination (where nothing is bootstrapped). Returns (advantages, returns).
    """
    trunc_only = truncated.float() * (1.0 - terminated.float())
    rewards = rewards + gamma * final_values * trunc_only
    nonterminal = 1.0 - torch.maximum(terminated.float(), truncated.float())
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nonterminal[t] - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nonterminal[t] * lastgaelam
    return advantages, advantages + values


def allreduce_grads(module: nn.Module, world_size: int) -> None:
    """Average the gradients of module's trainable parameters over the torchrun processes, one flattened
    all-reduce (missing gradients count as zeros)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    torch.nn.utils.vector_to_parameters(flat, grads)
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def gather_on_rank0(obj, rank: int, world_size: int) -> list | None:
    """Every rank's obj as a list on rank 0 (None elsewhere); no communication with one process."""
    if world_size == 1:
        return [obj]
    objs = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, objs, dst=0)
    return objs


def to_torch(obs: dict, device) -> dict:
    return {k: torch.as_tensor(v, device=device) for k, v in obs.items()}


def agent_policy(agent: nn.Module, device):
    """The agent's deterministic policy as a function of a numpy observation dict, for trading_env.run_backtest."""

    def act(obs):
        with torch.no_grad():
            return agent.get_action_and_value(to_torch(obs, device), deterministic=True)[0].cpu().numpy()

    return act


def log_scalars(writer, mlflow, metrics: dict, step: int) -> None:
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    if mlflow is not None:
        mlflow.log_metrics({MLFLOW_NAMES.get(t, t): float(v) for t, v in metrics.items()}, step=step)


def start_mlflow(args, run_name: str):
    # MLflow 3 keeps the ./mlruns file store only behind this opt-in (it steers users to a database server); a local
    # folder beside runs/ is what a CleanRL-style `--track` without a server needs.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
    mlflow.set_experiment(args.exp_name)
    mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v)[:250] for k, v in vars(args).items()})
    return mlflow


def write_summary(run_dir: Path, **fields) -> None:
    """Merge fields into run_dir/summary.json (status, global step, backtest, telemetry, args)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(fields)
    path.write_text(json.dumps(summary, indent=2, default=float) + "\n")


def stop_on_sigint() -> dict:
    """Ctrl-C asks the run to stop after the current iteration (checkpoint with --save-model, folder left
    incomplete, exit status 130); a second Ctrl-C stops at once."""
    stop = {"requested": False}

    def handler(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("SIGINT: stopping after this iteration (press Ctrl-C again to stop now)", flush=True)

    signal.signal(signal.SIGINT, handler)
    return stop


# CPU default encoder: the seed's transformer trains at ~94 samples/s on one of these cores; this MLP is ~100x faster.
CPU_ENCODER = {"kind": "mlp", "d_model": 128, "output_dim": 128}


def encoder_preset(encoder: EncoderConfig, preset: str, use_cuda: bool) -> tuple[EncoderConfig, str]:
    """--encoder-preset: auto is `as_given` on CUDA and `cpu` otherwise; cpu fills the encoder fields left at their
    (transformer) defaults from CPU_ENCODER. Returns the encoder and the preset applied."""
    preset = preset if preset != "auto" else ("as_given" if use_cuda else "cpu")
    if preset == "cpu":
        default = EncoderConfig()
        fill = {k: v for k, v in CPU_ENCODER.items() if getattr(encoder, k) == getattr(default, k)}
        encoder = dataclasses.replace(encoder, **fill)
    return encoder, preset


def init_distributed(cuda: bool) -> tuple[int, int, torch.device]:
    """torchrun's world size and rank (1 and 0 without torchrun), the process group (nccl on CUDA, gloo on CPU)
    and this process's device."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    use_cuda = cuda and torch.cuda.is_available()
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return world_size, rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def seed_everything(seed: int, torch_threads: int, torch_deterministic: bool) -> None:
    """Seed python, numpy and torch; torch's intra-op threads (0: its default) and deterministic algorithms."""
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    if torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def open_run(run_dir: Path, args, global_step: int):
    """Create the run folder marked incomplete, a tensorboard writer with the hyperparameter table and, with
    --track, an MLflow run. Returns (writer, mlflow or None)."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    write_summary(run_dir, status="incomplete", run_name=run_dir.name, global_step=global_step)
    writer = SummaryWriter(str(run_dir))
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )
    return writer, start_mlflow(args, run_dir.name) if args.track else None


def clipped_ppo_loss(newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, clip_coef, clip_vloss, norm_adv):
    """PPO-clip policy loss and (clipped) value loss of one minibatch (Schulman et al. 2017, as CleanRL's ppo.py).
    Returns pg_loss, v_loss, old_approx_kl, approx_kl and the clipped fraction (a float)."""
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    with torch.no_grad():
        # calculate approx_kl http://joschu.net/blog/kl-approx.html
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean().item()
    if norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # Policy loss
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    # Value loss
    if clip_vloss:
        v_loss_unclipped = (newvalue - returns) ** 2
        v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -clip_coef, clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    return pg_loss, v_loss, old_approx_kl, approx_kl, clipfrac


def assert_ranks_agree(tensors, rank: int) -> None:
    """Every rank must end with rank 0's weights (same init, same all-reduced gradients)."""
    weights = nn.utils.parameters_to_vector(list(tensors)).detach()
    reference = weights.clone()
    dist.broadcast(reference, src=0)
    assert torch.equal(weights, reference), f"rank {rank}: weights differ from rank 0's after training"
